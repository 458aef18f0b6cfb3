"""hostflood: the host's SYN frames are what trafgen's are, and stay in the testbed."""

from __future__ import annotations

import ipaddress
import random

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from ipvs_synproxy_testbed import flood, hostflood, topology


def test_frames_are_valid_syns_from_the_spoofed_pool_to_the_vip() -> None:
    seed = random.randrange(1 << 32)
    print(f"seed {seed}")
    rng = random.Random(seed)
    for _ in range(200):
        raw = hostflood.syn_frame(rng)
        p = Ether(raw)
        assert p.dst == hostflood.LB_MAC and p.src == hostflood.CLIENT_MAC
        assert ipaddress.ip_address(p[IP].src) in flood.SPOOF_NET4
        assert p[IP].dst == topology.VIP4 and p[TCP].dport == 80
        assert p[TCP].flags == "S"
        ip_sum, tcp_sum = p[IP].chksum, p[TCP].chksum
        del p[IP].chksum, p[TCP].chksum
        again = Ether(bytes(p))
        assert (again[IP].chksum, again[TCP].chksum) == (ip_sum, tcp_sum)
        assert [o[0] for o in p[TCP].options] == ["MSS", "SAckOK", "Timestamp", "NOP",
                                                  "WScale"]


def test_the_macs_are_the_topologys() -> None:
    macs = {h.name: h.ifaces[0].mac for h in topology.HOSTS}
    assert (macs["lb"], macs["client"]) == (hostflood.LB_MAC, hostflood.CLIENT_MAC)
