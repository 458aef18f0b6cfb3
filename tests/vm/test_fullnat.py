"""FULLNAT forwarding (forwarding method 5) with local-address pools and TOA.

Every test drives the patched kernel through ``ipvs_synproxy.kernel.netlink`` the
way users will, with real TCP clients in ``client`` and real servers in
``rs1``/``rs2`` that have **no route back** to the client network: only
FULLNAT, which makes the balancer's laddr the peer of the real server, lets
their replies find the way.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import resource
import select
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from ipvs_synproxy.kernel.model import Dest, FwdMethod, Service
from ipvs_synproxy.kernel.netlink import IPVS
from ipvs_synproxy_testbed import netns, peers, topology
from tests.vm.helpers import (
    CLIENT_MAC,
    IP,
    LB_MAC,
    NETS,
    Capture,
    Net,
    eth_frame,
    ext_stats_file,
    insmod,
    lb_sysctls,
    remove_toa,
    send_frames,
    toa_is_loaded,
    wait_for,
)

FAMILIES = ("ipv4", "ipv6")
TOA_KIND = {4: 254, 6: 253}
TOA_LEN = {4: 8, 6: 20}


# ---- fixtures -----------------------------------------------------------------------------


def _routes(ns: str) -> list[tuple[str, str]]:
    out = []
    for fam in ("-4", "-6"):
        res = netns.run(ns, ["ip", fam, "route", "show", "default"])
        out += [(fam, line) for line in res.stdout.splitlines() if line.strip()]
    return out


@pytest.fixture
def no_route_back(topo: None) -> Iterator[None]:
    """rs1 and rs2 without default routes: they reach only their own segment."""
    saved = {rs: _routes(rs) for rs in ("rs1", "rs2")}
    for rs, routes in saved.items():
        for fam, line in routes:
            netns.run(rs, ["ip", fam, "route", "del", *line.split()])
    for rs in saved:
        for client in (topology.CLIENT4, topology.CLIENT6):
            res = netns.run(rs, ["ip", "route", "get", client], check=False)
            assert res.returncode != 0, f"{rs} still routes to {client}: {res.stdout}"
    yield
    for rs, routes in saved.items():
        for fam, line in routes:
            netns.run(rs, ["ip", fam, "route", "replace", *line.split()])


def fullnat_service(ipvs: IPVS, net: Net, laddrs: tuple[str, ...],
                    servers: tuple[str, ...] = ("rs1", "rs2"), port: int = 80,
                    rs_port: int | None = None) -> Service:
    svc = Service(addr=IP(net.vip), port=port, scheduler="rr")
    ipvs.add_service(svc)
    for rs in servers:
        ipvs.add_dest(svc, Dest(addr=IP(net.rs[rs]), port=rs_port or port,
                                fwd=FwdMethod.FULLNAT, weight=1))
    for laddr in laddrs:
        ipvs.add_laddr(svc, IP(laddr))
    return svc


# ---- FULLNAT through the real topology ----------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_clients_reach_real_servers_that_have_no_route_back(
        ipvs: IPVS, no_route_back: None, real_servers: dict[str, list[peers.HttpServer]],
        family: str) -> None:
    net = NETS[family]
    laddrs = net.laddrs[:2]
    svc = fullnat_service(ipvs, net, laddrs)
    before = ipvs.ext_stats()

    replies = [peers.http_get(net.vip, timeout=10) for _ in range(6)]

    assert sorted({r.server for r in replies}) == ["rs1", "rs2"]
    # The real servers see the balancer's local addresses, never the client.
    peers_seen = {IP(r.peer) for r in replies}
    assert peers_seen <= {IP(a) for a in laddrs}, peers_seen
    assert len(peers_seen) == 2, "round-robin over the laddrs"
    assert IP(net.client) not in peers_seen
    after = ipvs.ext_stats()
    assert after["fullnat_conn_new"] - before["fullnat_conn_new"] == 6
    # /proc and netlink show the same counters
    assert ext_stats_file().keys() == after.keys()
    listed = ipvs.laddrs(svc)
    assert {la.addr for la in listed} == {IP(a) for a in laddrs}


@pytest.mark.parametrize("family", FAMILIES)
def test_udp_through_fullnat(ipvs: IPVS, no_route_back: None, family: str) -> None:
    from ipvs_synproxy.kernel.model import Protocol
    net = NETS[family]
    fam = peers.family_of(net.vip)
    svc = Service(protocol=Protocol.UDP, addr=IP(net.vip), port=5353, scheduler="rr")
    ipvs.add_service(svc)
    ipvs.add_dest(svc, Dest(addr=IP(net.rs["rs1"]), port=5353, fwd=FwdMethod.FULLNAT))
    ipvs.add_laddr(svc, IP(net.laddrs[0]))
    with netns.netns("rs1"):
        srv = socket.socket(fam, socket.SOCK_DGRAM)
    with netns.netns("client"):
        cli = socket.socket(fam, socket.SOCK_DGRAM)
    with srv, cli:
        srv.bind((net.rs["rs1"], 5353))
        srv.settimeout(10)
        cli.settimeout(10)
        cli.sendto(b"ping", (net.vip, 5353))
        data, peer = srv.recvfrom(100)
        assert data == b"ping"
        assert IP(peer[0]) == IP(net.laddrs[0])
        srv.sendto(b"pong:" + str(peer[1]).encode(), peer)
        data, src = cli.recvfrom(100)
        assert data.startswith(b"pong:")
        assert IP(src[0]) == IP(net.vip) and src[1] == 5353


def test_the_same_service_without_fullnat_fails_without_route_back(
        ipvs: IPVS, no_route_back: None,
        real_servers: dict[str, list[peers.HttpServer]]) -> None:
    # The control experiment: NAT needs the route FULLNAT does without.
    svc = Service(addr=IP(topology.VIP4), port=80, scheduler="rr")
    ipvs.add_service(svc)
    ipvs.add_dest(svc, Dest(addr=IP(topology.RS4["rs1"]), port=80, fwd=FwdMethod.MASQ))
    with pytest.raises(OSError):
        peers.http_get(topology.VIP4, timeout=3)


def test_without_laddrs_connections_are_refused_and_counted(
        ipvs: IPVS, real_servers: dict[str, list[peers.HttpServer]]) -> None:
    fullnat_service(ipvs, NETS["ipv4"], laddrs=())
    before = ipvs.ext_stats()["fullnat_no_laddr"]
    with pytest.raises(OSError):
        peers.http_get(topology.VIP4, timeout=3)
    assert ipvs.ext_stats()["fullnat_no_laddr"] > before


@pytest.mark.parametrize("family", FAMILIES)
def test_deleting_a_laddr_in_use_keeps_its_connections(
        ipvs: IPVS, no_route_back: None, real_servers: dict[str, list[peers.HttpServer]],
        family: str) -> None:
    net = NETS[family]
    svc = fullnat_service(ipvs, net, net.laddrs[:1], servers=("rs1",))
    fam = peers.family_of(net.vip)
    with netns.netns("client"):
        s = socket.socket(fam, socket.SOCK_STREAM)
    with s:
        s.settimeout(10)
        s.connect((net.vip, 80))
        (la,) = ipvs.laddrs(svc)
        assert la.conn_counts == 1

        ipvs.del_laddr(svc, IP(net.laddrs[0]))
        assert ipvs.laddrs(svc) == []

        # The established connection still works through the deleted laddr.
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    assert data.startswith(b"HTTP/1.0 200"), data
    assert f"peer={IP(net.laddrs[0])}".encode() in data or \
        f"peer={net.laddrs[0]}".encode() in data, data
    # New connections find no laddr now.
    with pytest.raises(OSError):
        peers.http_get(net.vip, timeout=3)
    # Adding it back makes the service work again.
    ipvs.add_laddr(svc, IP(net.laddrs[0]))
    assert peers.http_get(net.vip, timeout=10).server == "rs1"


def test_laddr_commands_report_errors(ipvs: IPVS) -> None:
    from ipvs_synproxy.kernel.netlink import AlreadyExists, NotFound
    svc = fullnat_service(ipvs, NETS["ipv4"], NETS["ipv4"].laddrs[:1])
    with pytest.raises(AlreadyExists):
        ipvs.add_laddr(svc, IP(NETS["ipv4"].laddrs[0]))
    with pytest.raises(NotFound):
        ipvs.del_laddr(svc, IP(NETS["ipv4"].laddrs[1]))
    ipvs.add_laddr(svc, IP(NETS["ipv6"].laddrs[0]))
    assert {la.addr for la in ipvs.laddrs(svc)} == {IP(NETS["ipv4"].laddrs[0]),
                                                    IP(NETS["ipv6"].laddrs[0])}


# ---- TOA: the client's address travels to the real server ---------------------------------


@pytest.fixture
def toa_ko(topo: None) -> Iterator[None]:
    """The real-server TOA module (kernel_patches/toa) loaded for the test."""
    assert not toa_is_loaded()
    insmod()
    yield
    remove_toa()


@pytest.mark.parametrize("family", FAMILIES)
def test_with_toa_ko_the_real_server_sees_the_client(
        ipvs: IPVS, no_route_back: None, real_servers: dict[str, list[peers.HttpServer]],
        toa_ko: None, family: str) -> None:
    net = NETS[family]
    fullnat_service(ipvs, net, net.laddrs[:2])
    before = ipvs.ext_stats()

    replies = [peers.http_get(net.vip, timeout=10) for _ in range(4)]

    for r in replies:
        assert IP(r.peer) == IP(net.client), r
        assert r.peer_port == r.local[1], r
    assert sorted({r.server for r in replies}) == ["rs1", "rs2"]
    after = ipvs.ext_stats()
    # SYN + handshake ACK + first data packet (the ACK had no payload)
    assert after["fullnat_toa_added"] - before["fullnat_toa_added"] >= 3 * len(replies)
    assert after["fullnat_toa_no_space"] == before["fullnat_toa_no_space"]


def _tcp_segments(frames: list[bytes], dport: int) -> list:
    from scapy.layers.inet import TCP
    from scapy.layers.l2 import Ether
    out = []
    for f in frames:
        pkt = Ether(f)
        if TCP in pkt and pkt[TCP].dport == dport:
            out.append(pkt)
    return out


def _toa_of(seg, version: int) -> tuple[int, str] | None:
    """(port, address) of the TOA option of a scapy TCP segment, None if absent."""
    from scapy.layers.inet import TCP
    raw = bytes(seg[TCP])
    hlen = (raw[12] >> 4) * 4
    opts, i = raw[20:hlen], 0
    while i < len(opts):
        kind = opts[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        length = opts[i + 1]
        if kind == TOA_KIND[version]:
            assert length == TOA_LEN[version], length
            port = struct.unpack("!H", opts[i + 2:i + 4])[0]
            addr = ipaddress.ip_address(opts[i + 4:i + length])
            return port, str(addr)
        i += max(length, 2)
    return None


@pytest.mark.parametrize("family", FAMILIES)
def test_toa_rides_on_the_syn_and_the_handshake_ack(
        ipvs: IPVS, no_route_back: None, real_servers: dict[str, list[peers.HttpServer]],
        family: str) -> None:
    from scapy.layers.inet import TCP
    net = NETS[family]
    fullnat_service(ipvs, net, net.laddrs[:1], servers=("rs1",))
    cap = Capture("rs1")
    try:
        reply = peers.http_get(net.vip, timeout=10)
        time.sleep(0.5)
    finally:
        frames = cap.stop()
    cport = reply.local[1]
    segs = _tcp_segments(frames, 80)
    assert segs, "nothing captured at rs1"
    syn = [s for s in segs if s[TCP].flags.S and not s[TCP].flags.A]
    acks = [s for s in segs if not s[TCP].flags.S and s[TCP].flags.A]
    assert syn and acks
    assert _toa_of(syn[0], net.version) == (cport, str(IP(net.client)))
    assert _toa_of(acks[0], net.version) == (cport, str(IP(net.client)))
    # The handshake ACK had no payload, so the first data packet carries it too.
    data = [s for s in acks if len(s[TCP].payload) > 0]
    assert data and _toa_of(data[0], net.version) == (cport, str(IP(net.client)))
    # Later packets do not.
    assert all(_toa_of(s, net.version) is None for s in acks if s is not acks[0]
               and s is not data[0])
    # The real server saw laddr:lport as the source.
    assert IP(syn[0].payload.src) == IP(net.laddrs[0])


def _client_mss(vip: str) -> int:
    fam = peers.family_of(vip)
    with netns.netns("client"):
        s = socket.socket(fam, socket.SOCK_STREAM)
    with s:
        s.settimeout(10)
        s.connect((vip, 80))
        return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_client_learns_an_mss_that_leaves_room_for_toa(
        ipvs: IPVS, no_route_back: None, real_servers: dict[str, list[peers.HttpServer]],
        family: str) -> None:
    net = NETS[family]
    fullnat_service(ipvs, net, net.laddrs[:1], servers=("rs1",))
    with lb_sysctls(fullnat_mss_adjust=0):
        plain = _client_mss(net.vip)
    before = ipvs.ext_stats()["fullnat_mss_adjusted"]
    adjusted = _client_mss(net.vip)
    assert plain - adjusted == TOA_LEN[net.version], (plain, adjusted)
    assert ipvs.ext_stats()["fullnat_mss_adjusted"] == before + 1
    with lb_sysctls(fullnat_toa=0):
        assert _client_mss(net.vip) == plain  # no TOA, no room needed


# ---- local port exhaustion ------------------------------------------------------------------


@contextmanager
def rs_listener(ns: str, addr: str, port: int) -> Iterator[socket.socket]:
    """A listener that never accepts: handshakes complete into its backlog."""
    with netns.netns(ns):
        s = socket.socket(peers.family_of(addr), socket.SOCK_STREAM)
    with s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, port))
        s.listen(4096)
        yield s


def connect_many(addr: str, port: int, n: int, deadline: float = 120.0
                 ) -> tuple[list[socket.socket], int, int]:
    """n concurrent non-blocking connects from ``client``; (sockets, ok, failed)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 512:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(hard, n + 512), max(hard, n + 512)))
    fam = peers.family_of(addr)
    with netns.netns("client"):
        socks = [socket.socket(fam, socket.SOCK_STREAM) for _ in range(n)]
    poller = select.poll()
    byfd = {}
    for s in socks:
        s.setblocking(False)
        s.connect_ex((addr, port))
        poller.register(s, select.POLLOUT)
        byfd[s.fileno()] = s
    ok = failed = 0
    end = time.monotonic() + deadline
    while byfd and time.monotonic() < end:
        for fd, _ev in poller.poll(500):
            s = byfd.pop(fd, None)
            if s is None:
                continue
            poller.unregister(fd)
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                ok += 1
            else:
                failed += 1
    return socks, ok, failed


@pytest.fixture
def quick_syn_timeout(topo: None) -> Iterator[None]:
    """Clients give up on an unanswered SYN after ~3 s instead of ~2 min."""
    old = netns.read_sysctl("client", "net.ipv4.tcp_syn_retries")
    netns.write_sysctl("client", "net.ipv4.tcp_syn_retries", 1)
    yield
    netns.write_sysctl("client", "net.ipv4.tcp_syn_retries", old)


def test_port_exhaustion_fails_cleanly_and_more_laddrs_fix_it(
        ipvs: IPVS, no_route_back: None, quick_syn_timeout: None) -> None:
    net = NETS["ipv4"]
    rs = net.rs["rs1"]
    n, lo, hi = 2000, 20000, 20999
    with lb_sysctls(fullnat_lport_min=lo, fullnat_lport_max=hi):
        # One laddr, 1,000 ports: the excess fails and is counted.
        svc = fullnat_service(ipvs, net, net.laddrs[:1], servers=("rs1",), port=8080)
        before = ipvs.ext_stats()
        with rs_listener("rs1", rs, 8080):
            socks, ok, failed = connect_many(net.vip, 8080, n)
            try:
                assert ok + failed == n, (ok, failed)
                assert 990 <= ok <= 1000, (ok, failed)
                (la,) = ipvs.laddrs(svc)
                assert la.conn_counts == ok
                assert la.port_conflict >= failed
                after = ipvs.ext_stats()
                assert after["fullnat_lport_exhausted"] - before["fullnat_lport_exhausted"] \
                    >= failed
                # one laddr: every refused connection is one search given up
                assert after["fullnat_lport_give_up"] - before["fullnat_lport_give_up"] \
                    == after["fullnat_lport_exhausted"] - before["fullnat_lport_exhausted"]
                assert after["fullnat_conn_new"] - before["fullnat_conn_new"] == ok
            finally:
                for s in socks:
                    s.close()
        ipvs.flush()

        # Four laddrs, 4,000 ports: every connection succeeds.
        svc = fullnat_service(ipvs, net, net.laddrs, servers=("rs1",), port=8081)
        before = ipvs.ext_stats()
        with rs_listener("rs1", rs, 8081):
            socks, ok, failed = connect_many(net.vip, 8081, n)
            try:
                assert (ok, failed) == (n, 0)
                counts = [la.conn_counts for la in ipvs.laddrs(svc)]
                assert sum(counts) == n and min(counts) > 0, counts
                assert ipvs.ext_stats()["fullnat_lport_exhausted"] == \
                    before["fullnat_lport_exhausted"]
            finally:
                for s in socks:
                    s.close()


def test_a_port_range_within_lport_tries_is_searched_whole(
        ipvs: IPVS, no_route_back: None, quick_syn_timeout: None) -> None:
    # 32 ports, fullnat_lport_tries 64 (the default): the search walks the whole
    # range, so every port freed anywhere in it is found and a connection is
    # refused only when all 32 are taken.
    net = NETS["ipv4"]
    rs = net.rs["rs1"]
    lo, hi = 30000, 30031
    with lb_sysctls(fullnat_lport_min=lo, fullnat_lport_max=hi, fullnat_lport_tries=64):
        svc = fullnat_service(ipvs, net, net.laddrs[:1], servers=("rs1",), port=8082)
        with rs_listener("rs1", rs, 8082):
            socks, ok, failed = connect_many(net.vip, 8082, 32)
            more: list[socket.socket] = []
            try:
                assert (ok, failed) == (32, 0)
                # Every other connection reset: CLOSE, its port free 10 s later.
                for s in socks[1::2]:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    s.close()
                assert wait_for(lambda: ipvs.laddrs(svc)[0].conn_counts == 16, 30), \
                    ipvs.laddrs(svc)
                before = ipvs.ext_stats()
                more, ok, failed = connect_many(net.vip, 8082, 16)
                assert (ok, failed) == (16, 0)
                assert ipvs.ext_stats()["fullnat_lport_give_up"] == \
                    before["fullnat_lport_give_up"]
                extra, ok, failed = connect_many(net.vip, 8082, 1, deadline=10)
                more += extra
                assert (ok, failed) == (0, 1)
                after = ipvs.ext_stats()
                assert after["fullnat_lport_give_up"] > before["fullnat_lport_give_up"]
                assert after["fullnat_lport_exhausted"] > before["fullnat_lport_exhausted"]
            finally:
                for s in socks + more:
                    s.close()


# ---- crafted packets ----------------------------------------------------------------------


def _tcp_bytes(sport: int, dport: int, opts: bytes, doff: int | None = None,
               payload: bytes = b"", flags: int = 0x02) -> bytes:
    """A TCP segment built byte by byte (scapy would tidy malformed options)."""
    hdr = struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, 0, flags, 64240, 0, 0) + opts
    off = doff if doff is not None else len(hdr) // 4
    return hdr[:12] + bytes([off << 4]) + hdr[13:] + payload


def _crafted(version: int, dport: int = 80) -> list[tuple[str, bytes]]:
    """(name, frame) pairs of SYNs that stress header and option parsing."""
    sport = iter(range(41000 + 500 * (version == 6), 42000))

    def syn(opts: bytes, doff: int | None = None, payload: bytes = b"") -> bytes:
        return eth_frame(version, _tcp_bytes(next(sport), dport, opts, doff, payload))

    full = (b"\x02\x04\x05\xb4" + b"\x04\x02" + b"\x08\x0a" + b"\0" * 8
            + b"\x01\x03\x03\x07" + b"\x01" * 20)          # 40 bytes, all used
    assert len(full) == 40
    forged = struct.pack("!BBH", TOA_KIND[version], TOA_LEN[version], 4242) + \
        IP("203.0.113.9" if version == 4 else "2001:db8:ff::9").packed
    forged_padded = forged + b"\x01" * (-len(forged) % 4)
    frames = [
        ("full option space", syn(full)),
        ("option length 0", syn(b"\x02\x00\x05\xb4" + b"\x01" * 4)),
        ("option length 1", syn(b"\x08\x01" + b"\x01" * 6)),
        ("option overruns header", syn(b"\x02\x04\x05\xb4\x08\x28\x00\x00")),
        ("option at odd offset overruns", syn(b"\x01\x02\x04\x05")),
        ("option kind without length", syn(b"\x01\x01\x01\x08")),
        ("data offset beyond packet", syn(b"", doff=15)),
        ("data offset beyond packet with payload", syn(b"", doff=15, payload=b"x" * 8)),
        ("data offset below 5", syn(b"", doff=3, payload=b"y" * 20)),
        ("forged TOA", syn(forged_padded)),
        ("forged TOA with bad length", syn(bytes([TOA_KIND[version], 3, 0, 0]))),
        ("full space with forged TOA", syn((forged_padded + b"\x01" * 40)[:40])),
        ("truncated TCP header",
         eth_frame(version, _tcp_bytes(next(sport), dport, b"")[:12], l4len=12)),
    ]
    return frames


@pytest.mark.parametrize("family", FAMILIES)
def test_crafted_syns_never_oops_and_are_counted(
        ipvs: IPVS, real_servers: dict[str, list[peers.HttpServer]],
        family: str) -> None:
    net = NETS[family]
    fullnat_service(ipvs, net, net.laddrs[:2])
    before = ipvs.ext_stats()
    frames = _crafted(net.version)
    for _round in range(3):
        send_frames([f for _, f in frames])
    time.sleep(1)
    after = ipvs.ext_stats()
    delta = {k: after[k] - before[k] for k in after}
    assert delta["fullnat_toa_no_space"] >= 3, delta
    assert delta["fullnat_bad_header"] >= 3, delta
    assert delta["fullnat_toa_scrubbed"] >= 3, delta
    # The balancer still forwards real traffic afterwards.
    assert peers.http_get(net.vip, timeout=10).server in ("rs1", "rs2")
    dmesg = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
    for bad in ("BUG:", "WARNING:", "Oops", "general protection"):
        assert bad not in dmesg


# ---- checksums on the wire ------------------------------------------------------------------

SIOCETHTOOL = 0x8946
ETHTOOL_GTXCSUM, ETHTOOL_STXCSUM = 0x16, 0x17


def _tx_csum(ns: str, ifname: str, on: bool | None = None) -> bool:
    """Read (and with ``on`` set) the device's TX checksum offload (SIOCETHTOOL)."""
    import ctypes
    import fcntl
    with netns.netns(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        cmd = ETHTOOL_GTXCSUM if on is None else ETHTOOL_STXCSUM
        val = ctypes.create_string_buffer(struct.pack("II", cmd, int(bool(on))))
        ifr = struct.pack("16sP", ifname.encode(), ctypes.addressof(val)).ljust(40, b"\0")
        fcntl.ioctl(s.fileno(), SIOCETHTOOL, ifr)
        return bool(struct.unpack("II", val.raw[:8])[1])


@contextmanager
def tx_csum_off(*devs: tuple[str, str]) -> Iterator[None]:
    old = {d: _tx_csum(*d) for d in devs}
    try:
        for d in devs:
            _tx_csum(*d, on=False)
            assert not _tx_csum(*d)
        yield
    finally:
        for d, v in old.items():
            _tx_csum(*d, on=v)


def _fold(s: int) -> int:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


def tcp_checksum_ok(frame: bytes) -> bool | None:
    """Whether the TCP (and IPv4 header) checksums of an Ethernet frame verify;
    None for frames that are not TCP."""
    ethertype = struct.unpack("!H", frame[12:14])[0]
    l3 = frame[14:]
    if ethertype == 0x0800:
        ihl = (l3[0] & 0xF) * 4
        if l3[9] != 6:
            return None
        if _fold(_sum16(l3[:ihl])) != 0xFFFF:
            return False
        total = struct.unpack("!H", l3[2:4])[0]
        seg = l3[ihl:total]
        pseudo = l3[12:20] + struct.pack("!BBH", 0, 6, len(seg))
    elif ethertype == 0x86DD:
        if l3[6] != 6:
            return None
        seg = l3[40:40 + struct.unpack("!H", l3[4:6])[0]]
        pseudo = l3[8:40] + struct.pack("!IxxxB", len(seg), 6)
    else:
        return None
    return _fold(_sum16(pseudo) + _sum16(seg)) == 0xFFFF


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("senders", ["offloaded", "software"])
def test_translated_packets_carry_valid_checksums(
        ipvs: IPVS, no_route_back: None, real_servers: dict[str, list[peers.HttpServer]],
        family: str, senders: str) -> None:
    # veth trusts checksums (CHECKSUM_UNNECESSARY), so a wrong one would go
    # unnoticed by the peers: verify every translated segment on the wire.
    # lb's devices compute checksums in software, so what we capture is final;
    # "software" senders hand lb finished checksums (the incremental update
    # path), "offloaded" ones partial ones (the pseudo-header path).
    net = NETS[family]
    fullnat_service(ipvs, net, net.laddrs[:1], servers=("rs1",))
    devs = [("lb", "eth0"), ("lb", "eth1")]
    if senders == "software":
        devs += [("client", "eth0"), ("rs1", "eth0")]
    with tx_csum_off(*devs):
        cap_rs, cap_client = Capture("rs1"), Capture("client")
        try:
            for _ in range(2):
                peers.http_get(net.vip, timeout=10)
            time.sleep(0.5)
        finally:
            to_rs, to_client = cap_rs.stop(), cap_client.stop()
    from scapy.layers.inet import TCP
    from scapy.layers.l2 import Ether
    in_segs = [f for f in to_rs if _tcp_segments([f], 80)]
    out_segs = [f for f in to_client
                if TCP in Ether(f) and Ether(f)[TCP].sport == 80]
    assert len(in_segs) >= 8 and len(out_segs) >= 8, (len(in_segs), len(out_segs))
    with_toa = [f for f in in_segs if _toa_of(Ether(f), net.version)]
    assert len(with_toa) >= 6  # SYN, ACK, data of each connection
    bad_in = [Ether(f).summary() for f in in_segs if not tcp_checksum_ok(f)]
    bad_out = [Ether(f).summary() for f in out_segs if not tcp_checksum_ok(f)]
    assert not bad_in and not bad_out, (bad_in, bad_out)


# ---- ICMP errors ----------------------------------------------------------------------------

RS1_MAC, LB_SERVER_MAC = "02:00:00:00:02:11", "02:00:00:00:02:01"


@contextmanager
def peer_recorder(ns: str, addr: str, port: int) -> Iterator[list[tuple[str, int]]]:
    """A listener that accepts and records each peer, keeping the connections."""
    peers_seen: list[tuple[str, int]] = []
    kept: list[socket.socket] = []
    with rs_listener(ns, addr, port) as lsock:
        lsock.settimeout(0.2)
        stop = threading.Event()

        def run() -> None:
            while not stop.is_set():
                try:
                    c, peer = lsock.accept()
                except (TimeoutError, OSError):
                    continue
                kept.append(c)
                peers_seen.append(peer[:2])

        t = threading.Thread(target=run, daemon=True)
        t.start()
        try:
            yield peers_seen
        finally:
            stop.set()
            t.join(5)
            for c in kept:
                c.close()


def _icmp_error(version: int, src: str, dst: str, inner_src: str, inner_dst: str,
                sport: int, dport: int, macs: tuple[str, str]) -> bytes:
    """A 'fragmentation needed' / 'packet too big' about a TCP segment."""
    from scapy.layers.inet import ICMP, TCP
    from scapy.layers.inet import IP as IPv4
    from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw
    tcp = TCP(sport=sport, dport=dport, flags="A", seq=1, ack=1)
    if version == 4:
        inner = bytes(IPv4(src=inner_src, dst=inner_dst) / tcp)[:28]
        pkt = IPv4(src=src, dst=dst) / ICMP(type=3, code=4, nexthopmtu=1280) / Raw(inner)
    else:
        inner = bytes(IPv6(src=inner_src, dst=inner_dst) / tcp)[:48]
        pkt = IPv6(src=src, dst=dst) / ICMPv6PacketTooBig(mtu=1280) / Raw(inner)
    return bytes(Ether(src=macs[0], dst=macs[1]) / pkt)


def _send_from(ns: str, frame: bytes) -> None:
    with netns.netns(ns):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    with s:
        s.bind(("eth0", 0))
        s.send(frame)


def _icmp_frames(frames: list[bytes], version: int) -> list:
    from scapy.layers.inet import ICMP
    from scapy.layers.inet6 import ICMPv6PacketTooBig
    from scapy.layers.l2 import Ether
    layer = ICMP if version == 4 else ICMPv6PacketTooBig
    return [Ether(f) for f in frames if layer in Ether(f)]


def _icmp_checksum_ok(pkt, version: int) -> bool:
    l3 = bytes(pkt.payload)
    if version == 4:
        ihl = (l3[0] & 0xF) * 4
        total = struct.unpack("!H", l3[2:4])[0]
        return _fold(_sum16(l3[:ihl])) == 0xFFFF and \
            _fold(_sum16(l3[ihl:total])) == 0xFFFF
    plen = struct.unpack("!H", l3[4:6])[0]
    msg = l3[40:40 + plen]
    pseudo = l3[8:40] + struct.pack("!IxxxB", len(msg), 58)
    return _fold(_sum16(pseudo) + _sum16(msg)) == 0xFFFF


def _inner(pkt, version: int) -> tuple[str, str, int, int]:
    l3 = bytes(pkt.payload)
    if version == 4:
        ihl = (l3[0] & 0xF) * 4
        inner = l3[ihl + 8:]
        iihl = (inner[0] & 0xF) * 4
        assert _fold(_sum16(inner[:iihl])) == 0xFFFF, "inner IP checksum"
        src, dst = str(IP(inner[12:16])), str(IP(inner[16:20]))
        sport, dport = struct.unpack("!HH", inner[iihl:iihl + 4])
    else:
        inner = l3[40 + 8:]
        src, dst = str(IP(inner[8:24])), str(IP(inner[24:40]))
        sport, dport = struct.unpack("!HH", inner[40:44])
    return src, dst, sport, dport


@pytest.mark.parametrize("family", FAMILIES)
def test_icmp_errors_are_translated_both_ways(
        ipvs: IPVS, no_route_back: None, family: str) -> None:
    net = NETS[family]
    v = net.version
    rs = net.rs["rs1"]
    fullnat_service(ipvs, net, net.laddrs[:1], servers=("rs1",), port=8090)
    # lb checksums in software, so captured checksums are final ones
    with tx_csum_off(("lb", "eth0"), ("lb", "eth1")), \
            peer_recorder("rs1", rs, 8090) as seen:
        with netns.netns("client"):
            c = socket.socket(peers.family_of(net.vip), socket.SOCK_STREAM)
        with c:
            c.settimeout(10)
            c.connect((net.vip, 8090))
            cport = c.getsockname()[1]
            assert wait_for(lambda: bool(seen), 10)
            laddr, lport = seen[0]
            assert IP(laddr) == IP(net.laddrs[0])
            before = ipvs.ext_stats()["fullnat_icmp"]

            # From the real server's side, about a segment laddr:lport -> rs:8090
            cap = Capture("client")
            try:
                _send_from("rs1", _icmp_error(v, rs, laddr, laddr, rs, lport, 8090,
                                              (RS1_MAC, LB_SERVER_MAC)))
                time.sleep(1)
            finally:
                got = _icmp_frames(cap.stop(), v)
            assert got, "no ICMP error reached the client"
            assert IP(got[0].payload.src) == IP(net.vip)
            assert IP(got[0].payload.dst) == IP(net.client)
            assert _icmp_checksum_ok(got[0], v)
            assert _inner(got[0], v) == (str(IP(net.client)), str(IP(net.vip)), cport, 8090)

            # From the client's side, about a segment vip:8090 -> client:cport
            cap = Capture("rs1")
            try:
                _send_from("client", _icmp_error(v, net.client, net.vip, net.vip,
                                                 net.client, 8090, cport,
                                                 (CLIENT_MAC, LB_MAC)))
                time.sleep(1)
            finally:
                got = _icmp_frames(cap.stop(), v)
            assert got, "no ICMP error reached the real server"
            assert IP(got[0].payload.src) == IP(laddr)
            assert IP(got[0].payload.dst) == IP(rs)
            assert _icmp_checksum_ok(got[0], v)
            assert _inner(got[0], v) == (str(IP(rs)), str(IP(laddr)), 8090, lport)
            assert ipvs.ext_stats()["fullnat_icmp"] == before + 2


@pytest.mark.parametrize("family", FAMILIES)
def test_a_client_side_icmp_error_with_a_bad_checksum_goes_no_further(
        ipvs: IPVS, no_route_back: None, family: str) -> None:
    """The balancer computes the ICMP checksum afresh after translating an
    error from the client's side: one that arrived corrupted must be dropped
    first, or it reaches the real server looking sound. The same error with
    its checksum intact gets through (the control)."""
    net = NETS[family]
    v = net.version
    rs = net.rs["rs1"]
    fullnat_service(ipvs, net, net.laddrs[:1], servers=("rs1",), port=8091)
    with peer_recorder("rs1", rs, 8091) as seen:
        with netns.netns("client"):
            c = socket.socket(peers.family_of(net.vip), socket.SOCK_STREAM)
        with c:
            c.settimeout(10)
            c.connect((net.vip, 8091))
            cport = c.getsockname()[1]
            assert wait_for(lambda: bool(seen), 10)
            good = _icmp_error(v, net.client, net.vip, net.vip, net.client, 8091, cport,
                               (CLIENT_MAC, LB_MAC))
            csum_at = 14 + (20 if v == 4 else 40) + 2
            bad = bytearray(good)
            bad[csum_at] ^= 0x5A
            for frame, arrives in ((bytes(bad), False), (good, True)):
                cap = Capture("rs1")
                try:
                    _send_from("client", frame)
                    time.sleep(1)
                finally:
                    got = _icmp_frames(cap.stop(), v)
                assert bool(got) == arrives, ("corrupted" if not arrives else "intact", got)


def _rs_segment(version: int, src: str, dst: str, seg: bytes, l4len: int | None = None
                ) -> bytes:
    """Ethernet frame rs1 -> lb (eth1) carrying seg with a correct checksum."""
    return eth_frame(version, seg, l4len, src=src, dst=dst, macs=(RS1_MAC, LB_SERVER_MAC))


@pytest.mark.parametrize("family", FAMILIES)
def test_crafted_replies_from_the_real_server_never_oops(
        ipvs: IPVS, no_route_back: None, family: str) -> None:
    net = NETS[family]
    v = net.version
    rs = net.rs["rs1"]
    fullnat_service(ipvs, net, net.laddrs[:1], servers=("rs1",), port=8090)
    with peer_recorder("rs1", rs, 8090) as seen:
        with netns.netns("client"):
            c = socket.socket(peers.family_of(net.vip), socket.SOCK_STREAM)
        with c:
            c.settimeout(10)
            c.connect((net.vip, 8090))
            assert wait_for(lambda: bool(seen), 10)
            laddr, lport = seen[0]
            before = ipvs.ext_stats()
            synack, ack = 0x12, 0x10
            mss = b"\x02\x04\x05\xb4"
            cases = [
                _tcp_bytes(8090, lport, mss, flags=synack),
                _tcp_bytes(8090, lport, b"\x01" + mss + b"\x01\x01\x01", flags=synack),
                _tcp_bytes(8090, lport, b"\x02\x04\x00\x04", flags=synack),  # MSS 4
                _tcp_bytes(8090, lport, b"\x02\x00\x05\xb4", flags=synack),  # len 0
                _tcp_bytes(8090, lport, b"\x02\x28\x05\xb4", flags=synack),  # overrun
                _tcp_bytes(8090, lport, b"\x01\x01\x01\x02", flags=synack),  # no len
                _tcp_bytes(8090, lport, b"\x01" * 40, flags=synack),
                _tcp_bytes(8090, lport, b"", doff=15, flags=synack),
                _tcp_bytes(8090, lport, b"", doff=2, payload=b"z" * 16, flags=ack),
            ]
            frames = [_rs_segment(v, rs, laddr, seg) for seg in cases]
            frames.append(_rs_segment(v, rs, laddr, _tcp_bytes(8090, lport, b"")[:10],
                                      l4len=10))
            for _ in range(3):
                for f in frames:
                    _send_from("rs1", f)
            time.sleep(1)
            after = ipvs.ext_stats()
            assert after["fullnat_bad_header"] - before["fullnat_bad_header"] >= 6
            assert after["fullnat_mss_adjusted"] - before["fullnat_mss_adjusted"] >= 3
            # the connection itself still works
            c.sendall(b"ping")


@contextmanager
def digest_server(ns: str, addr: str, port: int, size: int) -> Iterator[None]:
    """Accepts one connection, reads ``size`` bytes, answers their SHA-256."""
    import hashlib
    with rs_listener(ns, addr, port) as lsock:
        lsock.settimeout(30)

        def run() -> None:
            with contextlib.suppress(OSError):
                c, _ = lsock.accept()
                with c:
                    c.settimeout(30)
                    h, got = hashlib.sha256(), 0
                    while got < size:
                        chunk = c.recv(65536)
                        if not chunk:
                            break
                        h.update(chunk)
                        got += len(chunk)
                    c.sendall(h.hexdigest().encode())

        t = threading.Thread(target=run, daemon=True)
        t.start()
        yield
        t.join(30)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_large_first_write_arrives_intact_with_toa(
        ipvs: IPVS, no_route_back: None, family: str) -> None:
    # The client's first data packet is a GSO super-packet here (veth TSO):
    # TOA goes into its header and must survive segmentation at lb, which
    # segments and checksums in software so the capture shows final bytes.
    import hashlib
    net = NETS[family]
    rs = net.rs["rs1"]
    size = 256 * 1024
    payload = os.urandom(size)
    fullnat_service(ipvs, net, net.laddrs[:1], servers=("rs1",), port=8091)
    before = ipvs.ext_stats()
    with tx_csum_off(("lb", "eth0"), ("lb", "eth1")), digest_server("rs1", rs, 8091, size):
        cap = Capture("rs1")
        try:
            with netns.netns("client"):
                c = socket.socket(peers.family_of(net.vip), socket.SOCK_STREAM)
            with c:
                c.settimeout(30)
                c.connect((net.vip, 8091))
                c.sendall(payload)
                reply = c.recv(100)
            time.sleep(0.5)
        finally:
            frames = cap.stop()
    assert reply.decode() == hashlib.sha256(payload).hexdigest()
    segs = [f for f in frames if _tcp_segments([f], 8091)]
    assert segs
    bad = [i for i, f in enumerate(segs) if not tcp_checksum_ok(f)]
    assert not bad, f"{len(bad)} of {len(segs)} segments with bad checksums"
    assert ipvs.ext_stats()["fullnat_toa_added"] - before["fullnat_toa_added"] >= 3


# ---- module unload --------------------------------------------------------------------------


def _ipvs_modules() -> list[str]:
    with open("/proc/modules") as f:
        return [ln.split()[0] for ln in f if ln.startswith("ip_vs")]


def test_unloading_with_live_connections_and_deleted_laddrs_frees_everything(
        topo: None, no_route_back: None,
        real_servers: dict[str, list[peers.HttpServer]]) -> None:
    # Runs last in this file: it unloads the patched modules and loads them again.
    socks = []
    with IPVS(netns="lb") as ipvs:
        ipvs.flush()
        for family in FAMILIES:
            net = NETS[family]
            svc = fullnat_service(ipvs, net, net.laddrs[:2])
            for _ in range(2):
                with netns.netns("client"):
                    s = socket.socket(peers.family_of(net.vip), socket.SOCK_STREAM)
                s.settimeout(10)
                s.connect((net.vip, 80))
                socks.append(s)
            # a laddr that is gone from the pool but still used by a connection
            ipvs.del_laddr(svc, IP(net.laddrs[0]))
            ipvs.del_laddr(svc, IP(net.laddrs[1]))
        ipvs.flush()
    try:
        mods = _ipvs_modules()
        assert "ip_vs" in mods
        others = [m for m in mods if m != "ip_vs"]
        res = subprocess.run(["rmmod", *others, "ip_vs"], capture_output=True, text=True,
                             check=False)
        assert res.returncode == 0, res.stderr
        assert _ipvs_modules() == []
        dmesg = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
        assert "Objects remaining" not in dmesg, dmesg[-2000:]
    finally:
        for s in socks:
            s.close()
        subprocess.run(["modprobe", "ip_vs"], check=True)
    with IPVS(netns="lb") as ipvs:
        assert ipvs.services() == []
        assert set(ipvs.ext_stats()) == set(ext_stats_file())
