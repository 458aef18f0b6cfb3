"""A balancer pair (issue 18): FULLNAT and SYN-proxy connections survive the
master's death, carried to the backup by IPVS's connection sync (0024-0026).

``lb`` is the master, ``lb2`` (DESIGN.md: 198.51.100.3, 192.0.2.3, 2001:db8:1::3,
2001:db8:2::3) the backup, both on the two segments, with the same services,
laddr pools and SYN-proxy secret. The failover here is done by hand, so that
the test shows the sync and nothing else: lb's links go down (it is dead to
both segments) and lb2 takes the addresses the pair shares: the VIPs, the
laddrs (FULLNAT replies come back to them) and the real servers' gateway (NAT
replies). The neighbour caches are flushed, as a VRRP gratuitous ARP would
update them.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import itertools
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from ipvs_synproxy.kernel.model import FwdMethod, ProxyProtocol, SyncDaemon
from ipvs_synproxy.kernel.netlink import IPVS
from ipvs_synproxy_testbed import netns, syncmsg, topology
from ipvs_synproxy_testbed.transfer import (
    MB,
    XFER,
    BlobServer,
    expected_digest,
    recv_exact,
    send_blob,
)

from .conftest import LB2
from .helpers import (
    ACK,
    METHODS,
    NETS,
    PSH,
    Capture,
    Net,
    eth_frame,
    nft,
    synproxy_service,
    tcp_seg,
    wait_for,
)

PORT = 8080
SYNCID = 7
PAUSE_AT = 4 * MB  # bytes moved on the master before it dies
# Client ports of these tests, below the ephemeral range and used once: a
# failover leaves the old master's connections ESTABLISHED (15 minutes), and
# a later connect() from the same port would find one of them.
CLIENT_PORTS = itertools.count(46000)


def connect(sock: socket.socket, vip: str, port: int) -> None:
    """connect(), and on failure what the client and the balancer knew."""
    try:
        sock.connect((vip, port))
    except OSError as exc:
        for ns, cmd in (("lb", "ip -br addr"), ("lb", "ip route"), ("lb", "ip neigh"),
                        ("client", "ip neigh"), ("lb", "ipvsadm -Ln"),
                        ("lb", "ipvsadm -Lnc"), ("lb", "cat /proc/net/ip_vs_ext_stats"),
                        ("client", "ss -tan")):
            exc.add_note(f"{ns}$ {cmd}\n" + netns.run(ns, cmd.split(), check=False).stdout)
        raise


def client_socket(net: Net) -> socket.socket:
    sock = netns.socket_in("client", socket.AF_INET6 if net.version == 6 else socket.AF_INET,
                           socket.SOCK_STREAM)
    sock.bind((net.client, next(CLIENT_PORTS)))
    return sock


def shared_addrs() -> dict[str, list[str]]:
    """What moves from the master to the backup, by interface."""
    return {
        "eth0": [f"{topology.VIP4}/32", f"{topology.VIP6}/128"],
        "eth1": [f"{topology.LB_SERVER4}/24", f"{topology.LB_SERVER6}/64",
                 *(f"{a}/32" for a in topology.LADDRS4),
                 *(f"{a}/128" for a in topology.LADDRS6)],
    }


def ip(ns: str, *lines: str) -> None:
    subprocess.run(["ip", "-n", ns, "-batch", "-"], input="\n".join(lines) + "\n",
                   text=True, check=True)


def flush_neighbours() -> None:
    for ns in ("client", "rs1", "rs2"):
        netns.run(ns, ["ip", "neigh", "flush", "all"], check=False)


@pytest.fixture
def pair(lb2: str) -> Iterator[str]:
    """lb2 beside lb, no shared address yet; afterwards lb is itself again
    (links up, its addresses, no sync daemon)."""
    # lb keeps its IPv6 addresses while its links are down
    keep = {f"net.ipv6.conf.{d}.keep_addr_on_down": 1 for d in ("eth0", "eth1")}
    try:
        with netns.sysctls(("lb",), keep):
            yield lb2
    finally:
        with IPVS(netns="lb") as conn:
            for d in conn.daemons():
                conn.stop_daemon(d)
        ip("lb", "link set eth0 up", "link set eth1 up")
        flush_neighbours()


def fail_over() -> None:
    """The master dies to both segments; the backup takes the shared addresses."""
    ip("lb", "link set eth0 down", "link set eth1 down")
    ip(LB2, *(f"addr add {a} dev {d} nodad" if ":" in a else f"addr add {a} dev {d}"
              for d, addrs in shared_addrs().items() for a in addrs))
    flush_neighbours()


# Health checks come from the balancers' own addresses
BALANCERS = {topology.LB_SERVER4, topology.LB_SERVER6, "192.0.2.3", "2001:db8:2::3"}


class CountingBlobServer(BlobServer):
    """A BlobServer that counts the connections it accepted (from other
    peers than the balancers' own addresses)."""

    def __init__(self, ns: str, addr: str, port: int) -> None:
        self.accepted = 0
        super().__init__(ns, addr, port)

    def handle(self, conn: socket.socket) -> None:
        if conn.getpeername()[0] not in BALANCERS:
            self.accepted += 1
        super().handle(conn)


@dataclass
class Pair:
    master: IPVS
    backup: IPVS


def configure(pair: Pair, net: Net, fwd: FwdMethod, sync: bool) -> None:
    """The same SYN-proxy service on both, one secret; then the daemons (6.12
    registers IPVS's hooks only while a service exists)."""
    secret = os.urandom(16)
    for conn in (pair.master, pair.backup):
        synproxy_service(conn, net, fwd, port=PORT)
        conn.set_synproxy_secret(secret)
    if sync:
        pair.master.start_daemon(SyncDaemon("master", "eth1", SYNCID))
        pair.backup.start_daemon(SyncDaemon("backup", "eth1", SYNCID))


def backup_conns(cport: int) -> list[str]:
    out = netns.run(LB2, ["ipvsadm", "-Lnc"]).stdout
    return [ln for ln in out.splitlines() if f":{cport} " in ln]


class PausedTransfer:
    """A transfer through the VIP that stops at PAUSE_AT until resumed."""

    def __init__(self, net: Net, direction: str, n: int = XFER, port: int = PORT) -> None:
        self.direction, self.n, self.done = direction, n, PAUSE_AT
        self.sock = client_socket(net)
        self.sock.settimeout(30)
        connect(self.sock, net.vip, port)
        self.cport = self.sock.getsockname()[1]
        self.hash = hashlib.sha256()
        if direction == "download":
            self.sock.sendall(b"D" + struct.pack("!Q", n))
            self._recv(PAUSE_AT)
        else:
            self.sock.sendall(b"U" + struct.pack("!Q", n))
            send_blob(self.sock, PAUSE_AT)

    def _recv(self, k: int) -> None:
        buf = bytearray(256 * 1024)
        while k > 0:
            got = self.sock.recv_into(buf, min(len(buf), k))
            if not got:
                raise ConnectionError(f"peer closed with {k} bytes to go")
            self.hash.update(memoryview(buf)[:got])
            k -= got

    def advance(self, upto: int) -> None:
        """Move the transfer on to ``upto`` bytes (a multiple of MB), and pause."""
        if self.direction == "download":
            self._recv(upto - self.done)
        else:
            send_blob(self.sock, upto - self.done)
        self.done = upto

    def finish(self, timeout: float = 60) -> str:
        """The rest of the transfer; the SHA-256 of what the far end got or sent."""
        self.sock.settimeout(timeout)
        with self.sock:
            if self.direction == "download":
                self._recv(self.n - self.done)
                return self.hash.hexdigest()
            rest = self.n - self.done
            # send_blob from an offset: the blob repeats every MB
            sender = threading.Thread(target=self._send_rest, args=(rest,), daemon=True)
            sender.start()
            digest = recv_exact(self.sock, 32).hex()
            sender.join(timeout)
            return digest

    def _send_rest(self, rest: int) -> None:
        with contextlib.suppress(OSError):  # the digest read reports the failure
            send_blob(self.sock, rest)


@pytest.fixture
def ha(pair: str, ipvs: IPVS) -> Iterator[Pair]:
    with IPVS(netns=LB2) as backup:
        yield Pair(ipvs, backup)


# The keepalived test below moves 50 MB transfers; these eight cases need
# less to show the same thing (most of it moves after the failover)
CASE_BYTES = 16 * MB
CASES = [(fam, fwd, d) for fam in ("ipv4", "ipv6") for fwd in ("fullnat", "nat")
         for d in ("download", "upload")]


@pytest.mark.parametrize(("family", "forward", "direction"), CASES)
def test_a_transfer_through_the_master_completes_through_the_backup_after_it_dies(
        ha: Pair, family: str, forward: str, direction: str) -> None:
    net = NETS[family]
    configure(ha, net, METHODS[forward], sync=True)
    servers = [CountingBlobServer(rs, net.rs[rs], PORT) for rs in ("rs1", "rs2")]
    try:
        t = PausedTransfer(net, direction, CASE_BYTES)
        # The backup holds the connection before the master dies
        assert wait_for(lambda: any("ESTABLISHED" in ln for ln in backup_conns(t.cport)),
                        timeout=10), netns.run(LB2, ["ipvsadm", "-Lnc"]).stdout
        sent = ha.master.ext_stats()
        fail_over()
        digest = t.finish()
        assert digest == expected_digest(CASE_BYTES), f"the {direction} arrived changed"
        got = ha.backup.ext_stats()
        assert sent["sync_opt_sent"] >= (2 if forward == "fullnat" else 1), sent
        assert got["sync_opt_received"] >= (2 if forward == "fullnat" else 1), got
        assert got["sync_opt_rejected"] == 0, got
        # Nothing on the backup opened a connection of its own for the client:
        # no cookie was sent, no laddr:lport picked
        assert got["synproxy_cookie_sent"] == 0, got
        assert got["fullnat_conn_new"] == 0, got
        assert got["fullnat_no_laddr"] == 0, got
        # Each real server saw one connection at most, the one the master opened
        assert sum(s.accepted for s in servers) == 1, [s.accepted for s in servers]
    finally:
        for s in servers:
            s.close()


@pytest.mark.parametrize("forward", ["fullnat", "nat"])
def test_without_sync_the_transfer_breaks_at_the_failover(ha: Pair, forward: str) -> None:
    """The same failover with no sync daemon: the mechanism is what carries it."""
    net = NETS["ipv4"]
    configure(ha, net, METHODS[forward], sync=False)
    servers = [CountingBlobServer(rs, net.rs[rs], PORT) for rs in ("rs1", "rs2")]
    try:
        t = PausedTransfer(net, "download")
        time.sleep(3)  # longer than the sync daemon needs to send (see above)
        assert backup_conns(t.cport) == []
        fail_over()
        with pytest.raises(OSError):
            t.finish(timeout=8)
    finally:
        for s in servers:
            s.close()


class ProxyBlobServer(CountingBlobServer):
    """A BlobServer behind a PROXY v2 header: it keeps each header it read
    (one per connection) and serves what follows as usual."""

    def __init__(self, ns: str, addr: str, port: int) -> None:
        self.headers: list[bytes] = []
        super().__init__(ns, addr, port)

    def handle(self, conn: socket.socket) -> None:
        if conn.getpeername()[0] not in BALANCERS:
            self.accepted += 1
        threading.Thread(target=self._proxied, args=(conn,), daemon=True).start()

    def _proxied(self, conn: socket.socket) -> None:
        try:
            head = recv_exact(conn, 16)
            self.headers.append(head + recv_exact(conn, struct.unpack("!H", head[14:])[0]))
        except OSError:
            conn.close()
            return
        BlobServer._one(conn)


def proxy_v2_header(client: tuple[str, int], vip: str, vport: int) -> bytes:
    """What a real server must read first: PROXY, TCP over the client's family."""
    caddr, vaddr = ipaddress.ip_address(client[0]), ipaddress.ip_address(vip)
    fam = 0x11 if caddr.version == 4 else 0x21
    body = caddr.packed + vaddr.packed + struct.pack("!HH", client[1], vport)
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, fam]) + struct.pack("!H", len(body)) + body


@pytest.mark.parametrize(("family", "direction"), [("ipv4", "download"), ("ipv6", "upload")])
def test_a_proxy_protocol_connection_goes_on_through_the_backup(
        ha: Pair, family: str, direction: str) -> None:
    """The backup learns where the PROXY header sits (sync option 0x32) and
    goes on moving the client's sequence numbers past it: without it, the
    backup would drop the client's segments (fullnat_proxy_no_state) or hand
    the client ACKs for bytes it never sent, and the transfer would break."""
    net = NETS[family]
    configure(ha, net, FwdMethod.FULLNAT, sync=True)
    for conn in (ha.master, ha.backup):
        svc = next(s for s in conn.services() if s.port == PORT and str(s.addr) == net.vip)
        for dest in conn.dests(svc):
            conn.edit_dest(svc, replace(dest, proxy_protocol=ProxyProtocol.V2))
    servers = [ProxyBlobServer(rs, net.rs[rs], PORT) for rs in ("rs1", "rs2")]
    m0, b0 = ha.master.ext_stats(), ha.backup.ext_stats()
    try:
        t = PausedTransfer(net, direction, CASE_BYTES)
        client = t.sock.getsockname()[:2]
        assert wait_for(lambda: any("ESTABLISHED" in ln for ln in backup_conns(t.cport)),
                        timeout=10), netns.run(LB2, ["ipvsadm", "-Lnc"]).stdout
        fail_over()
        digest = t.finish()
        assert digest == expected_digest(CASE_BYTES), f"the {direction} arrived changed"
        b1 = ha.backup.ext_stats()
        got = {k: b1[k] - b0.get(k, 0) for k in b1}
        # FULLNAT, SYN proxy and PROXY options, every one accepted
        assert got["sync_opt_received"] >= 3, got
        assert got["sync_opt_rejected"] == 0, got
        assert got["fullnat_proxy_no_state"] == 0, got
        # The server read one header, the master's, naming the client
        headers = [h for s in servers for h in s.headers]
        assert headers == [proxy_v2_header(client, net.vip, PORT)], headers
        assert ha.master.ext_stats()["fullnat_proxy_sent"] - m0["fullnat_proxy_sent"] == 1
    finally:
        for s in servers:
            s.close()


# ---- messages crafted as a master would send them ----------------------------------------------

RS1_MAC, LB_SERVER_MAC = "02:00:00:00:02:11", "02:00:00:00:02:01"


@pytest.fixture
def backup_lb(ipvs: IPVS) -> Iterator[IPVS]:
    """lb as a backup, fed by messages crafted in rs2 (lb's services come first)."""
    yield ipvs
    for d in ipvs.daemons():
        ipvs.stop_daemon(d)


def lb_conn_lines(net: Net, cports: range) -> dict[int, str]:
    out = netns.run("lb", ["ipvsadm", "-Lnc"]).stdout
    client = f"[{net.client}]" if net.version == 6 else net.client
    return {p: ln for ln in out.splitlines() for p in cports if f"{client}:{p} " in ln}


def send_reply_from_rs1(net: Net, laddr: str, lport: int, seq: int, ack: int) -> None:
    """A segment from rs1:PORT to laddr:lport, as the real server's reply."""
    seg = tcp_seg(PORT, lport, seq, ack, ACK | PSH, payload=b"reply")
    frame = eth_frame(net.version, seg, src=net.rs["rs1"], dst=laddr,
                      macs=(RS1_MAC, LB_SERVER_MAC))
    with netns.netns("rs1"):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    with s:
        s.bind(("eth0", 0))
        s.send(frame)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_a_backup_takes_laddr_lport_and_translation_from_the_masters_options(
        backup_lb: IPVS, family: str) -> None:
    net = NETS[family]
    svc = synproxy_service(backup_lb, net, FwdMethod.FULLNAT, port=PORT)
    backup_lb.start_daemon(SyncDaemon("backup", "eth1", SYNCID))
    base = 46800 + (0 if family == "ipv4" else 100)  # beside CLIENT_PORTS
    laddr, lport, isn, seq_delta = net.laddrs[1], 33333, 0x10203040, 0x7FFF0001
    rs = net.rs["rs1"]

    def conn(i: int, *options: tuple[int, bytes]) -> syncmsg.SyncConn:
        return syncmsg.SyncConn(net.client, base + i, net.vip, PORT, rs, PORT,
                                flags=syncmsg.CONN_F_FULLNAT, options=list(options))

    sp_opt = syncmsg.synproxy_option(isn=isn, seq_delta=seq_delta)
    unused = "192.0.2.99" if family == "ipv4" else "2001:db8:2::99"
    conns = [
        conn(0, syncmsg.fnat_option(laddr, lport), sp_opt, (0x5F, b"later")),
        conn(1, syncmsg.fnat_option(unused, lport + 1), sp_opt),   # not in the pool
        conn(2, syncmsg.fnat_option(laddr, lport + 2, reserved=1)),  # bad bits
        conn(3, syncmsg.fnat_option(laddr, 0)),                      # no port
        conn(4, (0x1F, b"must know")),   # unknown mandatory: upstream skips it
        conn(5),                         # an old master's: created unbound
    ]
    before = backup_lb.ext_stats()
    cports = range(base, base + len(conns))
    cap = Capture("client")
    try:
        syncmsg.send("rs2", "eth0", syncmsg.encode(conns, SYNCID))
        assert wait_for(lambda: set(lb_conn_lines(net, cports)) == {base, base + 5},
                        timeout=10), lb_conn_lines(net, cports)
        got = backup_lb.ext_stats()
        assert got["sync_opt_received"] - before["sync_opt_received"] == 2 + 2, got
        assert got["sync_opt_rejected"] - before["sync_opt_rejected"] == 3, got
        counts = {str(a.addr): a.conn_counts for a in backup_lb.laddrs(svc)}
        assert counts[str(ipaddress.ip_address(laddr))] == 1, counts
        # The real server's reply to the master's laddr:lport reaches the
        # client from the VIP, its sequence number moved by the master's delta
        rs_seq = 1000
        send_reply_from_rs1(net, laddr, lport, rs_seq, 5000)
        assert wait_for(lambda: any(
            t.sport == PORT and t.dport == base for t in _tcp_to_client(cap.frames)), 5)
    finally:
        frames = cap.stop()
    (seg,) = [t for t in _tcp_to_client(frames) if t.dport == base]
    assert seg.seq == (rs_seq + seq_delta) & 0xFFFFFFFF
    assert seg.ack == 5000


def _tcp_to_client(frames: list[bytes]) -> list:
    from scapy.layers.inet import TCP
    from scapy.layers.l2 import Ether

    return [Ether(f)[TCP] for f in list(frames) if TCP in Ether(f)]


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_a_handshake_answered_by_the_old_master_completes_on_the_new_one(
        ha: Pair, family: str) -> None:
    """The client's ACK to the old master's cookie reaches the backup: the
    shared secret lets the backup open the connection (nothing to sync)."""
    net = NETS[family]
    configure(ha, net, FwdMethod.FULLNAT, sync=True)
    servers = [CountingBlobServer(rs, net.rs[rs], PORT) for rs in ("rs1", "rs2")]
    # The client's ACK of the handshake (and anything after) is lost on the way
    rule = f"ip{'6' if net.version == 6 else ''} daddr {net.vip} tcp dport {PORT} " \
        "tcp flags & (syn | ack) == ack drop"
    try:
        sock = client_socket(net)
        with sock:
            sock.settimeout(30)
            with nft("client", rule, hook="output"):
                connect(sock, net.vip, PORT)  # the SYN/ACK came from lb
                before = ha.master.ext_stats()
                assert before["synproxy_cookie_sent"] >= 1
                fail_over()
            sock.sendall(b"D" + struct.pack("!Q", MB))
            got = hashlib.sha256()
            n = 0
            while n < MB:
                chunk = sock.recv(65536)
                assert chunk, f"closed after {n} bytes"
                got.update(chunk)
                n += len(chunk)
        assert got.hexdigest() == expected_digest(MB)
        stats = ha.backup.ext_stats()
        assert stats["synproxy_ack_valid"] == 1, stats
        assert stats["synproxy_cookie_sent"] == 0, stats
        assert sum(s.accepted for s in servers) == 1
    finally:
        for s in servers:
            s.close()


# ---- the pair run by keepalived from a rendered config ------------------------------------------

NAT_PORT = 8081


def pair_config(router_id: str, state: str, priority: int) -> str:
    n4, n6 = NETS["ipv4"], NETS["ipv6"]
    laddrs4 = ", ".join(f"{a}/32" for a in n4.laddrs)
    laddrs6 = ", ".join(f'"{a}/128"' for a in n6.laddrs)
    rs4 = ", ".join(f"{{addr: {a}}}" for a in n4.rs.values())
    rs6 = ", ".join(f'{{addr: "[{a}]:{PORT}"}}' for a in n6.rs.values())
    return f"""
keepalived:
  router_id: {router_id}
  healthcheck: {{type: tcp, interval: 1, timeout: 1, retry: 1, delay_before_retry: 1}}
  vrrp:
    - {{name: VI_CLIENT, interface: eth0, state: {state}, priority: {priority},
       virtual_router_id: 61, advert_int: 1, vips: [{n4.vip}/32, "{n6.vip}/128"]}}
    - {{name: VI_SERVER, interface: eth1, state: {state}, priority: {priority},
       virtual_router_id: 62, advert_int: 1, vips: [{laddrs4}, {laddrs6}]}}
  pair: {{sync_interface: eth1, sync_instance: VI_SERVER, syncid: {SYNCID}}}
services:
  - {{vip: "{n4.vip}:{PORT}", synproxy: true, forward: fullnat, laddrs: [{", ".join(n4.laddrs)}],
     real_servers: [{rs4}]}}
  - {{vip: "[{n6.vip}]:{PORT}", synproxy: true, forward: fullnat,
     laddrs: [{", ".join(f'"{a}"' for a in n6.laddrs)}], real_servers: [{rs6}]}}
  - {{vip: "{n4.vip}:{NAT_PORT}", synproxy: true, forward: nat,
     real_servers: [{", ".join(f"{{addr: {a}}}" for a in n4.rs.values())}]}}
"""


def vrrp_addrs() -> dict[str, list[str]]:
    """What keepalived moves in the pair test: the VIPs and the laddrs."""
    return {"eth0": [f"{topology.VIP4}/32", f"{topology.VIP6}/128"],
            "eth1": [*(f"{a}/32" for a in topology.LADDRS4),
                     *(f"{a}/128" for a in topology.LADDRS6)]}


@pytest.fixture
def vrrp_pair(pair: str, ipvs: IPVS, tmp_path: Path) -> Iterator[dict[str, object]]:
    """lb and lb2 without the pair's addresses (keepalived adds them to the
    master), the real servers routed through the first laddr (an address of
    the pair: NAT replies follow the master), the keepalived daemons stopped
    and every address put back afterwards."""
    shared = vrrp_addrs()
    gw4, gw6 = topology.LADDRS4[0], topology.LADDRS6[0]
    ip("lb", *(f"addr del {a} dev {d}" for d, addrs in shared.items() for a in addrs))
    for rs in ("rs1", "rs2"):
        ip(rs, f"route replace default via {gw4}", f"route replace default via {gw6}")
    state: dict[str, object] = {"daemons": []}
    try:
        yield state
    finally:
        for k in state["daemons"]:  # type: ignore[attr-defined]
            k.stop()
        ip("lb", "link set eth0 up", "link set eth1 up")
        for d, addrs in shared.items():
            for a in addrs:
                netns.run("lb", ["ip", "addr", "replace", a, "dev", d], check=False)
        for rs in ("rs1", "rs2"):
            ip(rs, f"route replace default via {topology.LB_SERVER4}",
               f"route replace default via {topology.LB_SERVER6}")
        flush_neighbours()


def test_keepalived_hands_running_transfers_over_and_back(
        vrrp_pair: dict[str, object], tmp_path: Path) -> None:
    """keepalived runs the pair from rendered configs; the master is killed
    (kill -9, links down) with five 50 MB transfers under way (FULLNAT down and
    up, IPv4 and IPv6, SYN-proxy NAT down): they complete through the
    backup with identical bytes, one connection each on the real servers. One
    more goes back to the old master when it returns (failback)."""
    from .test_keepalived import Keepalived, has_addr, render

    daemons: list[Keepalived] = vrrp_pair["daemons"]  # type: ignore[assignment]
    for d in ("lb", "lb2", "lb-again"):
        (tmp_path / d).mkdir()
    master = Keepalived("lb", render(tmp_path / "lb", pair_config("lb", "master", 150)),
                        tmp_path / "lb")
    daemons.append(master)
    backup = Keepalived(LB2, render(tmp_path / "lb2", pair_config("lb2", "backup", 100)),
                        tmp_path / "lb2")
    daemons.append(backup)
    n4, n6 = NETS["ipv4"], NETS["ipv6"]
    assert wait_for(lambda: has_addr("lb", n4.vip) and has_addr("lb", n4.laddrs[0]),
                    timeout=30), master.log()
    secret = os.urandom(16)  # keepalived does not set it: the operator does, on both
    with IPVS(netns="lb") as m, IPVS(netns=LB2) as b:
        assert wait_for(lambda: len(m.services()) == 3 and len(b.services()) == 3,
                        timeout=30), (master.log(), backup.log())
        m.set_synproxy_secret(secret)
        b.set_synproxy_secret(secret)
    servers = [CountingBlobServer(rs, net.rs[rs], port)
               for net, port in ((n4, PORT), (n6, PORT), (n4, NAT_PORT))
               for rs in ("rs1", "rs2")]
    try:
        transfers = [PausedTransfer(n4, "download"), PausedTransfer(n4, "upload"),
                     PausedTransfer(n6, "download"), PausedTransfer(n6, "upload"),
                     PausedTransfer(n4, "download", port=NAT_PORT),
                     PausedTransfer(n4, "download")]
        assert wait_for(lambda: all(any("ESTABLISHED" in ln for ln in backup_conns(t.cport))
                                    for t in transfers), timeout=15), \
            netns.run(LB2, ["ipvsadm", "-Lnc"]).stdout
        # The master dies: no goodbye (kill -9), its links go down
        os.killpg(master.proc.pid, signal.SIGKILL)
        master.proc.wait(5)
        ip("lb", "link set eth0 down", "link set eth1 down")
        assert wait_for(lambda: has_addr(LB2, n4.vip) and has_addr(LB2, n4.laddrs[0]),
                        timeout=20), backup.log()
        for t in transfers[:-1]:
            assert t.finish() == expected_digest(XFER), f"{t.direction} arrived changed"
        last = transfers[-1]
        last.advance(20 * MB)
        # The old master returns as after a reboot: no address, a new keepalived
        for d, addrs in vrrp_addrs().items():
            for a in addrs:
                netns.run("lb", ["ip", "addr", "del", a, "dev", d], check=False)
        ip("lb", "link set eth0 up", "link set eth1 up")
        again = Keepalived("lb", render(tmp_path / "lb-again", pair_config("lb", "master", 150)),
                           tmp_path / "lb-again")
        daemons.append(again)
        assert wait_for(lambda: has_addr("lb", n4.vip) and not has_addr(LB2, n4.vip),
                        timeout=30), again.log()
        assert last.finish() == expected_digest(XFER), "the failback broke the transfer"
        accepted = sum(s.accepted for s in servers)
        assert accepted == len(transfers), [s.accepted for s in servers]
        with IPVS(netns=LB2) as b:
            stats = b.ext_stats()
        assert stats["sync_opt_received"] >= 11 and stats["sync_opt_rejected"] == 0, stats
    finally:
        for s in servers:
            s.close()
