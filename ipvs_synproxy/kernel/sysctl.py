"""IPVS sysctls: the knobs under ``/proc/sys/net/ipv4/vs/`` (``net.ipv4.vs.*``).

:data:`KNOBS` documents every knob of stock Linux 6.1 IPVS (``ip_vs_ctl.c``,
plus the lblc/lblcr schedulers' own) and those the ipvs-synproxy series adds
(``kernel_patches/linux-6.1``), with the kernel's default, a one-line meaning
and the values the kernel accepts. Values are handled as tuples of integers
(one for most knobs, two for ``sync_threshold``, the CPU numbers of a CPU list
such as 6.12's ``est_cpulist``), written the way the kernel prints them.

Sysctls are per network namespace: :class:`Sysctls` reads and writes them in
the current namespace or a named one. Reading /proc/sys is not netlink, so it
lives here rather than in :mod:`netlink`.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass

PREFIX = "net.ipv4.vs."
PROC_DIR = "/proc/sys/net/ipv4/vs"
INT_MIN, INT_MAX = -0x8000_0000, 0x7FFF_FFFF
ULONG_MAX = 0xFFFF_FFFF_FFFF_FFFF

Value = tuple[int, ...]
CPU_LIMIT = 8192  # the kernel's NR_CPUS ceiling on x86_64


class SysctlError(Exception):
    """A bad name or value (``field`` names the knob), or a refused write."""

    def __init__(self, name: str, message: str) -> None:
        self.name = name
        self.message = message
        super().__init__(f"{PREFIX}{name}: {message}" if name else message)


class SysctlMissing(SysctlError):
    """The knob is documented but the loaded kernel/modules do not have it."""


@dataclass(frozen=True)
class Knob:
    name: str
    default: str  # as the kernel prints it; "" when computed at boot
    meaning: str
    origin: str = "stock"  # or "stock (ip_vs_lblc)", "ipvs-synproxy (FULLNAT)"…
    lo: int = INT_MIN
    hi: int = INT_MAX
    count: int = 1
    power_of_two: bool = False
    cpulist: bool = False  # a CPU list ("0-3,6"): the value is the CPU numbers

    def validate(self, value: Value) -> None:
        if self.cpulist:
            if not value:
                raise SysctlError(self.name, "empty CPU list")
            bad = [v for v in value if not 0 <= v < CPU_LIMIT]
            if bad:
                raise SysctlError(self.name, f"CPU {bad[0]} out of range 0-{CPU_LIMIT - 1}")
            return
        if len(value) != self.count:
            raise SysctlError(self.name, f"takes {self.count} integer"
                                         f"{'s' if self.count > 1 else ''}, got {len(value)}")
        for v in value:
            if not self.lo <= v <= self.hi:
                raise SysctlError(self.name, f"{v} out of range {self.lo}-{self.hi}")
            if self.power_of_two and v & (v - 1):
                raise SysctlError(self.name, f"{v} is not a power of two")
        if self.name == "sync_threshold" and value[1] and value[0] >= value[1]:
            raise SysctlError(self.name, f"threshold {value[0]} must be below the "
                                         f"period {value[1]} (or the period 0)")


def _b(name: str, default: int, meaning: str, origin: str = "stock") -> Knob:
    """A knob the kernel reads as a boolean (any integer is accepted there;
    we accept only 0 and 1 so a typo is caught)."""
    return Knob(name, str(default), meaning, origin, 0, 1)


_FNAT = "ipvs-synproxy (FULLNAT)"
_SP = "ipvs-synproxy (SYN proxy)"

KNOBS: dict[str, Knob] = {k.name: k for k in (
    Knob("amemthresh", "1024", "available-memory threshold (pages) below which the "
         "automatic defense modes switch on", lo=0),
    Knob("am_droprate", "10", "drop rate (1/N packets) of drop_packet mode 3", lo=0),
    Knob("drop_entry", "0", "defense: randomly drop SYN-RECV connection entries "
         "(0 off, 1/2 automatic, 3 always)", lo=0, hi=3),
    Knob("drop_packet", "0", "defense: drop 1/rate packets before forwarding "
         "(0 off, 1/2 automatic, 3 always at am_droprate)", lo=0, hi=3),
    _b("conntrack", 0, "keep netfilter conntrack entries for IPVS connections "
       "(needed by stateful firewall rules)"),
    Knob("secure_tcp", "0", "defense: stricter TCP state table, NAT enters "
         "ESTABLISHED only after the 3-way handshake (0 off, 1/2 automatic, 3 always)",
         lo=0, hi=3),
    _b("snat_reroute", 1, "re-route NAT replies as if they originated on the director"),
    Knob("sync_version", "1", "connection-sync protocol version sent (0 legacy, 1 current)",
         lo=0, hi=1),
    Knob("sync_ports", "1", "sync threads/UDP ports (8848…8848+N-1); a power of two",
         lo=1, power_of_two=True),
    Knob("sync_persist_mode", "0", "1: sync only persistence templates of persistent "
         "services", lo=0, hi=1),
    Knob("sync_qlen_max", "", "limit of queued sync messages (default: 1/32 of memory "
         "pages)", lo=0, hi=ULONG_MAX),
    Knob("sync_sock_size", "0", "SNDBUF/RCVBUF of the sync socket in bytes (0: system "
         "default)", lo=0),
    _b("cache_bypass", 0, "forward directly to the original destination when no cache "
       "server is available"),
    _b("expire_nodest_conn", 0, "expire a connection at once when its real server has "
       "been deleted (instead of dropping its packets)"),
    _b("sloppy_tcp", 0, "create a connection from any TCP packet, not only a SYN "
       "(backup directors after failover)"),
    _b("sloppy_sctp", 0, "create a connection from any SCTP packet, not only INIT"),
    _b("expire_quiescent_template", 0, "expire persistence templates of real servers "
       "with weight 0"),
    Knob("sync_threshold", "3\t50", "sync a connection when its packet count modulo "
         "period equals threshold (threshold period)", lo=0, count=2),
    Knob("sync_refresh_period", "0", "seconds of timer change that trigger a new sync "
         "message for an unchanged connection (0: off)", lo=0),
    Knob("sync_retries", "0", "sync retries at sync_refresh_period/8", lo=0, hi=3),
    _b("nat_icmp_send", 0, "send ICMP unreachable for NAT replies of unknown "
       "connections"),
    _b("pmtu_disc", 1, "reject oversized DF packets with FRAG_NEEDED (0: fragment them "
       "for tunnels)"),
    _b("backup_only", 0, "disable the director while this host is a sync backup "
       "(avoids DR/TUN loops)"),
    Knob("conn_reuse_mode", "1", "port-reuse handling bitmap: 1 reschedule TIME_WAIT "
         "reuse, 2 also FIN_WAIT; 0 off", lo=0, hi=3),
    _b("schedule_icmp", 0, "schedule ICMP packets that match no connection to a real "
       "server (ECMP/anycast directors)"),
    _b("ignore_tunneled", 0, "mark packets of unknown protocols (tunnels) as IPVS's so "
       "they are not scheduled again"),
    _b("run_estimation", 1, "compute the rate estimators (CPS, PPS, BPS)"),
    Knob("est_cpulist", "", "CPUs the rate-estimation kthreads may run on (Linux 6.12; "
         "default: the housekeeping CPUs)", origin="stock (6.12)", cpulist=True, count=0),
    Knob("est_nice", "0", "nice value of the rate-estimation kthreads (Linux 6.12)",
         origin="stock (6.12)", lo=-20, hi=19),
    Knob("debug_level", "0", "kernel log verbosity (only with CONFIG_IP_VS_DEBUG, not "
         "in Debian's kernel)", lo=0),
    Knob("lblc_expiration", "86400", "seconds before an unused lblc scheduler entry is "
         "dropped (present while ip_vs_lblc is loaded)", "stock (ip_vs_lblc)", lo=0),
    Knob("lblcr_expiration", "86400", "seconds before an unused lblcr scheduler entry "
         "is dropped (present while ip_vs_lblcr is loaded)", "stock (ip_vs_lblcr)", lo=0),
    Knob("fullnat_lport_min", "1024", "lowest local port FULLNAT allocates", _FNAT,
         lo=1, hi=65535),
    Knob("fullnat_lport_max", "65535", "highest local port FULLNAT allocates", _FNAT,
         lo=1, hi=65535),
    Knob("fullnat_lport_tries", "64", "local ports a FULLNAT connection tries on one "
         "laddr before going on to the next", _FNAT, lo=1, hi=65536),
    Knob("fullnat_toa", "1", "add the TOA option (client address) to FULLNAT SYNs and "
         "first ACK/data", _FNAT, lo=0, hi=1),
    Knob("fullnat_toa_trust", "0", "1: pass on TOA options clients send (an upstream "
         "balancer's, two-tier); 0: remove them from every packet", _FNAT, lo=0, hi=1),
    Knob("fullnat_mss_adjust", "1", "lower the MSS of real servers' SYN/ACKs by the TOA "
         "size", _FNAT, lo=0, hi=1),
    Knob("synproxy_mss", "1452", "MSS the SYN proxy announces to IPv4 clients (IPv6: 32 "
         "less)", _SP, lo=88, hi=65535),
    Knob("synproxy_wscale", "7", "window scale the SYN proxy announces (to clients that "
         "sent one)", _SP, lo=0, hi=14),
    Knob("synproxy_sack", "1", "offer SACK to clients that asked for it", _SP, lo=0, hi=1),
    Knob("synproxy_timestamp", "1", "answer timestamps of clients that sent them", _SP,
         lo=0, hi=1),
    Knob("synproxy_secret_period", "64", "seconds a cookie key lives (the previous one is "
         "accepted too)", _SP, lo=1, hi=86400),
    Knob("synproxy_hold_packets", "16", "client packets held per connection while the "
         "real server handshake runs", _SP, lo=0, hi=1024),
    Knob("synproxy_hold_bytes", "131072", "memory (truesize) of the packets held per "
         "connection while the real server handshake runs", _SP, lo=0, hi=2**31 - 1),
    Knob("synproxy_hold_mem", "16777216", "memory (truesize) all connections of the "
         "namespace may hold while their real server handshakes run, SYN copies included",
         _SP, lo=0, hi=2**31 - 1),
    _b("synproxy_reuse", 1, "master switch of session reuse (a new cookie ACK replaces a "
       "closing connection)", _SP),
    _b("synproxy_reuse_close", 1, "session reuse from CLOSE", _SP),
    _b("synproxy_reuse_time_wait", 1, "session reuse from TIME_WAIT", _SP),
    _b("synproxy_reuse_fin_wait", 1, "session reuse from FIN_WAIT", _SP),
    _b("synproxy_reuse_close_wait", 1, "session reuse from CLOSE_WAIT", _SP),
    _b("synproxy_reuse_last_ack", 1, "session reuse from LAST_ACK", _SP),
    Knob("synproxy_syn_retries", "3", "SYNs resent to a silent real server before the "
         "client is reset", _SP, lo=0, hi=10),
    Knob("synproxy_syn_retry_ms", "1000", "first SYN retransmission delay (doubles each "
         "time)", _SP, lo=100, hi=60000),
    _b("synproxy_defer", 0, "open the real server side only when the client's ACK "
       "carries data", _SP),
    Knob("synproxy_ack_storm", "10", "identical pure ACKs passed before the repeats are "
         "dropped (0 off)", _SP, lo=0, hi=255),
    _b("synproxy_drop_udp", 0, "drop UDP to a VIP:port that only has a SYN proxy TCP "
       "service", _SP),
    _b("synproxy_drop_frag", 0, "drop fragmented TCP to SYN proxy services", _SP),
)}


def short_name(name: str) -> str:
    """``net.ipv4.vs.x`` or ``net/ipv4/vs/x`` or ``x`` → ``x``."""
    n = name.strip().replace("/", ".")
    return n[len(PREFIX):] if n.startswith(PREFIX) else n


def parse_cpulist(name: str, text: str) -> Value:
    """``"0-3,6"`` (the kernel's cpulist syntax) → (0, 1, 2, 3, 6)."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            first = int(lo, 10)
            last = int(hi, 10) if sep else first
        except ValueError:
            raise SysctlError(name, f"not a CPU list: {text.strip()!r}") from None
        if first > last or last - first >= CPU_LIMIT:
            raise SysctlError(name, f"not a CPU range: {part.strip()!r}")
        cpus.update(range(first, last + 1))
    return tuple(sorted(cpus))


def format_cpulist(value: Value) -> str:
    """(0, 1, 2, 3, 6) → ``"0-3,6"``."""
    runs: list[list[int]] = []
    for cpu in sorted(set(value)):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def parse_value(name: str, value: object, knob: Knob | None = None) -> Value:
    """An integer, a string of integers (``"3 50"``) or a list of integers; for a
    CPU-list knob also the kernel's ``"0-3,6"`` syntax."""
    items: Sequence[object]
    documented = knob if knob is not None else KNOBS.get(short_name(name))
    if documented is not None and documented.cpulist and isinstance(value, str):
        cpus = parse_cpulist(name, value) if value.strip() else ()
        if knob is not None:
            knob.validate(cpus)
        return cpus
    if isinstance(value, bool):
        raise SysctlError(name, f"not an integer: {value!r} (write 0 or 1)")
    if isinstance(value, int):
        items = [value]
    elif isinstance(value, str):
        items = value.split()
    elif isinstance(value, list | tuple):
        items = value
    else:
        raise SysctlError(name, f"not an integer: {value!r}")
    out: list[int] = []
    for item in items:
        if isinstance(item, bool):
            raise SysctlError(name, f"not an integer: {item!r}")
        if isinstance(item, int):
            out.append(item)
            continue
        try:
            out.append(int(str(item), 10))
        except ValueError:
            raise SysctlError(name, f"not an integer: {item!r}") from None
    if not out:
        raise SysctlError(name, "empty value")
    if knob is not None:
        knob.validate(tuple(out))
    return tuple(out)


def validate(name: str, value: object) -> tuple[str, Value]:
    """Check a documented knob's name and value; returns (short name, value)."""
    short = short_name(name)
    knob = KNOBS.get(short)
    if knob is None:
        raise SysctlError(short, "unknown IPVS sysctl (known: "
                                 f"{', '.join(sorted(KNOBS))})")
    return short, parse_value(short, value, knob)


def format_value(value: Value, name: str = "") -> str:
    """How the kernel takes (and prints) a value."""
    knob = KNOBS.get(short_name(name)) if name else None
    if knob is not None and knob.cpulist:
        return format_cpulist(value)
    return "\t".join(str(v) for v in value)


def display(name: str, value: Value) -> str:
    """A value as an operator writes it: ``3 50``, ``0-3,6``."""
    return format_value(value, name).replace("\t", " ")


class Sysctls:
    """Read and write ``net.ipv4.vs.*`` in the current or a named network namespace.

    ``root`` is the directory of the knobs (tests point it elsewhere).
    """

    def __init__(self, netns: str | None = None, root: str | None = None) -> None:
        self.netns = netns
        self.root = root or PROC_DIR

    @contextlib.contextmanager
    def _ns(self) -> Iterator[None]:
        if self.netns is None:
            yield
            return
        from ipvs_synproxy.kernel.netns import netns as enter_netns

        with enter_netns(self.netns):
            yield

    def names(self) -> list[str]:
        """Every knob present now (empty when IPVS is not loaded)."""
        with self._ns():
            try:
                return sorted(os.listdir(self.root))
            except FileNotFoundError:
                return []

    def read(self, name: str) -> Value:
        short = short_name(name)
        path = os.path.join(self.root, short)
        try:
            with self._ns(), open(path) as f:
                text = f.read()
        except FileNotFoundError:
            raise self._missing(short) from None
        except OSError as exc:
            raise SysctlError(short, f"cannot read: {exc.strerror}") from None
        return parse_value(short, text)

    def read_all(self) -> dict[str, Value]:
        out = {}
        for n in self.names():
            with contextlib.suppress(SysctlError):  # write-only or vanished knob
                out[n] = self.read(n)
        return out

    def write(self, name: str, value: Value) -> None:
        short = short_name(name)
        path = os.path.join(self.root, short)
        try:
            with self._ns():
                fd = os.open(path, os.O_WRONLY)  # never create: /proc/sys or nothing
            try:
                os.write(fd, (format_value(value, short) + "\n").encode())
            finally:
                os.close(fd)
        except FileNotFoundError:
            raise self._missing(short) from None
        except OSError as exc:
            why = "the kernel rejected the value" if exc.errno == errno.EINVAL \
                else exc.strerror
            raise SysctlError(short, f"cannot set to {display(short, value)}: "
                                     f"{why}") from None

    def _missing(self, short: str) -> SysctlMissing:
        knob = KNOBS.get(short)
        where = f" in netns {self.netns}" if self.netns else ""
        if knob is None:
            return SysctlMissing(short, f"no such sysctl{where}")
        if knob.origin == _FNAT:
            hint = " (load the ipvs-synproxy IPVS modules)"
        elif "ip_vs_lblc" in knob.origin:
            hint = f" (load {knob.origin.split('(')[1].rstrip(')')})"
        elif knob.name == "debug_level":
            hint = " (the kernel lacks CONFIG_IP_VS_DEBUG)"
        else:
            hint = " (is the ip_vs module loaded?)"
        return SysctlMissing(short, f"not present{where}{hint}")


def describe(name: str) -> Knob | None:
    return KNOBS.get(short_name(name))


def parse_assignments(items: Sequence[str], live: Collection[str] | None = None
                      ) -> list[tuple[str, Value]]:
    """``NAME=VALUE`` arguments. Documented knobs are validated against their
    range; a knob only the live kernel has (``live``) takes any integers."""
    out = []
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise SysctlError("", f"expected NAME=VALUE, got {item!r}")
        short = short_name(name)
        if short in KNOBS or live is None or short not in live:
            out.append(validate(short, text))
        else:
            out.append((short, parse_value(short, text)))
    return out
