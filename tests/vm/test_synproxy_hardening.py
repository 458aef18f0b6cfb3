"""SYN proxy hardening: session reuse, SYN retransmission, defer mode, held
early data, real-server resets, ACK storms, stateless drops, floods, unload.

Every mechanism is shown working and, where it has a switch, shown missing
when its sysctl turns it off.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from ipvs_synproxy.model import FwdMethod
from ipvs_synproxy.netlink import IPVS
from ipvs_synproxy.testbed import flood, netns, peers, topology
from tests.vm.test_fullnat import (  # noqa: F401  (ipvs is a fixture)
    NETS,
    Capture,
    _frame,
    _send_frames,
    ext_stats_file,
    ipvs,
    lb_sysctls,
    wait_for,
)
from tests.vm.test_synproxy import (
    ACK,
    METHODS,
    SYN,
    BlobServer,
    _seg,
    _synacks,
    synproxy_service,
    transfer,
)

IP = ipaddress.ip_address
NET4 = NETS["ipv4"]
REQUEST = b"GET / HTTP/1.0\r\nHost: vip\r\n\r\n"


def _tcp_segments(frames: list[bytes], dport: int) -> list:
    """The TCP layers of frames to dport."""
    from scapy.layers.inet import TCP
    from scapy.layers.l2 import Ether

    out = []
    for f in frames:
        pkt = Ether(f)
        if TCP in pkt and pkt[TCP].dport == dport:
            out.append(pkt[TCP])
    return out


def delta(before: dict[str, int], name: str) -> int:
    return ext_stats_file()[name] - before[name]


def http(port: int = 80, sport: int = 0, timeout: float = 5.0, send: bool = True,
         pause: float = 0.0) -> bytes:
    """A request from the client to the IPv4 VIP; the raw reply (b"" if none)."""
    s = netns.socket_in("client", socket.AF_INET, socket.SOCK_STREAM)
    with s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if sport:
            s.bind((topology.CLIENT4, sport))
        s.settimeout(timeout)
        s.connect((topology.VIP4, port))
        if pause:
            time.sleep(pause)
        if send:
            s.sendall(REQUEST)
        out = b""
        with contextlib.suppress(TimeoutError, ConnectionError):
            while chunk := s.recv(65536):
                out += chunk
        return out


def conn_states(sport: int) -> list[str]:
    out = netns.run("lb", ["ipvsadm", "-Lnc"]).stdout
    return [ln.split()[2] for ln in out.splitlines()
            if f"{topology.CLIENT4}:{sport} " in ln]


@contextmanager
def nft(ns: str, rules: str) -> Iterator[None]:
    """An nft table ``t`` in ns with an input chain holding rules."""
    script = ("table inet t {\n  chain in {\n    type filter hook input priority 0;\n"
              f"    {rules}\n  }}\n}}\n")
    res = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=script,
                         text=True, capture_output=True, check=False)
    assert res.returncode == 0, f"nft: {res.stderr}"
    try:
        yield
    finally:
        subprocess.run(["ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "t"],
                       check=False)


# ---- session reuse ------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("reuse", [True, False])
def test_reconnecting_from_the_same_port_in_time_wait(
        ipvs: IPVS, real_servers: dict, method: str, reuse: bool) -> None:  # noqa: F811
    synproxy_service(ipvs, NET4, METHODS[method])
    sport = 47000 + 2 * (method == "fullnat") + reuse
    assert http(sport=sport).startswith(b"HTTP/1.")
    assert wait_for(lambda: conn_states(sport) == ["TIME_WAIT"], 5), conn_states(sport)
    before = ext_stats_file()
    with lb_sysctls(synproxy_reuse_time_wait=int(reuse)):
        reply = http(sport=sport, timeout=3)
    if reuse:
        assert reply.startswith(b"HTTP/1."), reply[:80]
        assert delta(before, "synproxy_reuse_time_wait") == 1
    else:
        assert not reply.startswith(b"HTTP/1."), "reached a real server without reuse"
        assert delta(before, "synproxy_reuse_time_wait") == 0


# ---- SYN retransmission, held early data, resets -------------------------------------------

DROP_FIRST_TWO_SYNS = "tcp dport 80 tcp flags & (syn|ack) == syn numgen inc mod 3 { 0, 1 } drop"
DROP_FIRST_SYN = "tcp dport 80 tcp flags & (syn|ack) == syn numgen inc mod 2 0 drop"


def test_a_server_that_drops_the_first_two_syns_still_gets_connected(
        ipvs: IPVS, real_servers: dict) -> None:  # noqa: F811
    synproxy_service(ipvs, NET4, FwdMethod.FULLNAT, servers=("rs1",))
    before = ext_stats_file()
    with nft("rs1", DROP_FIRST_TWO_SYNS):
        assert http(timeout=15).startswith(b"HTTP/1.")
    assert delta(before, "synproxy_syn_retransmit") == 2


def test_without_retransmission_the_client_is_reset(
        ipvs: IPVS, real_servers: dict) -> None:  # noqa: F811
    synproxy_service(ipvs, NET4, FwdMethod.FULLNAT, servers=("rs1",))
    before = ext_stats_file()
    with nft("rs1", DROP_FIRST_TWO_SYNS), lb_sysctls(synproxy_syn_retries=0):
        t0 = time.monotonic()
        with pytest.raises(ConnectionResetError):
            s = netns.socket_in("client", socket.AF_INET, socket.SOCK_STREAM)
            with s:
                s.settimeout(10)
                s.connect((topology.VIP4, 80))
                s.sendall(REQUEST)
                s.recv(100)
        assert time.monotonic() - t0 < 5
    assert delta(before, "synproxy_syn_retransmit") == 0
    assert delta(before, "synproxy_rs_timeout") == 1


@pytest.mark.parametrize("limits", [{}, {"synproxy_hold_packets": 1},
                                    {"synproxy_hold_bytes": 100}],
                         ids=["held", "packet-limit", "byte-limit"])
def test_early_data_is_held_until_the_server_answers(
        ipvs: IPVS, real_servers: dict, limits: dict[str, int]) -> None:  # noqa: F811
    """The real server ignores the first SYN: the request, sent right after
    connect(), waits at the balancer for a second and is delivered after the
    handshake — unless the hold limits are too small."""
    synproxy_service(ipvs, NET4, FwdMethod.FULLNAT, servers=("rs1",))
    before = ext_stats_file()
    with nft("rs1", DROP_FIRST_SYN), lb_sysctls(**limits):
        assert http(timeout=15).startswith(b"HTTP/1.")
    if limits:
        assert delta(before, "synproxy_hold_drop") >= 1
    else:
        assert delta(before, "synproxy_held") >= 1
        assert delta(before, "synproxy_hold_drop") == 0


def test_a_refusing_server_resets_the_client(ipvs: IPVS, real_servers: dict) -> None:  # noqa: F811
    synproxy_service(ipvs, NET4, FwdMethod.FULLNAT, port=8099, servers=("rs1",))
    before = ext_stats_file()
    t0 = time.monotonic()
    with pytest.raises(ConnectionResetError):
        s = netns.socket_in("client", socket.AF_INET, socket.SOCK_STREAM)
        with s:
            s.settimeout(10)
            s.connect((topology.VIP4, 8099))
            s.sendall(REQUEST)
            s.recv(100)
    assert time.monotonic() - t0 < 3
    assert delta(before, "synproxy_rs_reset") == 1


# ---- defer mode ---------------------------------------------------------------------------


@pytest.mark.parametrize("defer", [True, False])
def test_defer_mode_opens_the_server_side_only_for_data(
        ipvs: IPVS, real_servers: dict, defer: bool) -> None:  # noqa: F811
    synproxy_service(ipvs, NET4, FwdMethod.FULLNAT, servers=("rs1",))
    before = ext_stats_file()
    cap = Capture("rs1")
    try:
        with lb_sysctls(synproxy_defer=int(defer)):
            s = netns.socket_in("client", socket.AF_INET, socket.SOCK_STREAM)
            with s:
                s.settimeout(10)
                s.connect((topology.VIP4, 80))
                time.sleep(1.5)
                syns = [p for p in _tcp_segments(cap.frames, 80) if p.flags.S]
                assert bool(syns) != defer, syns
                s.sendall(REQUEST)
                assert s.recv(100).startswith(b"HTTP/1.")
    finally:
        cap.stop()
    assert (delta(before, "synproxy_defer_drop") >= 1) == defer


# ---- ACK storms ---------------------------------------------------------------------------


@pytest.fixture
def holder(topo: None) -> Iterator[int]:
    """A real server on rs1:8082 that keeps every connection open."""
    srv = netns.socket_in("rs1", socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((topology.RS4["rs1"], 8082))
    srv.listen(8)
    conns: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conns.append(srv.accept()[0])
            except OSError:
                return

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield 8082
    with contextlib.suppress(OSError):
        srv.shutdown(socket.SHUT_RDWR)
    srv.close()
    t.join(5)
    for c in conns:
        c.close()


@pytest.mark.parametrize("storm", [10, 0])
def test_repeated_identical_acks_are_cut_off(ipvs: IPVS, holder: int, storm: int) -> None:  # noqa: F811
    synproxy_service(ipvs, NET4, FwdMethod.FULLNAT, port=holder, servers=("rs1",))
    at_lb = Capture("lb")
    s = netns.socket_in("client", socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.connect((topology.VIP4, holder))
        s.sendall(b"hello")
        time.sleep(1)
        sport = s.getsockname()[1]
    finally:
        lb_frames = at_lb.stop()
    last = [p for p in _tcp_segments(lb_frames, holder) if p.sport == sport][-1]
    ack = _seg(sport, holder, last.seq, last.ack, ACK, window=last.window)
    before = ext_stats_file()
    at_rs = Capture("rs1")
    try:
        with lb_sysctls(synproxy_ack_storm=storm):
            _send_frames([_frame(4, ack)] * 30)
            time.sleep(1.5)
    finally:
        rs_frames = at_rs.stop()
        s.close()
    repeats = [p for p in _tcp_segments(rs_frames, 8082)
               if p.flags == "A" and not bytes(p.payload)]
    if storm:
        assert len(repeats) <= storm + 1, len(repeats)
        assert delta(before, "synproxy_ack_storm") >= 30 - storm - 1
    else:
        assert len(repeats) >= 30
        assert delta(before, "synproxy_ack_storm") == 0


# ---- stateless drops ----------------------------------------------------------------------

RST, FIN = 0x04, 0x01


@pytest.mark.parametrize("drop", [True, False])
def test_stray_fin_and_rst_are_dropped(ipvs: IPVS, drop: bool) -> None:  # noqa: F811
    synproxy_service(ipvs, NET4, FwdMethod.FULLNAT)
    before = ext_stats_file()
    cap = Capture("client")
    try:
        with lb_sysctls(synproxy_drop_stray=int(drop)):
            _send_frames([_frame(4, _seg(45001, 80, 5, 0, FIN)),
                          _frame(4, _seg(45002, 80, 5, 0, RST))])
            time.sleep(1.5)
    finally:
        frames = cap.stop()
    answered = [p for p in map(_tcp_of, frames) if p is not None]
    if drop:
        assert delta(before, "synproxy_stray_drop") == 2
        assert answered == []
    else:
        assert delta(before, "synproxy_stray_drop") == 0
        assert answered, "the local stack should have answered the FIN"


def _tcp_of(frame: bytes):
    from scapy.layers.inet import TCP
    from scapy.layers.l2 import Ether

    pkt = Ether(frame)
    return pkt[TCP] if TCP in pkt and pkt[TCP].sport == 80 else None


def _icmp_unreachables(frames: list[bytes]) -> int:
    from scapy.layers.inet import ICMP
    from scapy.layers.l2 import Ether

    return sum(1 for f in frames if ICMP in Ether(f) and Ether(f)[ICMP].type == 3)


@pytest.mark.parametrize("drop", [True, False])
def test_udp_to_a_tcp_only_vip_is_dropped_when_asked(ipvs: IPVS, drop: bool) -> None:  # noqa: F811
    from scapy.layers.inet import IP as IPv4
    from scapy.layers.inet import UDP
    from scapy.layers.l2 import Ether

    from tests.vm.test_fullnat import CLIENT_MAC, LB_MAC

    synproxy_service(ipvs, NET4, FwdMethod.FULLNAT)
    before = ext_stats_file()
    cap = Capture("client")
    try:
        with lb_sysctls(synproxy_drop_udp=int(drop)):
            _send_frames([bytes(Ether(src=CLIENT_MAC, dst=LB_MAC)
                                / IPv4(src=topology.CLIENT4, dst=topology.VIP4)
                                / UDP(sport=45100, dport=80) / b"x")])
            time.sleep(1.5)
    finally:
        frames = cap.stop()
    assert (delta(before, "synproxy_udp_drop") == 1) == drop
    assert (_icmp_unreachables(frames) == 0) == drop


@pytest.mark.parametrize("drop", [True, False])
def test_fragmented_syns_are_dropped_when_asked_and_never_bypass_the_proxy(
        ipvs: IPVS, drop: bool) -> None:  # noqa: F811
    from scapy.layers.inet import IP as IPv4
    from scapy.layers.inet import fragment
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    from tests.vm.test_fullnat import CLIENT_MAC, LB_MAC

    synproxy_service(ipvs, NET4, FwdMethod.FULLNAT)
    seg = _frame(4, _seg(45200, 80, 99, 0, SYN, b"\x02\x04\x05\xb4" + b"\x01" * 16))
    ip = Ether(seg)[IPv4]
    frags = fragment(IPv4(src=ip.src, dst=ip.dst, proto=6) / Raw(bytes(ip.payload)),
                     fragsize=16)
    before = ext_stats_file()
    cap, rs1, rs2 = Capture("client"), Capture("rs1"), Capture("rs2")
    try:
        with lb_sysctls(synproxy_drop_frag=int(drop)):
            _send_frames([bytes(Ether(src=CLIENT_MAC, dst=LB_MAC) / f) for f in frags])
            time.sleep(1.5)
    finally:
        frames = cap.stop()
        rs_frames = rs1.stop() + rs2.stop()
    assert _tcp_segments(rs_frames, 80) == [], "a fragmented SYN bypassed the SYN proxy"
    assert (delta(before, "synproxy_frag_drop") >= 1) == drop
    assert (45200 in _synacks(frames)) != drop


# ---- floods and unloading -----------------------------------------------------------------


def test_a_million_packet_mixed_flood_leaves_legitimate_clients_served(
        ipvs: IPVS, real_servers: dict) -> None:  # noqa: F811
    synproxy_service(ipvs, NET4, FwdMethod.FULLNAT)
    before = ext_stats_file()
    replies, errors = [], []

    def client(n: int) -> None:
        for i in range(n):
            try:
                r = peers.http_get(topology.VIP4, 80, timeout=30)
                replies.append(r.server)
            except Exception as exc:
                errors.append(f"{i}: {exc!r}")

    with flood.Flood(kind="mixed", target=topology.VIP4, port=80, count=1_000_000) as f:
        time.sleep(2)
        clients = [threading.Thread(target=client, args=(50,)) for _ in range(4)]
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        assert f.running(), "the flood ended before the 200 requests: raise its count"
        result = f.wait(timeout=600)
    print(f"flood: {result.sent} packets in {result.seconds:.0f} s; "
          f"requests ok {len(replies)}, failed {len(errors)}")
    assert result.sent >= 1_000_000
    assert len(errors) == 0, errors[:5]
    assert sorted(set(replies)) == ["rs1", "rs2"] and len(replies) == 200
    out = netns.run("lb", ["ipvsadm", "-Lnc"]).stdout
    spoofed = [ln for ln in out.splitlines() if "198.51.100." in ln
               and f"{topology.CLIENT4}:" not in ln.split()[3]]
    assert spoofed == [], spoofed[:5]
    after = ext_stats_file()
    assert after["synproxy_ack_valid"] - before["synproxy_ack_valid"] == 200
    assert after["synproxy_cookie_sent"] - before["synproxy_cookie_sent"] > 1000


def _ipvs_modules() -> list[str]:
    with open("/proc/modules") as f:
        return [ln.split()[0] for ln in f if ln.startswith("ip_vs")]


def test_unloading_during_transfers_and_floods_repeatedly(topo: None) -> None:
    """Runs last: unloads and reloads the patched modules three times while
    data flows through SYN proxy connections and a SYN flood runs."""
    servers = [BlobServer(rs, NET4.rs[rs], 8080) for rs in ("rs1", "rs2")]
    try:
        for _ in range(3):
            with IPVS(netns="lb") as conn:
                conn.flush()
                synproxy_service(conn, NET4, FwdMethod.FULLNAT, port=8080)
            threads = [threading.Thread(target=_transfer_quietly, daemon=True)
                       for _ in range(3)]
            for t in threads:
                t.start()
            with flood.Flood(kind="syn", target=topology.VIP4, port=8080, duration=20):
                time.sleep(3)
                with IPVS(netns="lb") as conn:
                    conn.flush()
                mods = _ipvs_modules()
                res = subprocess.run(["rmmod", *[m for m in mods if m != "ip_vs"], "ip_vs"],
                                     capture_output=True, text=True, check=False)
                assert res.returncode == 0, res.stderr
                assert _ipvs_modules() == []
                subprocess.run(["modprobe", "ip_vs"], check=True)
            for t in threads:
                t.join(60)
            with IPVS(netns="lb") as conn:
                assert "synproxy_syn_received" in conn.ext_stats()
                synproxy_service(conn, NET4, FwdMethod.FULLNAT, port=8080)
                assert transfer(NET4, 8080, "download", 1 << 20) > 0
                conn.flush()
        dmesg = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
        assert "Objects remaining" not in dmesg, dmesg[-2000:]
    finally:
        for s in servers:
            s.close()


def _transfer_quietly() -> None:
    with contextlib.suppress(OSError, AssertionError):
        transfer(NET4, 8080, "download", 200 << 20, check=False)
