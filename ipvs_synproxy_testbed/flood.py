"""Spoofed TCP floods from the testbed's ``client`` namespace, with trafgen.

Tests, the demo and benchmarks flood a VIP with::

    with Flood("syn", rate_pps=300) as f:        # until the with-block ends
        ...
    print(f.result)                               # FloodResult(sent=…, seconds=…)

    run_flood("mixed", count=2000, rate_pps=500, family=6)   # -> FloodResult

Packets are built by Debian's ``trafgen`` (netsniff-ng) in one process (``-P
1``: flat-out ring mode on both vCPUs soft-locks the TCG guest; see
shared/TESTBED-NOTES.md) and sent on the client's ``eth0`` to lb's ``eth0`` MAC,
both read from the namespaces at run time.

Kinds: ``syn`` (SYNs with Linux's usual options), ``ack``, ``fin`` (FIN|ACK),
``rst``, and ``mixed``: those four plus odd flag combinations and malformed TCP
(zero/short/overrunning option lengths, an option cut off by the header's end,
MSS 0 and window scale 255, a data offset larger than the segment, one smaller
than the header, data on a SYN, SYN/ACKs with lying data offsets).

Sources are spoofed, random per packet, and only ever from the client segment's
pools below (never the client's, lb's or the VIP's own addresses); source ports,
sequence and acknowledgement numbers and timestamps are random too. Nothing is
sent to any address outside the testbed (the target must be on the client
segment: a VIP, or lb's own address).

Replies: lb answers the spoofed sources (SYN/ACKs, RSTs…) on the client
segment. Left alone, lb would first have to resolve each spoofed address (an
ARP/neighbour solicitation that nobody answers, the reply queued and dropped
three seconds later): a cost and a side effect a real balancer, whose replies
go to a resolved router, does not have. So by default (``resolve=True``) the
flood gives lb permanent neighbour entries for the pool pointing at the
client's MAC and drops what arrives for the pool in the client's raw
PREROUTING hook with a counter (``FloodResult.replies``: the answers lb sent),
which also keeps the client's stack from answering them with RSTs. Both are
removed when the flood ends. With ``resolve=False`` lb's neighbour table is
left alone and ``replies`` is None.

Measured in the TCG guest (tests/vm/test_flood.py, stock NAT service, 2 s at
300 pps asked): trafgen's pacing lands at ~230-245 pps (each gap overshoots by
about 1 ms); every SYN arrives at lb. ``resolve=True``: the real servers'
SYN/ACKs, retransmissions included, come back to the pool (~1.7 per SYN in 2 s)
and are dropped on the client. ``resolve=False``: lb broadcasts about one ARP
request per SYN (3 per spoofed address per attempt), no reply reaches the wire,
and lb's neighbour table holds one INCOMPLETE/FAILED entry per pool address
(127 at most: the pool bounds it). Flat out (no rate, ``count=20000``) against
a VIP with no service (lb answers each SYN with a RST): ~9.7 k pps.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from types import TracebackType

from ipvs_synproxy_testbed import netns, topology

KINDS = ("syn", "ack", "fin", "rst", "mixed")
# Spoofed source pools: inside the client segment, clear of the client (.2/::2),
# lb (.1/::1) and the VIP (.10/::10), and of the low addresses a second
# balancer or client may take later.
SPOOF_NET4 = ipaddress.ip_network("198.51.100.128/25")
SPOOF_NET6 = ipaddress.ip_network("2001:db8:1::100/120")
SPOOF_LAST4 = 254  # .255 is the segment's broadcast address
CLIENT_NS, CLIENT_DEV = "client", "eth0"
LB_NS, LB_DEV = "lb", "eth0"
NFT_TABLE = "ipvs_sp_flood"  # + family: one v4 and one v6 flood may run at once

ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD

# TCP option bytes (trafgen syntax). A Linux-like SYN: MSS 1460, SACK permitted,
# timestamps (random TSval), NOP, window scale 7 — 20 bytes, doff 10.
_SYN_OPTS = "0x02, 0x04, 0x05, 0xb4, 0x04, 0x02, 0x08, 0x0a, drnd(4), c32(0), 0x01, " \
            "0x03, 0x03, 0x07"
# NOP, NOP, timestamps (random TSval and TSecr) — 12 bytes, doff 8.
_TS_OPTS = "0x01, 0x01, 0x08, 0x0a, drnd(4), drnd(4)"


@dataclass(frozen=True)
class Segment:
    """One packet template: TCP flags, data offset and the bytes after the header."""

    name: str
    flags: tuple[str, ...]
    doff: int = 5
    tail: str = ""  # options and/or payload, trafgen syntax


SEGMENTS: dict[str, Segment] = {
    "syn": Segment("syn", ("syn",), 10, _SYN_OPTS),
    "ack": Segment("ack", ("ack",), 8, _TS_OPTS),
    "fin": Segment("fin", ("fin", "ack"), 8, _TS_OPTS),
    "rst": Segment("rst", ("rst",)),
}
# The hardening mix: the plain kinds, odd flags, malformed options and offsets.
MALFORMED: tuple[Segment, ...] = (
    Segment("syn-optlen-0", ("syn",), 6, "0x02, 0x00, 0x05, 0xb4"),
    Segment("syn-optlen-1", ("syn",), 6, "0x08, 0x01, 0x00, 0x00"),
    Segment("syn-mss-len-3", ("syn",), 6, "0x02, 0x03, 0x05, 0xb4"),
    Segment("syn-opt-overruns-header", ("syn",), 6, "0x01, 0x08, 0x28, 0x00"),
    Segment("syn-opt-truncated", ("syn",), 6, "0x01, 0x01, 0x01, 0x02"),
    Segment("syn-mss-0-wscale-255", ("syn",), 7,
            "0x02, 0x04, 0x00, 0x00, 0x01, 0x03, 0x03, 0xff"),
    Segment("syn-doff-15-no-options", ("syn",), 15),
    Segment("syn-doff-2", ("syn",), 2),
    Segment("syn-with-data", ("syn",), 10, _SYN_OPTS + ', "GET / HTTP/1.0\\r\\n\\r\\n"'),
    Segment("ack-ts-truncated", ("ack",), 6, "0x08, 0x0a, 0x00, 0x00"),
    Segment("ack-doff-15-no-options", ("ack",), 15),
    Segment("syn-fin", ("syn", "fin")),
    Segment("syn-rst", ("syn", "rst")),
    Segment("syn-ack", ("syn", "ack"), 10, _SYN_OPTS),
    # what once fell through to IPVS's scheduling and opened connections
    Segment("syn-ack-doff-15-no-options", ("syn", "ack"), 15),
    Segment("syn-ack-doff-0", ("syn", "ack"), 0),
    Segment("null", ()),
    Segment("xmas", ("fin", "syn", "rst", "psh", "ack", "urg", "ece", "cwr")),
)


def segments(kind: str) -> tuple[Segment, ...]:
    if kind == "mixed":
        return (*SEGMENTS.values(), *MALFORMED)
    if kind not in SEGMENTS:
        raise ValueError(f"unknown flood kind {kind!r} (one of {', '.join(KINDS)})")
    return (SEGMENTS[kind],)


@dataclass(frozen=True)
class FloodSpec:
    """What to send; turned into trafgen's packet config and arguments."""

    kind: str = "syn"
    target: str = topology.VIP4
    port: int = 80
    count: int | None = None       # trafgen -n: stop after this many packets
    rate_pps: int | None = None    # paced by trafgen -t (slow mode); None: flat out
    seed: int | None = None        # trafgen -E: reproducible randomness

    def __post_init__(self) -> None:
        segments(self.kind)
        ip = ipaddress.ip_address(self.target)
        nets = (ipaddress.ip_network(topology.CLIENT_NET4),
                ipaddress.ip_network(topology.CLIENT_NET6))
        if not any(ip in n for n in nets) or ip in self.pool or \
                self.target in (topology.CLIENT4, topology.CLIENT6):
            raise ValueError(f"flood target {self.target} is not a balancer address on the "
                             "testbed's client segment")
        if not 0 < self.port < 65536:
            raise ValueError(f"bad port {self.port}")
        for name in ("count", "rate_pps"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"{name} must be positive, not {v}")

    @property
    def family(self) -> int:
        return ipaddress.ip_address(self.target).version

    @property
    def pool(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        return SPOOF_NET4 if self.family == 4 else SPOOF_NET6


def pool_addresses(family: int) -> list[str]:
    """Every address a flood of ``family`` may use as its source."""
    if family == 4:
        return [str(a) for a in SPOOF_NET4 if int(a) & 0xFF <= SPOOF_LAST4]
    return [str(a) for a in SPOOF_NET6]


def _l3(spec: FloodSpec) -> str:
    """The IP header: random source from the pool (last byte only)."""
    if spec.family == 4:
        base = SPOOF_NET4.network_address
        first = int(base) & 0xFF
        return (f"ipv4(sa={base}, sa[3]=drnd({first}, {SPOOF_LAST4}), "
                f"da={spec.target}, ttl=64, id=drnd(), df)")
    base6 = SPOOF_NET6.network_address
    return f"ipv6(sa={base6}, sa[15]=drnd(0, 255), da={spec.target}, hl=64)"


def packet(spec: FloodSpec, seg: Segment, src_mac: str, dst_mac: str) -> str:
    etype = ETH_P_IP if spec.family == 4 else ETH_P_IPV6
    fields = ["sp=drnd(1024, 65535)", f"dp={spec.port}", "seq=drnd()", f"doff={seg.doff}",
              "window=65535", *seg.flags]
    if "ack" in seg.flags:
        fields.insert(3, "aseq=drnd()")
    tail = f", {seg.tail}" if seg.tail else ""
    return (f"# {seg.name}\n{{ eth(da={dst_mac}, sa={src_mac}, type=0x{etype:04x}), "
            f"{_l3(spec)}, tcp({', '.join(fields)}){tail} }}\n")


def trafgen_config(spec: FloodSpec, src_mac: str, dst_mac: str) -> str:
    """trafgen's packet config: one template per segment, sent round robin."""
    head = (f"# ipvs-synproxy flood: {spec.kind} to {spec.target} port {spec.port}, "
            f"sources {spec.pool}\n")
    return head + "".join(packet(spec, s, src_mac, dst_mac) for s in segments(spec.kind))


def trafgen_argv(spec: FloodSpec, dev: str, config: str) -> list[str]:
    # -P 1: one process; --no-sock-mem and -Q: leave the guest's socket memory
    # sysctls and IRQ affinities alone.
    argv = ["trafgen", "-P", "1", "--no-sock-mem", "-Q", "-o", dev, "-i", config]
    if spec.count is not None:
        argv += ["-n", str(spec.count)]
    if spec.rate_pps is not None:
        # -t (a gap after each packet) paces evenly; trafgen 0.6.8's -b sends each
        # second's packets in one burst. The gap is a floor: sleeping overshoots a
        # little, so the achieved rate is a bit lower (FloodResult.pps says).
        argv += ["-t", f"{round(1e9 / spec.rate_pps)}ns"]
    if spec.seed is not None:
        argv += ["-E", str(spec.seed)]
    return argv


_SENT = re.compile(r"^\s*(\d+) packets outgoing", re.M)
_CPU_TIME = re.compile(r"^\s*(\d+) sec, (\d+) usec on CPU\d+", re.M)


def parse_trafgen_output(text: str) -> tuple[int, float | None]:
    """Packets sent (summed over its workers) and the longest worker's run time."""
    sent = sum(int(n) for n in _SENT.findall(text))
    times = [int(s) + int(us) / 1e6 for s, us in _CPU_TIME.findall(text)]
    return sent, (max(times) if times else None)


def nft_script(family: int) -> str:
    """The client's raw-PREROUTING drop (with counter) of traffic for the pool."""
    table = f"{NFT_TABLE}{family}"
    match = f"ip daddr {SPOOF_NET4}" if family == 4 else f"ip6 daddr {SPOOF_NET6}"
    return (f"add table inet {table}\ndelete table inet {table}\n"
            f"table inet {table} {{\n"
            f"  chain prerouting {{\n"
            f"    type filter hook prerouting priority raw; policy accept;\n"
            f"    {match} counter drop\n"
            f"  }}\n}}\n")


def nft_counter(listing: str) -> int:
    """The packet count of the drop rule in ``nft -j list table …`` output."""
    total = 0
    for item in json.loads(listing).get("nftables", []):
        for expr in item.get("rule", {}).get("expr", []):
            if "counter" in expr:
                total += int(expr["counter"]["packets"])
    return total


def neigh_batch(family: int, mac: str, dev: str, add: bool) -> list[str]:
    if add:
        return [f"neigh replace {a} lladdr {mac} dev {dev} nud permanent"
                for a in pool_addresses(family)]
    return [f"neigh del {a} dev {dev}" for a in pool_addresses(family)]


def link_mac(ns: str, dev: str) -> str:
    out = subprocess.run(["ip", "-n", ns, "-j", "link", "show", "dev", dev],
                         capture_output=True, text=True, check=True).stdout
    return str(json.loads(out)[0]["address"])


@dataclass(frozen=True)
class FloodResult:
    kind: str
    target: str
    sent: int               # packets trafgen reports as sent
    seconds: float          # how long it sent for
    replies: int | None     # packets lb sent back to the pool (None: not counted)

    @property
    def pps(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


class FloodError(RuntimeError):
    pass


class ReplySink:
    """lb's answers to a spoofed source pool, kept off the wire's far end (see the
    module's text): with ``resolve``, permanent neighbour entries in lb for the
    pool pointing at the client's MAC; always, a counting drop for the pool in
    the client's raw PREROUTING hook. A context manager; :meth:`replies` reads
    the drop's counter (None without ``resolve``). Used by :class:`Flood` and by
    tests that send spoofed frames themselves."""

    def __init__(self, family: int, resolve: bool = True) -> None:
        if family not in (4, 6):
            raise ValueError(f"family must be 4 or 6, not {family!r}")
        self.family, self.resolve = family, resolve
        self.client_mac = ""
        self._nft_up = False
        self._neigh_up = False

    @property
    def table(self) -> str:
        return f"{NFT_TABLE}{self.family}"

    def _nft(self, *args: str, script: str | None = None) -> str:
        res = netns.run(CLIENT_NS, ["nft", *args], check=False, input=script)
        if res.returncode != 0:
            raise FloodError(f"nft {' '.join(args)} in {CLIENT_NS}: {res.stderr.strip()}")
        return res.stdout

    def _ip_batch(self, lines: list[str], check: bool) -> None:
        res = subprocess.run(["ip", "-n", LB_NS, "-force", "-batch", "-"],
                             input="\n".join(lines) + "\n", capture_output=True, text=True,
                             check=False)
        if check and res.returncode != 0:
            raise FloodError(f"ip -n {LB_NS} -batch: {res.stderr.strip()[:500]}")

    def up(self, client_mac: str | None = None) -> ReplySink:
        self.client_mac = client_mac or link_mac(CLIENT_NS, CLIENT_DEV)
        try:
            self._nft("-f", "-", script=nft_script(self.family))
            self._nft_up = True
            if self.resolve:
                self._neigh_up = True
                self._ip_batch(neigh_batch(self.family, self.client_mac, LB_DEV, True),
                               check=True)
        except BaseException:
            self.down()
            raise
        return self

    def replies(self) -> int | None:
        if not self.resolve:
            return None
        return nft_counter(self._nft("-j", "list", "table", "inet", self.table))

    def down(self) -> None:
        if self._neigh_up:
            self._neigh_up = False
            self._ip_batch(neigh_batch(self.family, self.client_mac, LB_DEV, False),
                           check=False)
        if self._nft_up:
            self._nft_up = False
            with contextlib.suppress(FloodError):
                self._nft("delete", "table", "inet", self.table)

    def __enter__(self) -> ReplySink:
        return self.up()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.down()


class Flood:
    """A running flood; a context manager (start on enter, stop on exit).

    ``duration`` (seconds) stops it after that long when used through
    :meth:`wait` or :func:`run_flood`; ``count`` makes trafgen stop by itself.
    """

    def __init__(self, kind: str = "syn", target: str | None = None, port: int = 80,
                 count: int | None = None, duration: float | None = None,
                 rate_pps: int | None = None, family: int = 4, seed: int | None = None,
                 resolve: bool = True) -> None:
        if family not in (4, 6):
            raise ValueError(f"family must be 4 or 6, not {family!r}")
        if target is None:
            target = topology.VIP4 if family == 4 else topology.VIP6
        elif ipaddress.ip_address(target).version != family:
            raise ValueError(f"target {target} is not an IPv{family} address")
        self.spec = FloodSpec(kind=kind, target=target, port=port, count=count,
                              rate_pps=rate_pps, seed=seed)
        if duration is not None and duration <= 0:
            raise ValueError(f"duration must be positive, not {duration}")
        self.duration = duration
        self.resolve = resolve
        self.result: FloodResult | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._cfg: str | None = None
        self._started = 0.0
        self._sink = ReplySink(self.spec.family, resolve)
        self.output = ""

    def start(self) -> Flood:
        if self._proc is not None:
            raise FloodError("flood already started")
        client_mac = link_mac(CLIENT_NS, CLIENT_DEV)
        lb_mac = link_mac(LB_NS, LB_DEV)
        fd, self._cfg = tempfile.mkstemp(prefix="flood-", suffix=".cfg")
        with os.fdopen(fd, "w") as f:
            f.write(trafgen_config(self.spec, client_mac, lb_mac))
        try:
            self._sink.up(client_mac)
            with netns.netns(CLIENT_NS):
                # its own process group: SIGINT must reach trafgen's worker too
                self._proc = subprocess.Popen(
                    trafgen_argv(self.spec, CLIENT_DEV, self._cfg), stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                    start_new_session=True)
            self._started = time.monotonic()
        except BaseException:
            self._cleanup()
            raise
        return self

    def _cleanup(self) -> None:
        self._sink.down()
        if self._cfg:
            with contextlib.suppress(OSError):
                os.unlink(self._cfg)
            self._cfg = None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def wait(self, timeout: float | None = None) -> FloodResult:
        """Let it run for ``duration`` (or until trafgen's ``count`` is reached), then stop."""
        limit = self.duration if timeout is None else timeout
        deadline = None if limit is None else self._started + limit
        while self.running():
            if deadline is not None and time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        return self.stop()

    def stop(self) -> FloodResult:
        """Stop trafgen (SIGINT: it prints its totals), read the counters, clean up."""
        if self.result is not None:
            return self.result
        proc = self._proc
        if proc is None:
            raise FloodError("flood not started")
        try:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGINT)
            try:
                out, _ = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, _ = proc.communicate()
            wall = time.monotonic() - self._started
            sent, seconds = parse_trafgen_output(out)
            if proc.returncode not in (0, -signal.SIGINT) and not sent:
                raise FloodError(f"trafgen failed ({proc.returncode}): {out.strip()[-800:]}")
            # Replies still in flight (TCG is slow): let them land before counting.
            time.sleep(0.3)
            replies = self._sink.replies()
            self.result = FloodResult(self.spec.kind, self.spec.target, sent,
                                      seconds if seconds else wall, replies)
            self.output = out
            return self.result
        finally:
            self._cleanup()

    def __enter__(self) -> Flood:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def run_flood(kind: str = "syn", target: str | None = None, port: int = 80,
              count: int | None = None, duration: float | None = None,
              rate_pps: int | None = None, family: int = 4, seed: int | None = None,
              resolve: bool = True) -> FloodResult:
    """Flood and return what was sent; needs ``count`` or ``duration``."""
    if count is None and duration is None:
        raise ValueError("run_flood needs count or duration (or use Flood as a context)")
    flood = Flood(kind, target, port, count, duration, rate_pps, family, seed, resolve)
    flood.start()
    try:
        return flood.wait()
    finally:
        flood.stop()
