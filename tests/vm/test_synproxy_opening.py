"""A packet that races the opening of a SYN-proxy connection never reaches the
real server ahead of the connection's SYN.

The cookie ACK and the first data segment of many handshakes are sent at the
same instant from two threads pinned to the guest's two CPUs: one of them
opens the connection, and the other can find it in the table while the
handshake is still being attached. Such a packet is dropped
(``synproxy_opening_drop``; a real client sends it again); before, it went to
the real server as an ordinary connection's packet, before the SYN, its
acknowledgment in the cookie's numbers. At the real servers every flow must
begin with a SYN.
"""

from __future__ import annotations

import os
import random
import threading
from collections import defaultdict

import pytest

from ipvs_synproxy.kernel.netlink import IPVS
from tests.vm.helpers import (
    ACK,
    FAMILIES,
    METHODS,
    NETS,
    PSH,
    RST,
    SYN,
    Capture,
    delta,
    eth_frame,
    ext_stats_file,
    nft,
    read_synacks,
    send_frames,
    synproxy_service,
    tcp_seg,
    wait_for,
)

FLOWS = 300
BASE = {("nat", "ipv4"): 43000, ("nat", "ipv6"): 43400, ("fullnat", "ipv4"): 43800,
        ("fullnat", "ipv6"): 44200}


def _moved(before: dict[str, int], name: str) -> int:
    """How much a counter moved (0 for one this kernel does not have)."""
    return ext_stats_file().get(name, 0) - before.get(name, 0)


def _race(frames: list[tuple[bytes, bytes]]) -> None:
    """Each pair's two frames sent at once, one per CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("the race needs two CPUs")
    barrier = threading.Barrier(2)

    def run(cpu: int, which: int) -> None:
        os.sched_setaffinity(0, {cpu})
        for pair in frames:
            barrier.wait()
            send_frames([pair[which]])

    threads = [threading.Thread(target=run, args=(cpus[i], i)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)


def _first_segments(frames: list[bytes], port: int) -> dict[tuple[str, int], str]:
    """The flags of the first segment to ``port`` of every flow seen."""
    from scapy.layers.inet import TCP
    from scapy.layers.l2 import Ether

    first: dict[tuple[str, int], str] = {}
    for f in frames:
        pkt = Ether(f)
        if TCP in pkt and pkt[TCP].dport == port:
            key = (str(pkt.payload.src), int(pkt[TCP].sport))
            first.setdefault(key, str(pkt[TCP].flags))
    return first


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_a_packet_racing_the_opening_never_reaches_the_server_first(
        ipvs: IPVS, method: str, family: str) -> None:
    net = NETS[family]
    synproxy_service(ipvs, net, METHODS[method])
    base = BASE[(method, family)]
    sports = range(base, base + FLOWS)
    isn = {p: random.getrandbits(32) for p in sports}
    before = ext_stats_file()
    with nft("client", f"tcp sport {base}-{base + FLOWS - 1} tcp flags rst drop",
             hook="output"):
        cap = Capture("client")
        try:
            send_frames([eth_frame(net.version, tcp_seg(p, 80, isn[p], 0, SYN,
                                                   b"\x02\x04\x05\x78")) for p in sports])
            assert wait_for(lambda: len(set(read_synacks(cap.frames)) & set(sports)) == FLOWS, 20)
        finally:
            synacks = read_synacks(cap.stop())
        from scapy.layers.inet import TCP

        cookie = {p: int(synacks[p][TCP].seq) for p in sports}
        pairs = [(eth_frame(net.version, tcp_seg(p, 80, isn[p] + 1, cookie[p] + 1, ACK)),
                  eth_frame(net.version, tcp_seg(p, 80, isn[p] + 1, cookie[p] + 1, ACK | PSH,
                                           payload=b"GET / HTTP/1.0\r\n\r\n")))
                 for p in sports]
        at_rs = {rs: Capture(rs) for rs in ("rs1", "rs2")}
        try:
            _race(pairs)
            wait_for(lambda: delta(before, "synproxy_conn_proxied")
                     + delta(before, "synproxy_rs_reset") >= FLOWS, 10)
        finally:
            frames = {rs: c.stop() for rs, c in at_rs.items()}
            send_frames([eth_frame(net.version, tcp_seg(p, 80, isn[p] + 19, cookie[p] + 1,
                                                   RST | ACK)) for p in sports])
    flows: dict[str, int] = defaultdict(int)
    bad = []
    for rs, fr in frames.items():
        for key, flags in _first_segments(fr, 80).items():
            flows[flags] += 1
            if flags != "S":
                bad.append((rs, key, flags))
    print(f"first segments at the real servers: {dict(flows)}; "
          f"synproxy_opening_drop +{_moved(before, 'synproxy_opening_drop')}")
    assert sum(flows.values()) >= FLOWS * 0.9, flows
    assert not bad, f"{len(bad)} flows reached a real server before their SYN: {bad[:5]}"
