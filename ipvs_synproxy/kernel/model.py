"""Validated values for IPVS services, real servers and laddr pools.

Values are built once at the edge (CLI flags, config file, web form, a netlink
dump) and passed inward unchanged: every instance of these frozen dataclasses
is valid. The ``parse_*`` helpers turn loosely typed input (strings, ints from
YAML) into them and report errors as :class:`ModelError` naming where the bad
value came from (``source``: a flag, ``file:line``, ``kernel``…).

Read-only counters (connection counts, statistics) ride along on values built
from the kernel; they never take part in equality, so a configured service
compares equal to the same service listed from the kernel.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

U32_MAX = 0xFFFF_FFFF
INT_MAX = 0x7FFF_FFFF

# Service flags (IPVS_SVC_ATTR_FLAGS), include/uapi/linux/ip_vs.h + UAPI.md.
IP_VS_SVC_F_PERSISTENT = 0x0001
IP_VS_SVC_F_HASHED = 0x0002  # kernel-internal: set on every listed service
IP_VS_SVC_F_ONEPACKET = 0x0004
IP_VS_SVC_F_SCHED1 = 0x0008
IP_VS_SVC_F_SCHED2 = 0x0010
IP_VS_SVC_F_SCHED3 = 0x0020
IP_VS_SVC_F_SYNPROXY = 0x8000
# Flags a caller may set directly through Service.flags; persistence and the
# SYN proxy have their own fields so they cannot disagree with them.
SETTABLE_FLAGS = (IP_VS_SVC_F_ONEPACKET | IP_VS_SVC_F_SCHED1 | IP_VS_SVC_F_SCHED2
                  | IP_VS_SVC_F_SCHED3)

# Scheduler and persistence-engine names: any module name the kernel may load
# (ip_vs_<name>), at most IP_VS_SCHEDNAME_MAXLEN - 1 characters. Whether it
# exists is the kernel's call: out-of-tree schedulers are legitimate.
_MODULE_NAME = re.compile(r"[a-z0-9_]{1,15}")


class ModelError(ValueError):
    """An invalid value; ``source`` says where it came from, ``field`` what it is."""

    def __init__(self, source: str, field: str, message: str) -> None:
        self.source = source
        self.field = field
        self.message = message
        super().__init__(f"{source}: {field}: {message}")


class Family(enum.IntEnum):
    INET = socket.AF_INET
    INET6 = socket.AF_INET6

    @property
    def max_prefix(self) -> int:
        return 32 if self is Family.INET else 128


class Protocol(enum.Enum):
    TCP = "tcp"
    UDP = "udp"
    SCTP = "sctp"

    @property
    def number(self) -> int:
        return _PROTO_NUMBERS[self]

    @classmethod
    def from_number(cls, number: int, source: str = "kernel") -> Protocol:
        for proto, num in _PROTO_NUMBERS.items():
            if num == number:
                return proto
        raise ModelError(source, "protocol", f"unsupported IP protocol number {number}")


_PROTO_NUMBERS = {Protocol.TCP: socket.IPPROTO_TCP, Protocol.UDP: socket.IPPROTO_UDP,
                  Protocol.SCTP: 132}


class FwdMethod(enum.IntEnum):
    """Forwarding method (IP_VS_CONN_F_FWD_MASK part of the conn flags)."""

    MASQ = 0
    LOCAL = 1
    TUNNEL = 2
    ROUTE = 3
    FULLNAT = 5

    @classmethod
    def parse(cls, value: str | int | FwdMethod, source: str = "value") -> FwdMethod:
        if isinstance(value, FwdMethod):
            return value
        if isinstance(value, int):
            try:
                return cls(value)
            except ValueError:
                raise ModelError(source, "forwarding method",
                                 f"unknown method number {value}") from None
        try:
            return _FWD_NAMES[value.strip().lower()]
        except KeyError:
            raise ModelError(source, "forwarding method",
                             f"unknown method {value!r} (one of "
                             f"{', '.join(sorted(_FWD_NAMES))})") from None


_FWD_NAMES = {
    "masq": FwdMethod.MASQ, "nat": FwdMethod.MASQ, "local": FwdMethod.LOCAL,
    "tunnel": FwdMethod.TUNNEL, "ipip": FwdMethod.TUNNEL, "dr": FwdMethod.ROUTE,
    "route": FwdMethod.ROUTE, "gatewaying": FwdMethod.ROUTE, "fullnat": FwdMethod.FULLNAT,
}
FORWARD_NAMES = tuple(sorted(_FWD_NAMES))  # every spelling FwdMethod.parse takes


class TunnelType(enum.IntEnum):
    IPIP = 0
    GUE = 1
    GRE = 2


class ProxyProtocol(enum.IntEnum):
    """The PROXY protocol header a FULLNAT real server gets in front of the
    client's stream (IPVS_DEST_ATTR_PROXY_PROTOCOL): off, the text form v1 or
    the binary v2. Spelt "off", "v1", "v2" everywhere outside the kernel."""

    OFF = 0
    V1 = 1
    V2 = 2

    def __str__(self) -> str:
        return self.name.lower()

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    @classmethod
    def parse(cls, value: object, source: str = "value") -> ProxyProtocol:
        """``"off"``, ``"v1"`` or ``"v2"`` (any case); anything else is a ModelError."""
        if isinstance(value, ProxyProtocol):
            return value
        if isinstance(value, str) and value.strip().lower() in PROXY_PROTOCOL_NAMES:
            return cls[value.strip().upper()]
        raise ModelError(source, "proxy_protocol",
                         f"not a PROXY protocol setting: {value!r} (off, v1 or v2)")


PROXY_PROTOCOL_NAMES = ("off", "v1", "v2")


def family_of(addr: IPAddress) -> Family:
    return Family.INET if addr.version == 4 else Family.INET6


@dataclass(frozen=True)
class Stats:
    """Service or real-server counters (IPVS_*_ATTR_STATS64), read only."""

    conns: int = 0
    inpkts: int = 0
    outpkts: int = 0
    inbytes: int = 0
    outbytes: int = 0
    cps: int = 0
    inpps: int = 0
    outpps: int = 0
    inbps: int = 0
    outbps: int = 0

    @classmethod
    def from_mapping(cls, values: Mapping[str, int]) -> Stats:
        names = {f.name for f in fields(cls)}
        return cls(**{k: int(v) for k, v in values.items() if k in names})


def _check_int(source: str, name: str, value: int, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelError(source, name, f"not an integer: {value!r}")
    if not lo <= value <= hi:
        raise ModelError(source, name, f"{value} out of range {lo}-{hi}")


@dataclass(frozen=True)
class Service:
    """A virtual service: protocol + address + port, or a firewall mark.

    ``af`` follows from the address; a fwmark service has no address and
    takes its family from ``fwmark_af``. ``persistent`` is the persistence
    timeout in seconds (0: not persistent); ``netmask`` the persistence
    granularity as a prefix length (default: a single client address).
    """

    protocol: Protocol = Protocol.TCP
    addr: IPAddress | None = None
    port: int = 0
    fwmark: int = 0
    fwmark_af: Family = Family.INET
    scheduler: str = "wlc"
    persistent: int = 0
    netmask: int | None = None
    synproxy: bool = False
    flags: int = 0
    pe_name: str | None = None
    stats: Stats | None = field(default=None, compare=False)
    # The service's SYN proxy counters by their ext-stats names (0029), read only:
    # None when the kernel sends none (stock modules, the SYN proxy never on).
    sp_stats: Mapping[str, int] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        source = "service"
        if self.fwmark:
            _check_int(source, "fwmark", self.fwmark, 1, U32_MAX)
            if self.addr is not None or self.port:
                raise ModelError(source, "fwmark",
                                 "a fwmark service has no address or port")
        else:
            if self.addr is None:
                raise ModelError(source, "address", "a service needs an address or fwmark")
            if not isinstance(self.addr, ipaddress.IPv4Address | ipaddress.IPv6Address):
                raise ModelError(source, "address", f"not an IP address: {self.addr!r}")
            # Port 0 is how ipvsadm spells "all ports" for a persistent service.
            _check_int(source, "port", self.port, 0 if self.persistent else 1, 65535)
            if not self.port and not self.persistent:
                raise ModelError(source, "port", "port 0 needs a persistent service")
        if not isinstance(self.scheduler, str) or not _MODULE_NAME.fullmatch(self.scheduler):
            raise ModelError(source, "scheduler", f"not a scheduler name: {self.scheduler!r}")
        if self.pe_name is not None and not _MODULE_NAME.fullmatch(self.pe_name):
            raise ModelError(source, "pe_name", f"not a persistence engine: {self.pe_name!r}")
        _check_int(source, "persistent", self.persistent, 0, U32_MAX)
        if self.netmask is not None:
            _check_int(source, "netmask", self.netmask, 1, self.af.max_prefix)
            if self.netmask == self.af.max_prefix:  # the default, spelt out
                object.__setattr__(self, "netmask", None)
        if self.flags & ~SETTABLE_FLAGS:
            raise ModelError(source, "flags", f"flags {self.flags:#x} include bits other "
                                              f"than one-packet/sched flags {SETTABLE_FLAGS:#x}")
        if self.synproxy and self.protocol is not Protocol.TCP:
            raise ModelError(source, "synproxy", "the SYN proxy is for TCP services only")

    @property
    def af(self) -> Family:
        return family_of(self.addr) if self.addr is not None else self.fwmark_af

    @property
    def prefix(self) -> int:
        """Persistence netmask as a prefix length (full length when unset)."""
        return self.netmask if self.netmask is not None else self.af.max_prefix

    @property
    def kernel_flags(self) -> int:
        """The flags word sent to the kernel."""
        f = self.flags
        if self.persistent:
            f |= IP_VS_SVC_F_PERSISTENT
        if self.synproxy:
            f |= IP_VS_SVC_F_SYNPROXY
        return f

    def key(self) -> tuple[int, int, IPAddress | None, int, int]:
        """What identifies the service to the kernel."""
        return (self.af, self.protocol.number if not self.fwmark else 0, self.addr,
                self.port, self.fwmark)

    def __str__(self) -> str:
        if self.fwmark:
            return f"fwmark {self.fwmark}/{'ipv6' if self.af == Family.INET6 else 'ipv4'}"
        return f"{format_endpoint(self.addr, self.port)}/{self.protocol.value}"


@dataclass(frozen=True)
class Dest:
    """A real server of a service. Counters are filled in only when listed."""

    addr: IPAddress
    port: int = 0
    fwd: FwdMethod = FwdMethod.MASQ
    weight: int = 1
    u_thresh: int = 0
    l_thresh: int = 0
    tun_type: TunnelType = TunnelType.IPIP
    tun_port: int = 0
    tun_flags: int = 0
    proxy_protocol: ProxyProtocol = ProxyProtocol.OFF
    active_conns: int = field(default=0, compare=False)
    inact_conns: int = field(default=0, compare=False)
    persist_conns: int = field(default=0, compare=False)
    stats: Stats | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        source = "real server"
        if not isinstance(self.addr, ipaddress.IPv4Address | ipaddress.IPv6Address):
            raise ModelError(source, "address", f"not an IP address: {self.addr!r}")
        _check_int(source, "port", self.port, 0, 65535)
        if not isinstance(self.fwd, FwdMethod):
            raise ModelError(source, "forwarding method", f"not a method: {self.fwd!r}")
        _check_int(source, "weight", self.weight, 0, INT_MAX)
        _check_int(source, "u_thresh", self.u_thresh, 0, INT_MAX)
        _check_int(source, "l_thresh", self.l_thresh, 0, INT_MAX)
        if self.u_thresh and self.l_thresh > self.u_thresh:
            raise ModelError(source, "l_thresh", f"lower threshold {self.l_thresh} above "
                                                 f"upper threshold {self.u_thresh}")
        _check_int(source, "tun_port", self.tun_port, 0, 65535)
        _check_int(source, "tun_flags", self.tun_flags, 0, 0xFFFF)
        if not isinstance(self.proxy_protocol, ProxyProtocol):
            raise ModelError(source, "proxy_protocol",
                             f"not a PROXY protocol setting: {self.proxy_protocol!r}")
        if self.proxy_protocol is not ProxyProtocol.OFF and self.fwd is not FwdMethod.FULLNAT:
            raise ModelError(source, "proxy_protocol",
                             f"real server {self} uses {self.fwd.name.lower()} forwarding: "
                             f"the PROXY protocol header ({self.proxy_protocol}) needs "
                             "FULLNAT forwarding")

    @property
    def af(self) -> Family:
        return family_of(self.addr)

    def __str__(self) -> str:
        return format_endpoint(self.addr, self.port)


@dataclass(frozen=True)
class Laddr:
    """A FULLNAT local address of a service; counters are filled in when listed."""

    addr: IPAddress
    port_conflict: int = field(default=0, compare=False)
    conn_counts: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        source = "laddr"
        if not isinstance(self.addr, ipaddress.IPv4Address | ipaddress.IPv6Address):
            raise ModelError(source, "address", f"not an IP address: {self.addr!r}")

    @property
    def af(self) -> Family:
        return family_of(self.addr)


# The SYN proxy rewrites sequence numbers both ways, so replies must come back
# through the balancer: DR and TUN servers answer clients directly, a local one
# never passes the translation. The kernel refuses these (EINVAL); this says why.
SYNPROXY_FWD = (FwdMethod.MASQ, FwdMethod.FULLNAT)


def synproxy_dest_error(dest: Dest) -> str | None:
    """Why ``dest`` cannot serve a SYN-proxy service, or None if its method can
    (whether its address is one of the balancer's own only the kernel knows)."""
    if dest.fwd in SYNPROXY_FWD:
        return None
    how = {FwdMethod.ROUTE: "direct routing (-g)", FwdMethod.TUNNEL: "tunneling (-i)",
           FwdMethod.LOCAL: "local delivery"}.get(dest.fwd, dest.fwd.name)
    return (f"real server {dest} uses {how}: a SYN-proxy service needs NAT (-m) or "
            f"FULLNAT (--fullnat) real servers, whose replies come back through the "
            f"balancer")


def proxy_protocol_error(svc: Service, dest: Dest) -> str | None:
    """Why ``dest`` cannot have its PROXY protocol setting in ``svc``, or None.
    The header is prepended to a TCP stream: a UDP or SCTP service cannot have
    it (a fwmark service can: it applies to the mark's TCP connections)."""
    if dest.proxy_protocol is ProxyProtocol.OFF or svc.fwmark \
            or svc.protocol is Protocol.TCP:
        return None
    return (f"real server {dest} of {svc}: the PROXY protocol header is for TCP "
            f"services only, not {svc.protocol.name}")


@dataclass(frozen=True)
class Timeouts:
    """Connection timeouts in seconds; 0 in a request leaves that one unchanged."""

    tcp: int = 0
    tcp_fin: int = 0
    udp: int = 0

    def __post_init__(self) -> None:
        source = "timeouts"
        for name in ("tcp", "tcp_fin", "udp"):
            _check_int(source, name, getattr(self, name), 0, INT_MAX // 1000)


@dataclass(frozen=True)
class Info:
    version: str
    conn_tab_size: int


@dataclass(frozen=True)
class SyncDaemon:
    """A connection-sync daemon: listed, started and stopped like ipvsadm does."""

    state: str  # "master" or "backup"
    mcast_ifn: str
    syncid: int
    sync_maxlen: int = 0
    mcast_group: IPAddress | None = None
    mcast_port: int = 0
    mcast_ttl: int = 0


def format_endpoint(addr: IPAddress | None, port: int) -> str:
    if addr is None:
        return f"*:{port}"
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


# ---- parsing loosely typed input at the edge -------------------------------------------


def parse_addr(value: object, source: str, name: str = "address") -> IPAddress:
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return value
    if not isinstance(value, str):
        raise ModelError(source, name, f"not an IP address: {value!r}")
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ModelError(source, name, f"not an IP address: {value!r}") from None


def parse_int(value: object, source: str, name: str, lo: int = 0,
              hi: int = INT_MAX) -> int:
    if isinstance(value, bool):
        raise ModelError(source, name, f"not an integer: {value!r}")
    if isinstance(value, str):
        try:
            value = int(value.strip(), 0)
        except ValueError:
            raise ModelError(source, name, f"not an integer: {value!r}") from None
    if not isinstance(value, int):
        raise ModelError(source, name, f"not an integer: {value!r}")
    _check_int(source, name, value, lo, hi)
    return value


def parse_endpoint(value: str, source: str, default_port: int | None = None
                   ) -> tuple[IPAddress, int]:
    """``192.0.2.1:80``, ``[2001:db8::1]:80``; a bare address takes ``default_port``."""
    text = value.strip()
    host, port_text = text, None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ModelError(source, "address", f"malformed endpoint {value!r}")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    addr = parse_addr(host, source)
    if port_text is None:
        if default_port is None:
            raise ModelError(source, "port", f"no port in {value!r}")
        return addr, default_port
    return addr, parse_int(port_text, source, "port", 0, 65535)


def parse_protocol(value: object, source: str) -> Protocol:
    if isinstance(value, Protocol):
        return value
    try:
        return Protocol(str(value).strip().lower())
    except ValueError:
        raise ModelError(source, "protocol",
                         f"unknown protocol {value!r} (tcp, udp or sctp)") from None


def _reraise(source: str, exc: ModelError) -> ModelError:
    return ModelError(source, exc.field, exc.message)


def make_service(*, source: str, protocol: object = "tcp", addr: object = None,
                 port: object = 0, fwmark: object = 0, family: object = None,
                 scheduler: object = "wlc", persistent: object = 0,
                 netmask: object = None, synproxy: object = False,
                 flags: object = 0) -> Service:
    """Build a :class:`Service` from loosely typed input; errors name ``source``."""
    proto = parse_protocol(protocol, source)
    mark = parse_int(fwmark, source, "fwmark", 0, U32_MAX)
    address = parse_addr(addr, source) if addr is not None else None
    fam = Family.INET
    if family is not None:
        names = {"ipv4": Family.INET, "inet": Family.INET, "ipv6": Family.INET6,
                 "inet6": Family.INET6, 4: Family.INET, 6: Family.INET6}
        if family not in names:
            raise ModelError(source, "family", f"unknown family {family!r}")
        fam = names[family]
    if not isinstance(synproxy, bool):
        raise ModelError(source, "synproxy", f"not a boolean: {synproxy!r}")
    mask = None if netmask is None else parse_int(netmask, source, "netmask", 1, 128)
    try:
        return Service(protocol=proto, addr=address,
                       port=parse_int(port, source, "port", 0, 65535), fwmark=mark,
                       fwmark_af=fam, scheduler=str(scheduler),
                       persistent=parse_int(persistent, source, "persistent", 0, U32_MAX),
                       netmask=mask, synproxy=synproxy,
                       flags=parse_int(flags, source, "flags", 0, U32_MAX))
    except ModelError as exc:
        raise _reraise(source, exc) from None


def make_dest(*, source: str, addr: object, port: object = 0, fwd: object = "masq",
              weight: object = 1, u_thresh: object = 0, l_thresh: object = 0,
              proxy_protocol: object = ProxyProtocol.OFF) -> Dest:
    """Build a :class:`Dest` from loosely typed input; errors name ``source``."""
    if not isinstance(fwd, str | int):
        raise ModelError(source, "forwarding method", f"not a method: {fwd!r}")
    try:
        return Dest(addr=parse_addr(addr, source),
                    port=parse_int(port, source, "port", 0, 65535),
                    fwd=FwdMethod.parse(fwd, source),
                    weight=parse_int(weight, source, "weight"),
                    u_thresh=parse_int(u_thresh, source, "u_thresh"),
                    l_thresh=parse_int(l_thresh, source, "l_thresh"),
                    proxy_protocol=ProxyProtocol.parse(proxy_protocol, source))
    except ModelError as exc:
        raise _reraise(source, exc) from None


def make_laddr(*, source: str, addr: object) -> Laddr:
    return Laddr(addr=parse_addr(addr, source, "laddr"))
