"""What many guest tests share: the topology's addresses, crafted segments,
captures, counter deltas, the SYN-proxy service and the TOA module.

Fixtures live in conftest.py; plain helpers here, imported by name.
"""

from __future__ import annotations

import io
import ipaddress
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from ipvs_synproxy.adm import execute as adm
from ipvs_synproxy.build import kmod
from ipvs_synproxy.kernel.model import Dest, FwdMethod, Service
from ipvs_synproxy.kernel.netlink import IPVS
from ipvs_synproxy_testbed import netns, topology
from ipvs_synproxy_testbed import transfer as xfer
from ipvs_synproxy_testbed.transfer import (  # noqa: F401  (test_synproxy_hardening uses it)
    BLOB,
    MB,
    XFER,
    BlobServer,
    ServerProcess,
    recv_exact,
)

IP = ipaddress.ip_address
# TCP header flags
FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80


@dataclass(frozen=True)
class Net:
    """The testbed addresses of one IP family."""

    vip: str
    client: str
    laddrs: tuple[str, ...]
    rs: dict[str, str]
    server_net: str

    @property
    def version(self) -> int:
        return IP(self.vip).version


NETS = {
    "ipv4": Net(topology.VIP4, topology.CLIENT4, topology.LADDRS4, topology.RS4,
                topology.SERVER_NET4),
    "ipv6": Net(topology.VIP6, topology.CLIENT6, topology.LADDRS6, topology.RS6,
                topology.SERVER_NET6),
}


@contextmanager
def lb_sysctls(**values: int) -> Iterator[None]:
    """Set net.ipv4.vs.<name> sysctls in lb for the block, then restore them."""
    with netns.sysctls(("lb",), {f"net.ipv4.vs.{k}": v for k, v in values.items()}):
        yield


def ext_stats_file() -> dict[str, int]:
    """/proc/net/ip_vs_ext_stats of lb: name -> total."""
    with netns.netns("lb"), open("/proc/net/ip_vs_ext_stats") as f:
        lines = f.read().splitlines()
    assert lines[0].split()[:2] == ["counter", "total"], lines[0]
    return {ln.split()[0]: int(ln.split()[1]) for ln in lines[1:]}


def wait_for(cond: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.2)
    return cond()


SO_RCVBUFFORCE = 33  # socket.SO_RCVBUFFORCE is missing from Python's socket module
CAPTURE_BUFFER = 32 << 20


class Capture:
    """Frames arriving at ``ns``'s ``dev``, collected by a thread (AF_PACKET)."""

    def __init__(self, ns: str, dev: str = "eth0") -> None:
        with netns.netns(ns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
        # A burst (hundreds of SYN/ACKs) must not overflow the socket while the
        # collecting thread waits for the GIL on a slow emulated vCPU: the
        # default 208 KiB holds fewer than 300 small frames.
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, CAPTURE_BUFFER)
        self.sock.bind((dev, 0))
        self.sock.settimeout(0.2)
        self.frames: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            if addr[2] != socket.PACKET_OUTGOING:
                self.frames.append(data)

    def stop(self) -> list[bytes]:
        """Every frame that arrived until now: those the thread had no time to
        read yet (a loaded emulated vCPU) are taken from the socket too."""
        self._stop.set()
        self._thread.join(5)
        self.sock.setblocking(False)
        while True:
            try:
                data, addr = self.sock.recvfrom(65535)
            except OSError:  # BlockingIOError: drained
                break
            if addr[2] != socket.PACKET_OUTGOING:
                self.frames.append(data)
        self.sock.close()
        return self.frames


CLIENT_MAC = "02:00:00:00:01:02"


LB_MAC = "02:00:00:00:01:01"


@contextmanager
def netem(ns: str, dev: str, *spec: str) -> Iterator[None]:
    """tc netem on ``dev`` of ``ns`` for the block: ``("loss", "3%")``,
    ``("delay", "50ms")``; every frame out of dev meets it."""
    subprocess.run(["modprobe", "sch_netem"], check=True)
    netns.run(ns, ["tc", "qdisc", "add", "dev", dev, "root", "netem", *spec])
    try:
        yield
    finally:
        netns.run(ns, ["tc", "qdisc", "del", "dev", dev, "root"], check=False)


def send_frames(frames: list[bytes], ns: str = "client", dev: str = "eth0") -> None:
    with netns.netns(ns):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    with s:
        s.bind((dev, 0))
        for f in frames:
            s.send(f)


def eth_frame(version: int, seg: bytes, l4len: int | None = None, *,
              src: str | None = None, dst: str | None = None,
              macs: tuple[str, str] | None = None) -> bytes:
    """Ethernet frame carrying seg with a correct TCP checksum, client -> VIP
    unless ``src``/``dst``/``macs`` say otherwise; l4len, if given, is the
    transport length the IP header claims."""
    from scapy.layers.inet import IP as IPv4
    from scapy.layers.inet import in4_chksum
    from scapy.layers.inet6 import IPv6, in6_chksum
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    net = NETS["ipv4" if version == 4 else "ipv6"]
    src, dst = src or net.client, dst or net.vip
    mac_src, mac_dst = macs or (CLIENT_MAC, LB_MAC)
    if version == 4:
        l3 = IPv4(src=src, dst=dst, proto=6)
        csum = in4_chksum(6, l3, seg)
    else:
        l3 = IPv6(src=src, dst=dst, nh=6)
        csum = in6_chksum(6, l3, seg)
    if len(seg) >= 18:
        seg = seg[:16] + struct.pack("!H", csum) + seg[18:]
    if l4len is not None:
        if version == 4:
            l3.len = 20 + l4len
        else:
            l3.plen = l4len
    return bytes(Ether(src=mac_src, dst=mac_dst) / l3 / Raw(seg))


FAMILIES = ("ipv4", "ipv6")


METHODS = {"nat": FwdMethod.MASQ, "fullnat": FwdMethod.FULLNAT}


def synproxy_service(conn: IPVS, net: Net, fwd: FwdMethod, port: int = 80,
                     synproxy: bool = True, servers: tuple[str, ...] = ("rs1", "rs2"),
                     rs_port: int | None = None) -> Service:
    """VIP:port to port (or rs_port) of the servers, all weight 1, round robin."""
    svc = Service(addr=IP(net.vip), port=port, scheduler="rr", synproxy=synproxy)
    conn.add_service(svc)
    for rs in servers:
        conn.add_dest(svc, Dest(addr=IP(net.rs[rs]), port=rs_port or port, fwd=fwd,
                                weight=1))
    if fwd is FwdMethod.FULLNAT:
        for laddr in net.laddrs:
            conn.add_laddr(svc, IP(laddr))
    return svc


def tcp_seg(sport: int, dport: int, seq: int, ack: int, flags: int, opts: bytes = b"",
         payload: bytes = b"", window: int = 64240) -> bytes:
    hdr = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                      (20 + len(opts)) // 4 << 4, flags, window, 0, 0)
    return hdr + opts + payload


def tcp_of(frame: bytes):
    from scapy.layers.inet import TCP
    from scapy.layers.l2 import Ether

    pkt = Ether(frame)
    return pkt if TCP in pkt else None


def read_synacks(frames: list[bytes]) -> dict[int, object]:
    """SYN/ACKs from port 80 in frames, by destination port."""
    from scapy.layers.inet import TCP

    out = {}
    for f in frames:
        pkt = tcp_of(f)
        if pkt is not None and pkt[TCP].sport == 80 and pkt[TCP].flags.S \
                and pkt[TCP].flags.A:
            out[pkt[TCP].dport] = pkt
    return out


def syn_options(mss: int | None, ws: int | None, sack: bool, ts: bool,
                 tsval: int = 4242) -> bytes:
    o = b""
    if mss is not None:
        o += struct.pack("!BBH", 2, 4, mss)
    if sack:
        o += b"\x04\x02"
    if ts:
        o += struct.pack("!BBII", 8, 10, tsval, 0)
    if ws is not None:
        o += struct.pack("!BBB", 3, 3, ws)
    return o + b"\x01" * (-len(o) % 4)


def options_of(synack) -> dict[str, object]:
    from scapy.layers.inet import TCP

    return dict((k, v) for k, v in synack[TCP].options)


def transfer(net: Net, port: int, direction: str, n: int = XFER, check: bool = True) -> float:
    """One transfer through the VIP of ``net`` (:func:`xfer.transfer`); its rate in MB/s.

    A transfer that fails carries what lb and the client knew at that moment
    (counters that moved, IPVS connections; a stall adds the client socket's view): CI keeps
    only the report, and a one-in-a-hundred stall cannot be rerun to look."""
    before = ext_stats_file()
    try:
        return xfer.transfer(net.vip, port, direction, n, check)
    except OSError as exc:
        after = ext_stats_file()
        moved = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
        exc.add_note(f"lb counters moved: {moved}")
        exc.add_note("lb: " + netns.run("lb", ["ipvsadm", "-Lnc"], check=False).stdout)
        raise


@contextmanager
def ns_sysctls(namespaces: tuple[str, ...], **values: str) -> Iterator[None]:
    """net.ipv4.<name> sysctls in the given namespaces for the block."""
    with netns.sysctls(namespaces, {f"net.ipv4.{k}": v for k, v in values.items()}):
        yield


def tcp_segments(frames: list[bytes], dport: int) -> list:
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


def conn_states(sport: int, client: str = topology.CLIENT4, vport: int = 0) -> list[str]:
    """States of lb's connections from client:sport (to virtual port vport, if
    given: a real client's port may also be in use towards another one)."""
    out = netns.run("lb", ["ipvsadm", "-Lnc"]).stdout
    name = f"[{client}]:{sport} " if ":" in client else f"{client}:{sport} "
    return [ln.split()[2] for ln in out.splitlines() if name in ln
            and (not vport or ln.split()[4].endswith(f":{vport}"))]


def lose_connection(net: Net, sport: int) -> None:
    """The client connects to ``net``'s VIP:80 from ``sport`` and forgets the
    connection without a word: its RST never leaves the client, so lb keeps
    the connection ESTABLISHED."""
    old = netns.socket_in("client", socket.AF_INET6 if ":" in net.vip else socket.AF_INET,
                          socket.SOCK_STREAM)
    old.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    old.bind((net.client, sport))
    old.settimeout(10)
    old.connect((net.vip, 80))
    assert wait_for(lambda: conn_states(sport, net.client) == ["ESTABLISHED"], 20), \
        conn_states(sport, net.client)
    with nft("client", f"tcp sport {sport} drop", hook="output"):
        old.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        old.close()                     # the RST this sends never leaves the client
        time.sleep(0.5)


@contextmanager
def nft(ns: str, rules: str, hook: str = "input") -> Iterator[None]:
    """An nft table ``t`` in ns with a chain on hook holding rules."""
    script = (f"table inet t {{\n  chain c {{\n    type filter hook {hook} priority 0;\n"
              f"    {rules}\n  }}\n}}\n")
    res = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=script,
                         text=True, capture_output=True, check=False)
    assert res.returncode == 0, f"nft: {res.stderr}"
    try:
        yield
    finally:
        subprocess.run(["ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "t"],
                       check=False)


def duplicate_conns() -> list[str]:
    """Client address:port pairs with more than one entry in lb's table."""
    out = netns.run("lb", ["ipvsadm", "-Lnc"]).stdout
    seen: dict[tuple[str, str], int] = {}
    for ln in out.splitlines():
        f = ln.split()
        if ln.startswith("TCP") and len(f) >= 5:
            seen[(f[3], f[4])] = seen.get((f[3], f[4]), 0) + 1
    return [f"{c} -> {v}" for (c, v), n in seen.items() if n > 1]


COMPLAINTS = ("WARNING:", "BUG:", "BUG ", "Oops", "Objects remaining", "kmemleak",
              "general protection", "refcount_t", "Poison overwritten", "still has objects")


def dmesg_lines() -> list[str]:
    return subprocess.run(["dmesg"], capture_output=True, text=True,
                          check=True).stdout.splitlines()


def kernel_complaints(before: list[str]) -> list[str]:
    """Kernel log lines after ``before`` (an earlier dmesg_lines()) that complain."""
    now = dmesg_lines()
    start = len(before)
    if before and (len(now) < start or now[start - 1] != before[-1]):
        start = now.index(before[-1]) + 1 if before[-1] in now else 0   # the ring wrapped
    return [ln for ln in now[start:] if any(c in ln for c in COMPLAINTS)]


STATS = Path("/proc/net/toa_stats")


def toa_option(addr: str, port: int, length: int | None = None) -> bytes:
    ip = ipaddress.ip_address(addr)
    kind = 254 if ip.version == 4 else 253
    body = struct.pack("!H", port) + ip.packed
    if length is None:
        length = 2 + len(body)
    # a wrong length keeps the real body size so the option list still parses
    return bytes([kind, length]) + body[: max(0, length - 2)]


def toa_ko_path() -> Path:
    """The cached build of kernel_patches/toa (IPVS_SYNPROXY_TOA_KO: another .ko)."""
    if os.environ.get("IPVS_SYNPROXY_TOA_KO"):
        return Path(os.environ["IPVS_SYNPROXY_TOA_KO"])
    kernel = kmod.Kernel(os.uname().release)
    ko = kmod.cached_build(kernel, f"toa-{kmod.toa_key(kernel)}") / "toa.ko"
    return ko if ko.exists() else kmod.build_toa().modules[0]


def insmod(trusted: str = topology.TOA_TRUSTED) -> None:
    """Load toa.ko believing TOA options from ``trusted`` (lb's addresses)."""
    res = subprocess.run(["insmod", str(toa_ko_path()), f"trusted_sources={trusted}"],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr


def toa_is_loaded() -> bool:
    return Path("/sys/module/toa").exists()


def remove_toa() -> None:
    res = subprocess.run(["rmmod", "toa"], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert not toa_is_loaded()
    assert not STATS.exists()


Result = tuple[int, str, str]


def read_conn_in_lb() -> str:
    with netns.netns("lb"), open("/proc/thread-self/net/ip_vs_conn") as f:
        return f.read()


def sp(*argv: str, stdin: str = "") -> Result:
    """``ipvs-synproxy adm ARGV`` on the balancer, in process."""
    out, err = io.StringIO(), io.StringIO()
    rc = adm.run(list(argv), netns="lb", prog="ipvsadm", stdin=io.StringIO(stdin),
                 stdout=out, stderr=err, read_conn=read_conn_in_lb)
    return rc, out.getvalue(), err.getvalue()


class CraftedClient:
    """One handshake from sport, played with frames; SYN/ACKs read off the wire."""

    def __init__(self, net, sport: int, isn: int) -> None:
        self.net, self.sport, self.isn = net, sport, isn
        self.cap = Capture("client")
        self.synack = None
        self.acked, self.sent = False, 0

    def syn(self, opts: bytes) -> None:
        send_frames([eth_frame(self.net.version, tcp_seg(self.sport, 80, self.isn, 0, SYN, opts))])
        assert wait_for(lambda: self.sport in read_synacks(self.cap.frames), 20), \
            f"no SYN/ACK for the SYN from port {self.sport}"
        self.synack = read_synacks(self.cap.frames)[self.sport]

    @property
    def cookie(self) -> int:
        from scapy.layers.inet import TCP

        return int(self.synack[TCP].seq)

    def ack(self, opts: bytes = b"", payload: bytes = b"") -> None:
        send_frames([eth_frame(self.net.version,
                             tcp_seg(self.sport, 80, self.isn + 1, self.cookie + 1,
                                  ACK | (PSH if payload else 0), opts, payload))])
        self.sent = max(self.sent, len(payload))
        self.acked = True

    def close(self) -> list[bytes]:
        """Stop capturing; a handshake that was completed is reset, so that its
        connection does not linger at the real server into later tests."""
        if self.acked:
            send_frames([eth_frame(self.net.version,
                                 tcp_seg(self.sport, 80, self.isn + 1 + self.sent,
                                      self.cookie + 1, RST | ACK, b""))])
        return self.cap.stop()


class TcpHead(NamedTuple):
    """What :func:`tcp_head` reads of a TCP frame."""

    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    payload: int    # bytes of payload, from the IP length (captures are cut short)
    options: bytes


def tcp_head(frame: bytes) -> TcpHead | None:
    """The TCP header of an Ethernet frame (IPv4 or IPv6 without extension
    headers), read from the bytes: captures keep 128 bytes of each frame, and
    a whole transfer's capture is too long for scapy's dissectors under TCG.
    None for anything else."""
    ethertype = int.from_bytes(frame[12:14], "big")
    if ethertype == 0x0800 and frame[23] == 6:
        ihl = (frame[14] & 0xF) * 4
        l4len, t = int.from_bytes(frame[16:18], "big") - ihl, 14 + ihl
    elif ethertype == 0x86DD and frame[20] == 6:
        l4len, t = int.from_bytes(frame[18:20], "big"), 54
    else:
        return None
    sport, dport, seq, ack, off, flags = struct.unpack_from("!HHIIBB", frame, t)
    doff = (off >> 4) * 4
    return TcpHead(sport, dport, seq, ack, flags, l4len - doff, frame[t + 20:t + doff])


def sack_blocks(opts: bytes) -> list[tuple[int, int]]:
    """The blocks of the first SACK option in a TCP header's option bytes."""
    i = 0
    while i < len(opts) and opts[i] != 0:
        if opts[i] == 1:
            i += 1
            continue
        if i + 1 >= len(opts) or opts[i + 1] < 2:
            break
        kind, length = opts[i], opts[i + 1]
        if kind == 5:
            edges = struct.unpack_from(f"!{(length - 2) // 4}I", opts, i + 2)
            return list(zip(edges[::2], edges[1::2], strict=True))
        i += length
    return []
