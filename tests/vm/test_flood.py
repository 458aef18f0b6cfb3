"""The flood generator against a stock IPVS NAT service in the guest.

What arrives at lb is counted by an nftables rule in lb's raw PREROUTING hook
(SYNs from the spoofed pool to the VIP); everything on the client segment's
wire is captured with tcpdump and decoded: every address must be inside the client
segment's prefixes (ARP and neighbour discovery aside), every spoofed source
inside the pool.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipvs_synproxy_testbed import flood, netns, peers, topology
from tests.unit.test_flood import read_pcap
from tests.vm.conftest import ipvsadm

RATE = 300
SECONDS = 2.0
CLIENT_NETS = (ipaddress.ip_network(topology.CLIENT_NET4),
               ipaddress.ip_network(topology.CLIENT_NET6))
LINK_LOCAL = (ipaddress.ip_network("fe80::/10"), ipaddress.ip_network("ff02::/16"),
              ipaddress.ip_network("::/128"))


def _vs(addr: str, port: int = 80) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


@pytest.fixture
def nat_service(lb: None, real_servers: dict[str, list[peers.HttpServer]]) -> Iterator[None]:
    for vip, rs in ((topology.VIP4, topology.RS4), (topology.VIP6, topology.RS6)):
        ipvsadm("-A", "-t", _vs(vip), "-s", "rr")
        for name in ("rs1", "rs2"):
            ipvsadm("-a", "-t", _vs(vip), "-r", _vs(rs[name]), "-m")
    yield


LB_COUNT = """
add table inet flood_test
delete table inet flood_test
table inet flood_test {
  chain prerouting {
    type filter hook prerouting priority raw - 1; policy accept;
    ip saddr 198.51.100.128/25 ip daddr 198.51.100.10 tcp dport 80 \
      tcp flags & (syn|ack) == syn counter
    ip6 saddr 2001:db8:1::100/120 ip6 daddr 2001:db8:1::10 tcp dport 80 \
      tcp flags & (syn|ack) == syn counter
  }
}
"""


def _lb_counts() -> tuple[int, int]:
    out = netns.run("lb", ["nft", "-j", "list", "table", "inet", "flood_test"]).stdout
    counts = [int(e["counter"]["packets"])
              for item in json.loads(out)["nftables"]
              for e in item.get("rule", {}).get("expr", []) if "counter" in e]
    return counts[0], counts[1]


@contextlib.contextmanager
def capture(path: Path) -> Iterator[None]:
    """tcpdump on the client's wire for the body of the with: on the client veth's
    bridge port in the guest's root namespace, which sees both directions (trafgen
    bypasses the qdisc layer, so a capture inside ``client`` misses its frames)."""
    proc = subprocess.Popen(["tcpdump", "-i", f"client-{flood.CLIENT_DEV}", "-n", "-U",
                             "-s", "200", "-w", str(path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not path.exists() or path.stat().st_size < 24:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "tcpdump did not start"
            time.sleep(0.1)
        yield
    finally:
        time.sleep(0.5)
        proc.terminate()
        proc.wait(30)


def _addresses(frame: bytes) -> tuple[int, str | None, ipaddress.IPv4Address |
                                      ipaddress.IPv6Address | None,
                                      ipaddress.IPv4Address | ipaddress.IPv6Address | None]:
    etype = int.from_bytes(frame[12:14], "big")
    src_mac = frame[6:12].hex(":")
    ip = frame[14:]
    if etype == flood.ETH_P_IP:
        return etype, src_mac, ipaddress.ip_address(ip[12:16]), ipaddress.ip_address(ip[16:20])
    if etype == flood.ETH_P_IPV6:
        return etype, src_mac, ipaddress.ip_address(ip[8:24]), ipaddress.ip_address(ip[24:40])
    if etype == 0x0806:  # ARP: sender and target protocol addresses
        return etype, src_mac, ipaddress.ip_address(ip[14:18]), ipaddress.ip_address(ip[24:28])
    return etype, src_mac, None, None


def _inside(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return any(ip in n for n in CLIENT_NETS) or any(ip in n for n in LINK_LOCAL)


@pytest.mark.parametrize("family", [4, 6])
def test_syn_flood_reaches_the_vip_from_spoofed_pool_sources_only(
        nat_service: None, tmp_path: Path, family: int) -> None:
    netns.run("lb", ["nft", "-f", "-"], input=LB_COUNT)
    neigh_before = netns.run("lb", ["ip", "neigh", "show", "nud", "permanent"]).stdout
    pcap = tmp_path / "client.pcap"
    try:
        with capture(pcap):
            res = flood.run_flood("syn", duration=SECONDS, rate_pps=RATE, family=family)
        arrived = _lb_counts()[0 if family == 4 else 1]
    finally:
        netns.run("lb", ["nft", "delete", "table", "inet", "flood_test"], check=False)
    print(f"flood v{family}: {res.sent} SYNs in {res.seconds:.2f} s = {res.pps:.0f} pps "
          f"(asked {RATE}); lb counted {arrived}; replies {res.replies}")

    assert 0.3 * RATE * SECONDS < res.sent <= RATE * SECONDS * 1.1
    assert arrived == res.sent
    # the NAT service forwarded them; the real servers' SYN/ACKs came back to the
    # pool through lb and were dropped (and counted) on the client
    assert res.replies is not None and res.replies >= 0.9 * res.sent
    # the flood left nothing behind
    assert netns.run("lb", ["ip", "neigh", "show", "nud", "permanent"]).stdout == neigh_before
    assert "ipvs_sp_flood" not in netns.run("client", ["nft", "list", "tables"]).stdout

    pool = {ipaddress.ip_address(a) for a in flood.pool_addresses(family)}
    client_mac = flood.link_mac("client", "eth0")
    from_client = to_pool = 0
    for frame in read_pcap(pcap):
        etype, src_mac, src, dst = _addresses(frame)
        if src is None or dst is None:
            continue
        assert _inside(src) and _inside(dst), (etype, src, dst)
        if src_mac == client_mac and src in pool:
            from_client += 1
            assert dst == ipaddress.ip_address(topology.VIP4 if family == 4 else topology.VIP6)
        if dst in pool and etype != 0x0806:
            to_pool += 1
    assert from_client == res.sent
    # The counter and the capture stop at slightly different moments, and a
    # loaded guest's capture can lose a few frames: compare loosely.
    assert to_pool >= 0.8 * res.replies, (to_pool, res.replies)
    conns = ipvsadm("-L", "-n", "-c")
    assert "SYN_RECV" in conns


def test_without_resolving_the_replies_die_in_lb(nat_service: None, tmp_path: Path) -> None:
    """resolve=False: lb asks for each spoofed source (ARP) and nobody answers."""
    pcap = tmp_path / "client.pcap"
    with capture(pcap):
        res = flood.run_flood("syn", duration=SECONDS, rate_pps=RATE, resolve=False)
        time.sleep(1.0)
    arp = unicast = 0
    for frame in read_pcap(pcap):
        etype, _, _src, dst = _addresses(frame)
        if etype == 0x0806 and str(dst) in flood.pool_addresses(4):  # who-has pool
            arp += 1
        elif dst is not None and etype == flood.ETH_P_IP and \
                str(dst) in flood.pool_addresses(4):
            unicast += 1
    neigh = netns.run("lb", ["ip", "-4", "neigh", "show", "dev", "eth0"]).stdout
    unresolved = sum(1 for ln in neigh.splitlines()
                     if "INCOMPLETE" in ln or "FAILED" in ln)
    print(f"resolve=False: {res.sent} SYNs, lb sent {arp} ARP requests, {unicast} replies "
          f"reached the wire, {unresolved} unresolved neighbour entries in lb")
    assert res.replies is None and res.sent > 0
    assert unicast == 0 and arp > 0


def test_mixed_and_malformed_flood_leaves_the_balancer_serving(
        nat_service: None) -> None:
    for family in (4, 6):
        res = flood.run_flood("mixed", count=len(flood.segments("mixed")) * 20,
                              rate_pps=1000, family=family)
        assert res.sent == len(flood.segments("mixed")) * 20
        assert peers.http_get(topology.VIP4 if family == 4 else topology.VIP6).server in (
            "rs1", "rs2")


@pytest.mark.parametrize("kind", ["ack", "fin", "rst"])
def test_other_kinds_send(nat_service: None, kind: str) -> None:
    res = flood.run_flood(kind, count=200, rate_pps=1000)
    assert res.sent == 200


def test_flat_out_rate(lb: None) -> None:
    """No service: lb's stack drops the SYNs (RST to the pool); reports the rate."""
    res = flood.run_flood("syn", count=20000)
    print(f"flat out: {res.sent} SYNs in {res.seconds:.2f} s = {res.pps:.0f} pps; "
          f"replies {res.replies}")
    assert res.sent == 20000
