"""The PROXY protocol header for FULLNAT real servers (issue #21).

A FULLNAT real server with ``proxy_protocol`` v1 or v2 (netlink
IPVS_DEST_ATTR_PROXY_PROTOCOL) finds, at the start of the client's byte
stream, the header the PROXY protocol specification defines: the client's
address and port and the VIP's. The balancer inserts it in front of the
client's first segment (the handshake's ACK, which then carries it even when
the client never sends data) and from then on moves the client's sequence
numbers up by its length towards the server and the server's ACK numbers and
SACK edges down by it towards the client; until the server acknowledges it,
every client segment at ISN+1 carries it again.

What is checked, each against the real kernel in the guest:

* Debian's nginx (rs1) and HAProxy (rs2), configured to *require* the header,
  answer and log the client's true address and port for HTTP requests through
  the FULLNAT VIPs: IPv4 and IPv6, v1 and v2, SYN proxy on and off.
  Without the option the same nginx and HAProxy refuse every request.
* A raw server records the first bytes of each connection: they are, byte for
  byte, the header built here with ``struct`` from the client's socket and the
  VIP, followed by exactly what the client sent (nothing, for a client that
  sends nothing); the parser of ``proxy_servers`` reads the same fields.
* 50 MB uploads and downloads through a v2 service with the SYN proxy arrive
  intact under loss on the client's link, and the captures at the client and
  at the real server show the SACK blocks and ACK numbers translated exactly.
* The header's segment dropped once on the way to the real server is sent
  again (``fullnat_proxy_resent``), and the server gets it exactly once.
* A header sent twice (the client's data at ISN+1 before the server's ACK of
  the first copy) makes the server send a D-SACK of the header's bytes; the
  client never sent those, so no SACK block it receives may stand for them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ipvs_synproxy.kernel.model import Dest, FwdMethod, ProxyProtocol, Service
from ipvs_synproxy.kernel.netlink import IPVS
from ipvs_synproxy_testbed import netns
from ipvs_synproxy_testbed.transfer import (
    MB,
    XFER,
    expected_digest,
    recv_digest,
    recv_exact,
    send_blob,
)
from tests.vm.helpers import (
    FAMILIES,
    IP,
    NETS,
    SYN,
    Net,
    ext_stats_file,
    lb_sysctls,
    netem,
    sack_blocks,
    tcp_head,
    wait_for,
)
from tests.vm.proxy_servers import (
    V2_SIGNATURE,
    Haproxy,
    Nginx,
    ProxyBlobProcess,
    Recorder,
    parse,
)

VERSIONS = {"v1": ProxyProtocol.V1, "v2": ProxyProtocol.V2}
SYNPROXY = {"synproxy": True, "no-synproxy": False}
HTTP_PORT = 80          # nginx in rs1, HAProxy in rs2
RAW_PORT = 9000         # the Recorder in rs1
BLOB_PORT = 8088        # the ProxyBlobServer in rs1
SERVER_OF = {"nginx": "rs1", "haproxy": "rs2"}
REQUEST = b"GET / HTTP/1.0\r\nHost: vip\r\n\r\n"
COUNTERS = ("fullnat_proxy_sent", "fullnat_proxy_resent", "fullnat_proxy_nomem",
            "fullnat_proxy_oversize")


# ---- the header as the specification spells it -------------------------------------------


def expected_header(version: ProxyProtocol, client: str, cport: int, vip: str,
                    vport: int) -> bytes:
    """The header a real server must get, built from the specification's
    layout (independently of ``proxy_servers.parse``)."""
    src, dst = ipaddress.ip_address(client), ipaddress.ip_address(vip)
    if version is ProxyProtocol.OFF:
        return b""
    if version is ProxyProtocol.V1:
        proto = "TCP4" if src.version == 4 else "TCP6"
        return f"PROXY {proto} {src} {dst} {cport} {vport}\r\n".encode("ascii")
    fam, length = (0x11, 12) if src.version == 4 else (0x21, 36)
    return (b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"
            + struct.pack("!BBH", 0x21, fam, length)
            + src.packed + dst.packed + struct.pack("!HH", cport, vport))


def test_the_parser_reads_the_specifications_examples() -> None:
    """The parser itself, on headers built above and on broken ones (no guest
    state involved: it must be right before it judges the kernel)."""
    h = parse(expected_header(ProxyProtocol.V2, "198.51.100.2", 50123, "198.51.100.10", 80)
              + b"GET /")
    assert (h.version, h.family, h.src, h.dst, h.sport, h.dport, h.length) == \
        (2, "TCP4", "198.51.100.2", "198.51.100.10", 50123, 80, 28)
    h = parse(expected_header(ProxyProtocol.V2, "2001:db8:1::2", 1, "2001:db8:1::10", 65535))
    assert (h.family, h.src, h.dst, h.sport, h.dport, h.length) == \
        ("TCP6", "2001:db8:1::2", "2001:db8:1::10", 1, 65535, 52)
    h = parse(b"PROXY TCP6 2001:db8:1::2 2001:db8:1::10 50000 80\r\nx")
    assert (h.version, h.src, h.sport, h.length) == (1, "2001:db8:1::2", 50000, 50)
    assert V2_SIGNATURE == b"\r\n\r\n\0\r\nQUIT\n"
    for broken in (b"PROXY TCP4 198.51.100.2 198.51.100.10 050000 80\r\n",
                   b"PROXY TCP4 2001:db8:1::2 198.51.100.10 5 80\r\n",
                   b"PROXY UNKNOWN\r\n", b"GET / HTTP/1.0\r\n\r\n",
                   V2_SIGNATURE + b"\x20\x11\x00\x0c" + bytes(12),
                   V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12),
                   V2_SIGNATURE + b"\x21\x11\x00\x0f" + bytes(15)):
        with pytest.raises(ValueError):
            parse(broken)


# ---- the servers and the service ----------------------------------------------------------


@pytest.fixture(scope="module")
def servers(topo: None, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[dict[str, Nginx | Haproxy]]:
    """nginx in rs1 and HAProxy in rs2, both requiring the header on port 80."""
    tmp = tmp_path_factory.mktemp("proxy")
    started: dict[str, Nginx | Haproxy] = {}
    try:
        for name, cls in (("nginx", Nginx), ("haproxy", Haproxy)):
            rs = SERVER_OF[name]
            started[name] = cls(rs, (NETS["ipv4"].rs[rs], NETS["ipv6"].rs[rs]), HTTP_PORT,
                                tmp)
        yield started
    finally:
        for srv in started.values():
            srv.close()


@pytest.fixture(scope="module")
def recorders(topo: None) -> Iterator[dict[str, Recorder]]:
    """Recorders on port 9000 of rs1, v4 and v6."""
    rec = {f: Recorder("rs1", NETS[f].rs["rs1"], RAW_PORT) for f in FAMILIES}
    yield rec
    for r in rec.values():
        r.close()


def pp_service(ipvs: IPVS, net: Net, version: ProxyProtocol, *, port: int,
               rs: str = "rs1", synproxy: bool = True) -> Service:
    """A FULLNAT service VIP:port to port of one real server with the PROXY
    protocol ``version``, all of the family's laddrs."""
    svc = Service(addr=IP(net.vip), port=port, scheduler="rr", synproxy=synproxy)
    ipvs.add_service(svc)
    ipvs.add_dest(svc, Dest(addr=IP(net.rs[rs]), port=port, fwd=FwdMethod.FULLNAT, weight=1,
                            proxy_protocol=version))
    for laddr in net.laddrs:
        ipvs.add_laddr(svc, IP(laddr))
    (dest,) = ipvs.dests(svc)
    assert dest.proxy_protocol is version, f"the kernel keeps {dest.proxy_protocol}"
    return svc


def counters() -> dict[str, int]:
    stats = ext_stats_file()
    missing = [c for c in COUNTERS if c not in stats]
    assert not missing, f"lb's ip_vs_ext_stats has no {missing}"
    return stats


def moved(before: dict[str, int]) -> dict[str, int]:
    now = ext_stats_file()
    return {k: v - before.get(k, 0) for k, v in now.items() if v != before.get(k, 0)}


def http_request(net: Net, port: int = HTTP_PORT, timeout: float = 20) -> tuple[int, bytes]:
    """One HTTP/1.0 GET from the client to the VIP: its source port and the
    raw reply (b"" when the server closed or reset without one)."""
    s = netns.socket_in("client", socket.AF_INET6 if net.version == 6 else socket.AF_INET,
                        socket.SOCK_STREAM)
    with s:
        s.settimeout(timeout)
        s.connect((net.vip, port))
        cport = s.getsockname()[1]
        data = b""
        with contextlib.suppress(ConnectionError):
            s.sendall(REQUEST)
            while chunk := s.recv(65536):
                data += chunk
        if not data:
            # nothing came back: a RST, so that no orphan lingers into later tests
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return cport, data


def _same_addr(a: str, b: str) -> bool:
    return ipaddress.ip_address(a) == ipaddress.ip_address(b)


# ---- nginx and HAProxy --------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("server", ["nginx", "haproxy"])
def test_the_servers_require_the_header(servers: dict[str, Nginx | Haproxy],
                                        server: str, family: str) -> None:
    """The servers themselves, without IPVS: from lb's own address straight to
    the server, a hand-made v2 header (claiming the client's address and a
    port) is believed; a request without one is refused. This is what the
    tests below rely on."""
    net, rs = NETS[family], SERVER_OF[server]
    fam = socket.AF_INET6 if net.version == 6 else socket.AF_INET
    for header, ok in ((expected_header(ProxyProtocol.V2, net.client, 4242, net.vip, 80), True),
                       (expected_header(ProxyProtocol.V1, net.client, 4243, net.vip, 80), True),
                       (b"", False)):
        s = netns.socket_in("lb", fam, socket.SOCK_STREAM)
        with s:
            s.settimeout(20)
            s.connect((net.rs[rs], HTTP_PORT))
            data = b""
            with contextlib.suppress(ConnectionError):
                s.sendall(header + REQUEST)
                while chunk := s.recv(65536):
                    data += chunk
        if ok:
            assert data.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")), data
            fields = data.partition(b"\r\n\r\n")[2].decode().split()
            port = 4242 if header.startswith(V2_SIGNATURE) else 4243
            assert _same_addr(fields[0], net.client) and fields[1] == str(port), fields
            assert _same_addr(fields[2], net.vip) and fields[3] == "80", fields
        else:
            assert not data.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")), data


@pytest.mark.parametrize("synproxy", SYNPROXY)
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("server", ["nginx", "haproxy"])
def test_the_server_logs_the_clients_true_address(
        ipvs: IPVS, servers: dict[str, Nginx | Haproxy], server: str, family: str,
        version: str, synproxy: str) -> None:
    """Requests through the VIP: the server answers and logs the client's
    address and source port and the VIP's (nginx also the TCP peer it sees:
    a laddr, so the connection really came through FULLNAT)."""
    net, srv = NETS[family], servers[server]
    pp_service(ipvs, net, VERSIONS[version], port=HTTP_PORT, rs=SERVER_OF[server],
               synproxy=SYNPROXY[synproxy])
    before = counters()
    for _ in range(2):
        logged = len(srv.log_lines())
        cport, data = http_request(net)
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")), \
            f"{server} refused the request from port {cport}: {data[:300]!r}; " \
            f"counters moved: {moved(before)}; {server} says: {srv.errors()[-1500:]}"
        want = [net.client, str(cport), net.vip, str(HTTP_PORT)]
        answered = body.decode().split()
        assert wait_for(lambda n=logged: len(srv.log_lines()) > n, 20), \
            f"{server} logged nothing for the request from port {cport}"
        log = srv.log_lines()[-1].split()
        for seen in (answered, log):
            assert _same_addr(seen[0], want[0]) and seen[1] == want[1], (seen, want)
            assert _same_addr(seen[2], want[2]) and seen[3] == want[3], (seen, want)
        if server == "nginx":
            assert IP(answered[4]) in {IP(a) for a in net.laddrs}, answered
    moves = moved(before)
    assert moves.get("fullnat_proxy_sent") == 2, moves
    assert not moves.get("fullnat_proxy_nomem") and not moves.get("fullnat_proxy_oversize")
    if SYNPROXY[synproxy]:
        assert moves.get("synproxy_conn_proxied", 0) == 2, moves


@pytest.mark.parametrize("synproxy", SYNPROXY)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("server", ["nginx", "haproxy"])
def test_without_the_option_the_server_refuses_the_request(
        ipvs: IPVS, servers: dict[str, Nginx | Haproxy], server: str, family: str,
        synproxy: str) -> None:
    """The control experiment: the same service with proxy_protocol off. The
    servers require the header, so the request fails: the test above passes
    only because the balancer sent one."""
    net, srv = NETS[family], servers[server]
    pp_service(ipvs, net, ProxyProtocol.OFF, port=HTTP_PORT, rs=SERVER_OF[server],
               synproxy=SYNPROXY[synproxy])
    before = counters()
    errors = len(srv.errors())
    _cport, data = http_request(net)
    assert not data.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")), data
    assert moved(before).get("fullnat_proxy_sent", 0) == 0
    if server == "nginx":
        assert wait_for(lambda: "broken header" in srv.errors()[errors:], 10), \
            srv.errors()[errors:]


# ---- byte for byte ------------------------------------------------------------------------


def _one_stream(rec: Recorder, start: int) -> bytearray:
    assert wait_for(lambda: len(rec.streams) > start, 20), "the real server accepted nothing"
    assert len(rec.streams) == start + 1, f"{len(rec.streams) - start} connections"
    return rec.streams[start]


def _client_socket(net: Net) -> socket.socket:
    s = netns.socket_in("client", socket.AF_INET6 if net.version == 6 else socket.AF_INET,
                        socket.SOCK_STREAM)
    s.settimeout(20)
    return s


@pytest.mark.parametrize("synproxy", SYNPROXY)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("client", "version"), [
    ("speaks", "v2"), ("speaks", "v1"), ("silent", "v2"), ("silent", "v1"),
    ("speaks", "off")])
def test_the_stream_starts_with_the_header_byte_for_byte(
        ipvs: IPVS, recorders: dict[str, Recorder], client: str, version: str, family: str,
        synproxy: str) -> None:
    """What the real server reads is the header built here from the client's
    socket and the VIP, then exactly the client's bytes: a client that sends
    data (two writes), and a silent one, whose header comes with the
    handshake's ACK. ``off`` is the control: the client's bytes alone."""
    net, rec = NETS[family], recorders[family]
    pp = ProxyProtocol.OFF if version == "off" else VERSIONS[version]
    pp_service(ipvs, net, pp, port=RAW_PORT, synproxy=SYNPROXY[synproxy])
    start, before = len(rec.streams), counters()
    payload = b"" if client == "silent" else b"hello, real server\n" + bytes(range(256))
    s = _client_socket(net)
    with s:
        s.connect((net.vip, RAW_PORT))
        cport = s.getsockname()[1]
        if payload:
            s.sendall(payload[:7])
            s.sendall(payload[7:])
        want = expected_header(pp, net.client, cport, net.vip, RAW_PORT) + payload
        stream = _one_stream(rec, start)
        arrived = wait_for(lambda: len(stream) >= len(want), 20)
        time.sleep(0.3)          # anything more (a second header) would come now
        got = bytes(stream)
    assert arrived and got == want, \
        f"expected {want[:120]!r}, the server read {got[:160]!r}; counters: {moved(before)}"
    if pp is not ProxyProtocol.OFF:
        head = parse(got)
        assert (head.version, head.family) == (int(pp), f"TCP{net.version}")
        assert (head.src, head.sport) == (str(IP(net.client)), cport)
        assert (head.dst, head.dport) == (str(IP(net.vip)), RAW_PORT)
        assert got[head.length:] == payload
        assert IP(rec.peers[start][0]) in {IP(a) for a in net.laddrs}
    assert moved(before).get("fullnat_proxy_sent", 0) == (0 if pp is ProxyProtocol.OFF else 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_in_defer_mode_the_header_precedes_the_first_data(
        ipvs: IPVS, recorders: dict[str, Recorder], family: str) -> None:
    """synproxy_defer=1: the real server side opens only with the client's
    first data; the header still comes first, exactly once."""
    net, rec = NETS[family], recorders[family]
    pp_service(ipvs, net, ProxyProtocol.V2, port=RAW_PORT)
    start, before = len(rec.streams), counters()
    with lb_sysctls(synproxy_defer=1):
        s = _client_socket(net)
        with s:
            s.connect((net.vip, RAW_PORT))
            cport = s.getsockname()[1]
            time.sleep(0.5)
            s.sendall(b"first words")
            want = expected_header(ProxyProtocol.V2, net.client, cport, net.vip, RAW_PORT) \
                + b"first words"
            stream = _one_stream(rec, start)
            assert wait_for(lambda: len(stream) >= len(want), 20)
            time.sleep(0.3)
            assert bytes(stream) == want, (bytes(stream), moved(before))
    assert moved(before).get("fullnat_proxy_sent") == 1


# ---- the header's segment lost ------------------------------------------------------------

FIRST_BYTES = {ProxyProtocol.V1: "@ih,0,48 0x50524f585920",        # "PROXY "
               ProxyProtocol.V2: "@ih,0,96 0x0d0a0d0a000d0a515549540a"}


@contextmanager
def drop_first_header(version: ProxyProtocol, port: int) -> Iterator[Callable[[], int]]:
    """rs1 drops the first segment that starts with a PROXY header, once per
    balancer port (set ``once`` remembers the ports); yields a function
    returning how many it dropped."""
    match = f"tcp dport {port} {FIRST_BYTES[version]}"
    script = f"""table inet pp {{
    counter dropped {{ }}
    set once {{ type inet_service; flags dynamic; }}
    chain c {{
        type filter hook input priority 0; policy accept;
        {match} tcp sport @once accept
        {match} add @once {{ tcp sport }} counter name "dropped" drop
    }}
}}
"""
    res = subprocess.run(["ip", "netns", "exec", "rs1", "nft", "-f", "-"], input=script,
                         text=True, capture_output=True, check=False)
    assert res.returncode == 0, f"nft: {res.stderr}"

    def dropped() -> int:
        out = netns.run("rs1", ["nft", "list", "counter", "inet", "pp", "dropped"]).stdout
        return int(out.split("packets")[1].split()[0])

    try:
        yield dropped
    finally:
        subprocess.run(["ip", "netns", "exec", "rs1", "nft", "delete", "table", "inet", "pp"],
                       check=False)


@pytest.mark.parametrize("synproxy", SYNPROXY)
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("client", ["speaks", "silent"])
def test_a_lost_header_is_sent_again(
        ipvs: IPVS, recorders: dict[str, Recorder], client: str, family: str,
        version: str, synproxy: str) -> None:
    """The first segment carrying the header is dropped at rs1 (it reaches
    rs1's interface, not its TCP). The server has acknowledged nothing, so the
    next client segment at ISN+1 carries the header again: the client's data,
    or, from a silent client, its ACK to the server's retransmitted SYN/ACK.
    The server reads the header exactly once, then the client's bytes."""
    net, rec, pp = NETS[family], recorders[family], VERSIONS[version]
    pp_service(ipvs, net, pp, port=RAW_PORT, synproxy=SYNPROXY[synproxy])
    start, before = len(rec.streams), counters()
    payload = b"" if client == "silent" else b"data behind the header"
    with drop_first_header(pp, RAW_PORT) as dropped:
        s = _client_socket(net)
        with s:
            s.connect((net.vip, RAW_PORT))
            cport = s.getsockname()[1]
            if payload:
                s.sendall(payload)
            want = expected_header(pp, net.client, cport, net.vip, RAW_PORT) + payload
            arrived = wait_for(lambda: len(rec.streams) > start
                               and len(rec.streams[start]) >= len(want), 30)
            time.sleep(0.3)
            got = bytes(rec.streams[start]) if len(rec.streams) > start else None
            n_dropped = dropped()
    moves = moved(before)
    assert n_dropped == 1, f"rs1 dropped {n_dropped} header segments (the test needs one)"
    assert arrived and got == want, \
        f"expected {want!r}, the server read {got!r}; counters moved: {moves}"
    assert len(rec.streams) == start + 1
    assert moves.get("fullnat_proxy_sent") == 1, moves
    assert moves.get("fullnat_proxy_resent", 0) >= 1, moves


# ---- 50 MB under loss, and the SACK edges -------------------------------------------------


@pytest.fixture(scope="module")
def blob(topo: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyBlobProcess]:
    """PROXY-taking blob servers on port 8088 of rs1 (v4 and v6), in a child process."""
    log = tmp_path_factory.mktemp("blob") / "headers.log"
    proc = ProxyBlobProcess([("rs1", NETS[f].rs["rs1"]) for f in FAMILIES], BLOB_PORT, log)
    yield proc
    proc.close()


@contextmanager
def tcpdump(ns: str, path: Path, expr: str) -> Iterator[None]:
    """Headers (128 bytes) of the frames on ns's eth0 while the block runs."""
    proc = subprocess.Popen(["ip", "netns", "exec", ns, "tcpdump", "-i", "eth0", "-s", "128",
                             "-U", "-w", str(path), expr],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        proc.stderr.readline()          # "listening on eth0 ..."
        yield
    finally:
        time.sleep(0.5)
        proc.terminate()
        proc.wait(10)


def blob_transfer(net: Net, direction: str, n: int) -> int:
    """A checked transfer through VIP:8088 (sha256 compared); the client's port."""
    s = netns.socket_in("client", socket.AF_INET6 if net.version == 6 else socket.AF_INET,
                        socket.SOCK_STREAM)
    with s:
        s.settimeout(300)
        s.connect((net.vip, BLOB_PORT))
        cport = int(s.getsockname()[1])
        if direction == "download":
            s.sendall(b"D" + struct.pack("!Q", n))
            digest = recv_digest(s, n)
        else:
            s.sendall(b"U" + struct.pack("!Q", n))
            send_blob(s, n)
            digest = recv_exact(s, 32).hex()
        assert digest == expected_digest(n), f"the {direction} of {n} bytes arrived changed"
    return cport


Seg = tuple[int, int, int, int, int, int, list[tuple[int, int]]]   # sport dport seq ack flags len


def segments(pcap: Path) -> list[Seg]:
    """(sport, dport, seq, ack, flags, payload length, SACK blocks) of every
    TCP frame in the capture, read from the headers (a 50 MB capture is too
    long for scapy's dissectors under TCG)."""
    from scapy.utils import RawPcapReader

    out = []
    for frame, _meta in RawPcapReader(str(pcap)):
        h = tcp_head(frame)
        if h is not None:
            out.append((h.sport, h.dport, h.seq, h.ack, h.flags, h.payload,
                        sack_blocks(h.options)))
    return out


def _syn(segs: list[Seg], sport: int | None = None, dport: int | None = None,
         synack: bool = False) -> Seg:
    for s in segs:
        if s[4] & (SYN | 0x10) == (SYN | (0x10 if synack else 0)) \
                and (sport is None or s[0] == sport) and (dport is None or s[1] == dport):
            return s
    raise AssertionError(f"no {'SYN/ACK' if synack else 'SYN'} in the capture")


M32 = 1 << 32


def blocks_outside_the_clients_data(csegs: list[Seg], cport: int
                                    ) -> list[tuple[int, int, int]]:
    """SACK blocks the client received (relative to its ISN, with what it had
    sent by then) that are empty or not inside the bytes it had sent: the
    client's own numbers start at ISN + 1, and no block may cover a byte of the
    header, which the client never sent."""
    isn = _syn(csegs, sport=cport)[2]
    sent_end, outside = 0, []
    for s in csegs:
        if s[0] == cport and not s[4] & SYN:
            # a FIN takes a sequence number too
            sent_end = max(sent_end, (s[2] + s[5] + (s[4] & 1) - isn) % M32)
        elif s[1] == cport:
            outside += [((le - isn) % M32, (ri - isn) % M32, sent_end) for le, ri in s[6]
                        if not 0 < (le - isn) % M32 < (ri - isn) % M32 <= sent_end]
    return outside


def check_translation(client_pcap: Path, rs_pcap: Path, cport: int, hlen: int,
                      direction: str) -> str:
    """Compares the two captures of one connection; returns a summary line.

    Sequence spaces: the real server reads the client's byte k at
    client_isn + 1 + k + off + hlen (off: what the balancer's SYN to the real
    server changed in the ISN; hlen: the header in front). So every SACK block
    and ACK number the client receives must be one the real server sent, moved
    down by off + hlen: untranslated SACK edges would arrive hlen bytes too
    high (and every ACK), which no block the real server sent matches (a
    mutation check of this function with hlen 0, 27 and 29 fails it on both
    the SACK blocks of an upload and the ACKs of a download). Towards
    the real server, the client's SACK blocks (about the server's data) move
    by the SYN proxy's delta alone (no header in that direction).
    """
    csegs = [s for s in segments(client_pcap) if cport in (s[0], s[1])]
    c_syn = _syn(csegs, sport=cport)
    v_synack = _syn(csegs, dport=cport, synack=True)
    rsegs_all = segments(rs_pcap)
    r_syn = _syn(rsegs_all, dport=BLOB_PORT)
    lport = r_syn[0]
    rsegs = [s for s in rsegs_all if lport in (s[0], s[1])]
    syns = {s[0] for s in rsegs_all if s[1] == BLOB_PORT and s[4] & SYN}
    assert syns == {lport}, f"the real server saw SYNs from ports {syns}"
    r_synack = _syn(rsegs, sport=BLOB_PORT, synack=True)
    off = (r_syn[2] - c_syn[2]) % M32          # client seq -> server seq (before the header)
    soff = (v_synack[2] - r_synack[2]) % M32   # server seq -> client seq

    # towards the client: the server's SACK blocks and ACKs, down by off + hlen;
    # a number inside the header (a D-SACK of a header sent twice) stands for
    # the client's ISN + 1, where its own bytes begin
    first = (c_syn[2] + 1) % M32

    def to_client(seq: int) -> int:
        rel = (seq - off - first) % M32          # from the start of the server's stream
        if rel >= M32 // 2:                      # before it (the ISN)
            return (seq - off) % M32
        return (first + max(rel - hlen, 0)) % M32

    rs_blocks = {(to_client(le), to_client(ri))
                 for s in rsegs if s[0] == BLOB_PORT for le, ri in s[6]}
    rs_acks = {to_client(s[3]) for s in rsegs if s[0] == BLOB_PORT and not s[4] & SYN}
    got_blocks = [b for s in csegs if s[1] == cport for b in s[6]]
    got_acks = {s[3] for s in csegs if s[1] == cport and not s[4] & SYN}
    # and inside what the client had sent when it received them
    isn, outside = c_syn[2], blocks_outside_the_clients_data(csegs, cport)
    strangers = [b for b in got_blocks if b not in rs_blocks]
    if strangers:
        print("client-side frames with SACK blocks the real server never sent "
              "(relative to the client's ISN; the real server's blocks near them):")
        for s in csegs:
            bad = [b for b in s[6] if s[1] == cport and b not in rs_blocks]
            if bad:
                rel = [((le - isn) % M32, (ri - isn) % M32) for le, ri in s[6]]
                near = sorted({((le - isn) % M32, (ri - isn) % M32) for b in bad
                               for le, ri in rs_blocks
                               if min((le - b[0]) % M32, (b[0] - le) % M32) < 200000})
                print(f"  ack {(s[3] - isn) % M32} blocks {rel}; near: {near[:8]}")
        raw = [(s[3], s[6]) for s in rsegs if s[0] == BLOB_PORT and s[6]]
        print("the real server's first SACK-bearing frames (its numbers relative to "
              "the client's ISN + off):",
              [((a - isn - off) % M32, [((le - isn - off) % M32, (ri - isn - off) % M32)
                                       for le, ri in b]) for a, b in raw[:10]])
    stray_acks = sorted(got_acks - rs_acks)

    # towards the server: the client's SACK blocks by the SYN proxy's delta
    c_blocks = {((le - soff) % M32, (ri - soff) % M32)
                for s in csegs if s[0] == cport for le, ri in s[6]}
    rs_got = [b for s in rsegs if s[1] == BLOB_PORT for b in s[6]]
    strangers_rs = [b for b in rs_got if b not in c_blocks]

    summary = (f"{direction}: {len(got_blocks)} SACK blocks at the client, {len(rs_got)} at "
               f"the real server; {len(csegs)} client-side and {len(rsegs)} server-side "
               f"frames; header {hlen} bytes")
    print(summary)
    if direction == "upload":
        assert got_blocks, f"no SACK block reached the client (no loss?): {summary}"
    else:
        assert rs_got, f"no SACK block reached the real server (no loss?): {summary}"
    assert not strangers, (f"{len(strangers)} SACK blocks at the client that the real "
                           f"server never sent (minus off={off} and {hlen}): "
                           f"{strangers[:5]}; {summary}")
    assert not outside, (f"{len(outside)} SACK blocks at the client empty or outside the "
                         f"data it had sent (left, right, sent; relative to its ISN): "
                         f"{outside[:5]}")
    assert not stray_acks, (f"{len(stray_acks)} ACK numbers at the client that the real "
                            f"server never sent (less {hlen}): "
                            f"{[(a - isn) % M32 for a in stray_acks[:5]]} relative")
    assert not strangers_rs, (f"{len(strangers_rs)} SACK blocks at the real server that "
                              f"the client never sent: {strangers_rs[:5]}")
    return summary


LOSS = "3%"


@pytest.mark.parametrize("direction", ["upload", "download"])
@pytest.mark.parametrize("family", FAMILIES)
def test_50mb_both_ways_under_loss_with_the_sack_edges_translated(
        ipvs: IPVS, blob: ProxyBlobProcess, family: str, direction: str,
        tmp_path: Path) -> None:
    """50 MB through a v2 service with the SYN proxy, 3 % loss each way on the
    client's link (netem on the client's and lb's eth0): the bytes arrive
    intact (sha256), the server read the right header first, and the captures
    at both ends show SACK blocks and ACKs translated exactly
    (:func:`check_translation`). netem's losses are not seeded (the kernel
    picks them)."""
    net = NETS[family]
    pp_service(ipvs, net, ProxyProtocol.V2, port=BLOB_PORT)
    before = counters()
    cpcap, rpcap = tmp_path / "client.pcap", tmp_path / "rs1.pcap"
    t0 = time.monotonic()
    # The client's capture ends first: whatever the client received, the real
    # server had sent while its own capture still ran.
    with tcpdump("rs1", rpcap, f"tcp port {BLOB_PORT}"), \
            tcpdump("client", cpcap, f"tcp port {BLOB_PORT}"), \
            netem("client", "eth0", "loss", LOSS), netem("lb", "eth0", "loss", LOSS):
        try:
            cport = blob_transfer(net, direction, XFER)
        except OSError as exc:
            exc.add_note(f"lb counters moved: {moved(before)}")
            raise
    seconds = time.monotonic() - t0
    moves = moved(before)
    print(f"{direction} {family}: {XFER // MB} MB in {seconds:.1f} s; counters {moves}")
    header = expected_header(ProxyProtocol.V2, net.client, cport, net.vip, BLOB_PORT)
    assert header.hex() in blob.headers(), (header.hex(), blob.headers()[-3:])
    assert moves.get("fullnat_proxy_sent") == 1, moves
    check_translation(cpcap, rpcap, cport, len(header), direction)


@pytest.mark.parametrize("synproxy", SYNPROXY)
@pytest.mark.parametrize("family", FAMILIES)
def test_a_dsack_of_the_resent_header_reaches_the_client_as_no_block(
        ipvs: IPVS, recorders: dict[str, Recorder], family: str, synproxy: str,
        tmp_path: Path) -> None:
    """The client sends data at once, while the real server's ACK of the
    header is still on its way (netem delays everything rs1 sends by 300 ms):
    the data segment at ISN+1 carries the header again, the server already has
    it and reports the duplicate with a D-SACK block covering exactly the
    header. That block is about bytes the client never sent: whatever the
    balancer makes of it, no SACK block the client receives may be empty or
    lie outside the client's data (an empty one is invalid, RFC 2018)."""
    net, rec, pp = NETS[family], recorders[family], ProxyProtocol.V2
    pp_service(ipvs, net, pp, port=RAW_PORT, synproxy=SYNPROXY[synproxy])
    start, before = len(rec.streams), counters()
    cpcap, rpcap = tmp_path / "client.pcap", tmp_path / "rs1.pcap"
    payload = b"sent before the header was acknowledged"
    with tcpdump("rs1", rpcap, f"tcp port {RAW_PORT}"), \
            tcpdump("client", cpcap, f"tcp port {RAW_PORT}"), \
            netem("rs1", "eth0", "delay", "300ms"):
        s = _client_socket(net)
        with s:
            s.connect((net.vip, RAW_PORT))
            cport = s.getsockname()[1]
            s.sendall(payload)
            want = expected_header(pp, net.client, cport, net.vip, RAW_PORT) + payload
            stream = _one_stream(rec, start)
            assert wait_for(lambda: len(stream) >= len(want), 20)
            time.sleep(1.5)          # the server's ACKs (300 ms late) reach the client
            assert bytes(stream) == want
    moves = moved(before)
    hlen = len(want) - len(payload)
    rsegs = segments(rpcap)
    r_syn = _syn(rsegs, dport=RAW_PORT)
    first = (r_syn[2] + 1) % M32
    dsacks = [b for seg in rsegs if seg[0] == RAW_PORT and seg[1] == r_syn[0] for b in seg[6]
              if b == (first, (first + hlen) % M32)]
    assert dsacks, (f"the real server never reported the header twice (no D-SACK of it): "
                    f"the test did not happen; counters {moves}")
    csegs = [seg for seg in segments(cpcap) if cport in (seg[0], seg[1])]
    outside = blocks_outside_the_clients_data(csegs, cport)
    rel = [((a - first + 1) % M32, (b - first + 1) % M32) for a, b in dsacks]
    assert not outside, (f"the client received {len(outside)} SACK blocks empty or outside its "
                         f"data (left, right, sent; relative to its ISN): {outside}; the real "
                         f"server sent the D-SACK blocks {rel} (relative to its view of the "
                         f"client's ISN); counters {moves}")
    assert moves.get("fullnat_proxy_resent", 0) >= 1, moves


def test_no_counter_of_trouble_moved(topo: None) -> None:
    """Last of the module: nothing above ran out of memory or into a segment
    too full for the header."""
    stats = counters()
    assert stats["fullnat_proxy_nomem"] == 0 and stats["fullnat_proxy_oversize"] == 0, stats
