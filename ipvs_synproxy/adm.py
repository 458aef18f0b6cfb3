"""ipvsadm compatibility: ``ipvs-synproxy adm …`` and ``ipvsadm-sp``.

Accepts upstream ipvsadm 1.31 syntax and semantics (the Debian 12 binary is the
reference) and prints its listing and save formats byte for byte, so that
scripts written against ipvsadm keep working. Three layers:

* :func:`parse` turns one command line into an :class:`AdmCommand` (model
  values + output format), checking options the way ipvsadm does: the first
  option is the command, every option at most once, the command/option
  table, then the per-command rules. Bad input raises :class:`AdmUsageError`
  (exit status 2) before anything touches the kernel.
* the ``format_*`` functions are pure: model values in, text out.
* :func:`run` executes a command through :class:`ipvs_synproxy.netlink.IPVS`.

Extensions (long options only, so no upstream option changes meaning):

* ``--fullnat``: FULLNAT forwarding for ``-a``/``-e`` (next to -g/-i/-m). Listed
  with Forward ``FullNat`` (Alibaba's spelling), saved as ``--fullnat``.
* ``--synproxy`` / ``--no-synproxy``: the SYN proxy service flag for ``-A``/``-E``.
  ``-L`` appends `` synproxy`` to the service line (after ``ops``); ``-S``
  appends `` --synproxy`` to the ``-A`` line.
* ``--laddr-add ADDR`` / ``--laddr-del ADDR`` (with ``-t|-u|-f``) and
  ``--laddr-list [-t|-u|-f …]``: FULLNAT local addresses. ``-S`` emits one
  ``--laddr-add ADDR -t VIP:PORT`` line per local address after the service's
  real servers, and ``-R`` reads all of it back.

Known differences from ipvsadm 1.31: every usage error exits with status 2
(ipvsadm uses 255 for popt errors such as an unknown option or a missing
argument); ``-R`` checks every line before applying any (ipvsadm applies the
lines before a malformed one); a non-contiguous IPv4 persistence mask is
refused.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import ipaddress
import os
import re
import shlex
import socket
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO, TypeVar

from ipvs_synproxy.model import (
    INT_MAX,
    IP_VS_SVC_F_ONEPACKET,
    IP_VS_SVC_F_SCHED1,
    IP_VS_SVC_F_SCHED2,
    IP_VS_SVC_F_SCHED3,
    Dest,
    Family,
    FwdMethod,
    Info,
    IPAddress,
    Laddr,
    ModelError,
    Protocol,
    Service,
    Stats,
    SyncDaemon,
    Timeouts,
    TunnelType,
    make_dest,
    make_service,
    synproxy_dest_error,
)
from ipvs_synproxy.netlink import (
    IPVS,
    IPVS_CMD_GET_LADDR,
    IpvsUnavailable,
    NetlinkError,
    NotSupported,
)
from ipvs_synproxy.netns import socket_in

_T = TypeVar("_T")

EXIT_OK = 0
EXIT_LIST_ERROR = 1  # ipvsadm: exit(1) when listing fails
EXIT_USAGE = 2
EXIT_KERNEL = 255  # ipvsadm: process_options() returned -1

MAX_TIMEOUT = 86400 * 31
DEFAULT_PERSISTENT_TIMEOUT = 360  # ipvsadm 1.31 -p without a value
DEFAULT_SCHEDULER = "wlc"
CONN_PROC_FILE = "/proc/net/ip_vs_conn"
IPVS_VERSION_TEXT = "1.31"

_SCHED_FLAG_MASK = IP_VS_SVC_F_SCHED1 | IP_VS_SVC_F_SCHED2 | IP_VS_SVC_F_SCHED3
_TUN_FLAG_NAMES = {0: "-c", 1: "+c", 2: "r+c"}
_TUN_FLAG_OPTS = {0: "--tun-nocsum", 1: "--tun-csum", 2: "--tun-remcsum"}


class AdmUsageError(Exception):
    """Bad command-line input: printed as is, exit status 2, nothing changed."""

    def __init__(self, message: str, *, try_help: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.try_help = try_help


# ---- the option table ---------------------------------------------------------------------
#
# Options that count for ipvsadm's command/option check, by the name its error
# messages use, in the order it checks them; then ours.

OPTION_NAMES = (
    "numeric", "connection", "service-address", "scheduler", "persistent", "netmask",
    "real-server", "forwarding-method", "weight", "u-threshold", "l-threshold",
    "mcast-interface", "timeout", "daemon", "stats", "rate", "thresholds",
    "persistent-conn", "nosort", "syncid", "exact", "ops", "pe", "sched-flags",
    "mcast-group", "mcast-port", "mcast-ttl", "sync-maxlen", "tun-info", "tun-type",
    "tun-port", "tun-nocsum", "tun-csum", "tun-remcsum",
    "synproxy",
)

# Per command: the options it accepts ("+" required, "1" at most one of these,
# " " optional); any other option is illegal with it.
_SVC_OPTS = {"service-address": "+", "scheduler": " ", "persistent": " ", "netmask": " ",
             "ops": " ", "pe": " ", "sched-flags": " ", "synproxy": " "}
_DEST_OPTS = {"service-address": "+", "real-server": "+", "forwarding-method": " ",
              "weight": " ", "u-threshold": " ", "l-threshold": " ", "tun-type": " ",
              "tun-port": " ", "tun-nocsum": " ", "tun-csum": " ", "tun-remcsum": " "}
COMMANDS: dict[str, dict[str, str]] = {
    "add-service": _SVC_OPTS,
    "edit-service": _SVC_OPTS,
    "delete-service": {"service-address": "+"},
    "flush": {},
    "list": {"numeric": " ", "connection": "1", "service-address": "1", "timeout": "1",
             "daemon": "1", "stats": " ", "rate": " ", "thresholds": " ",
             "persistent-conn": " ", "nosort": " ", "syncid": " ", "exact": " ",
             "tun-info": " "},
    "add-server": _DEST_OPTS,
    "delete-server": {"service-address": "+", "real-server": "+"},
    "edit-server": _DEST_OPTS,
    "set": {},
    "start-daemon": {"mcast-interface": " ", "syncid": " ", "mcast-group": " ",
                     "mcast-port": " ", "mcast-ttl": " ", "sync-maxlen": " "},
    "stop-daemon": {"syncid": " "},
    "restore": {},
    "save": {"numeric": " "},
    "zero": {"service-address": " "},
    "laddr-add": {"service-address": "+"},
    "laddr-del": {"service-address": "+"},
    "laddr-list": {"service-address": " ", "numeric": " "},
}


@dataclass(frozen=True)
class _Opt:
    key: str  # what the parser dispatches on
    arg: str  # "none", "required" or "optional"


_LONG: dict[str, _Opt] = {
    "add-service": _Opt("A", "none"), "edit-service": _Opt("E", "none"),
    "delete-service": _Opt("D", "none"), "clear": _Opt("C", "none"),
    "list": _Opt("L", "none"), "zero": _Opt("Z", "none"), "add-server": _Opt("a", "none"),
    "edit-server": _Opt("e", "none"), "delete-server": _Opt("d", "none"),
    "set": _Opt("set", "none"), "help": _Opt("h", "none"), "version": _Opt("v", "none"),
    "restore": _Opt("R", "none"), "save": _Opt("S", "none"),
    "start-daemon": _Opt("start-daemon", "required"),
    "stop-daemon": _Opt("stop-daemon", "required"),
    "tcp-service": _Opt("t", "required"), "udp-service": _Opt("u", "required"),
    "sctp-service": _Opt("sctp-service", "required"),
    "fwmark-service": _Opt("f", "required"), "scheduler": _Opt("s", "required"),
    "persistent": _Opt("p", "optional"), "netmask": _Opt("M", "required"),
    "real-server": _Opt("r", "required"), "masquerading": _Opt("m", "none"),
    "ipip": _Opt("i", "none"), "gatewaying": _Opt("g", "none"),
    "weight": _Opt("w", "required"), "u-threshold": _Opt("x", "required"),
    "l-threshold": _Opt("y", "required"), "numeric": _Opt("n", "none"),
    "connection": _Opt("c", "none"), "mcast-interface": _Opt("mcast-interface", "required"),
    "syncid": _Opt("syncid", "required"), "timeout": _Opt("timeout", "none"),
    "daemon": _Opt("daemon", "none"), "stats": _Opt("stats", "none"),
    "rate": _Opt("rate", "none"), "thresholds": _Opt("thresholds", "none"),
    "persistent-conn": _Opt("persistent-conn", "none"), "nosort": _Opt("nosort", "none"),
    "sort": _Opt("sort", "none"), "exact": _Opt("X", "none"), "ipv6": _Opt("6", "none"),
    "ops": _Opt("o", "none"), "pe": _Opt("pe", "required"),
    "sched-flags": _Opt("b", "required"), "mcast-group": _Opt("mcast-group", "required"),
    "mcast-port": _Opt("mcast-port", "required"), "mcast-ttl": _Opt("mcast-ttl", "required"),
    "sync-maxlen": _Opt("sync-maxlen", "required"), "tun-info": _Opt("tun-info", "none"),
    "tun-type": _Opt("tun-type", "required"), "tun-port": _Opt("tun-port", "required"),
    "tun-nocsum": _Opt("tun-nocsum", "none"), "tun-csum": _Opt("tun-csum", "none"),
    "tun-remcsum": _Opt("tun-remcsum", "none"),
    # ipvs-synproxy extensions
    "fullnat": _Opt("fullnat", "none"), "synproxy": _Opt("synproxy", "none"),
    "no-synproxy": _Opt("no-synproxy", "none"), "laddr-add": _Opt("laddr-add", "required"),
    "laddr-del": _Opt("laddr-del", "required"), "laddr-list": _Opt("laddr-list", "none"),
}
_SHORT: dict[str, _Opt] = {o.key: o for o in _LONG.values() if len(o.key) == 1}
_SHORT["l"] = _Opt("L", "none")

_COMMAND_OF_KEY = {
    "A": "add-service", "E": "edit-service", "D": "delete-service", "C": "flush",
    "L": "list", "Z": "zero", "a": "add-server", "e": "edit-server", "d": "delete-server",
    "set": "set", "R": "restore", "S": "save", "start-daemon": "start-daemon",
    "stop-daemon": "stop-daemon", "laddr-add": "laddr-add", "laddr-del": "laddr-del",
    "laddr-list": "laddr-list",
}


@dataclass(frozen=True)
class Format:
    """How to print a listing (ipvsadm's FMT_* flags)."""

    numeric: bool = False
    rule: bool = False
    stats: bool = False
    rate: bool = False
    thresholds: bool = False
    persistent_conn: bool = False
    nosort: bool = False
    exact: bool = False
    tun_info: bool = False


@dataclass(frozen=True)
class AdmCommand:
    """One parsed command line."""

    command: str
    options: frozenset[str] = frozenset()
    fmt: Format = Format()
    service: Service | None = None
    dest: Dest | None = None
    timeouts: Timeouts | None = None
    laddr: IPAddress | None = None
    daemon_state: str | None = None
    daemon: SyncDaemon | None = None


@dataclass
class _Raw:
    """What the options said, before it becomes model values (ipvsadm's ce)."""

    protocol: Protocol | None = None  # None until -t/-u/--sctp-service/-f
    af: int = 0
    addr: IPAddress | None = None
    port: int = 0
    fwmark: int = 0
    sched: str = ""
    flags: int = 0
    persistent: int = 0
    netmask: int = 0xFFFF_FFFF  # v4: mask in host order; v6: prefix length
    pe_name: str | None = None
    synproxy: bool = False
    d_af: int = 0
    d_addr: IPAddress | None = None
    d_port: int = 0
    fwd: FwdMethod = FwdMethod.ROUTE
    weight: int = 1
    u_thresh: int = 0
    l_thresh: int = 0
    tun_type: int = 0
    tun_port: int = 0
    tun_flags: int = 0
    sched_flags_arg: str = ""
    daemon: dict[str, object] = field(default_factory=dict)  # SyncDaemon fields
    options: list[str] = field(default_factory=list)
    fmt: dict[str, bool] = field(default_factory=dict)


# ---- number and address parsing, as ipvsadm does it ---------------------------------------

_STRTOL = re.compile(r"\s*[+-]?\d+")


def _string_to_number(text: str, lo: int, hi: int) -> int | None:
    """strtol() in base 10 over the whole string, within [lo, hi]; else None."""
    if not _STRTOL.fullmatch(text):
        return None
    value = int(text)
    return value if lo <= value <= hi else None


def _atoi(text: str) -> int:
    m = re.match(r"\s*[+-]?\d+", text)
    return int(m.group()) if m else 0


def _inet_aton(text: str) -> int | None:
    try:
        return int.from_bytes(socket.inet_aton(text), "big")
    except (OSError, ValueError):
        return None


def _host_to_v4(name: str) -> int | None:
    value = _inet_aton(name)
    if value is not None:
        return value
    try:
        return int.from_bytes(socket.inet_aton(socket.gethostbyname(name)), "big")
    except (OSError, UnicodeError, ValueError):
        return None


def _service_to_port(name: str, protocol: Protocol | None) -> int | None:
    if protocol is None:
        return None
    try:
        return socket.getservbyname(name, protocol.value)
    except (OSError, UnicodeError):
        return None


def _parse_service(text: str, protocol: Protocol | None
                   ) -> tuple[int, IPAddress, int | None] | None:
    """ipvsadm's parse_service(): (family, address, port or None), or None."""
    if not text or text.isdigit():
        return None
    buf, port_text = text, None
    if buf.startswith("["):
        inner, sep, rest = buf[1:].partition("]")
        if not sep or not rest.startswith(":"):
            return None
        buf, port_text = inner, rest[1:]
    try:
        addr: IPAddress = ipaddress.IPv6Address(socket.inet_pton(socket.AF_INET6, buf))
        af = socket.AF_INET6
    except (OSError, ValueError):
        if port_text is None and ":" in buf:
            buf, _, port_text = buf.rpartition(":")
        elif port_text is not None:
            port_text = None  # "[v4]:port": ipvsadm loses the port
        value = _host_to_v4(buf)
        if value is None:
            return None
        addr, af = ipaddress.IPv4Address(value), socket.AF_INET
    if port_text is None:
        return af, addr, None
    port = _string_to_number(port_text, 0, 65535)
    if port is None:
        port = _service_to_port(port_text, protocol)
    if port is None:
        return None
    return af, addr, port


def _parse_sched_flags(sched: str, arg: str) -> int:
    sched = sched or DEFAULT_SCHEDULER
    flags = 0
    for flag in (f for f in arg.split(",") if f):
        bits = {"flag-1": (IP_VS_SVC_F_SCHED1, None), "flag-2": (IP_VS_SVC_F_SCHED2, None),
                "flag-3": (IP_VS_SVC_F_SCHED3, None),
                "sh-fallback": (IP_VS_SVC_F_SCHED1, "sh"), "sh-port": (IP_VS_SVC_F_SCHED2, "sh"),
                "mh-fallback": (IP_VS_SVC_F_SCHED1, "mh"),
                "mh-port": (IP_VS_SVC_F_SCHED2, "mh")}.get(flag)
        if bits is None:
            raise AdmUsageError(f"invalid scheduler flag `{flag}'")
        if bits[1] is not None and sched != bits[1]:
            raise AdmUsageError(f"incompatible scheduler flag `{flag}'")
        flags |= bits[0]
    return flags


def _mask_to_prefix(mask: int) -> int | None:
    prefix = bin(mask).count("1")
    return prefix if prefix and mask == (0xFFFF_FFFF << (32 - prefix)) & 0xFFFF_FFFF else None


# ---- tokenizing (popt's rules: clustered short options, optional arguments) -------------


def _tokens(argv: Sequence[str]) -> Iterable[tuple[str, _Opt | None, str | None, str]]:
    """Yield (spelling, option or None for a positional, argument, raw) in order."""
    i = 0
    rest_positional = False
    while i < len(argv):
        tok = argv[i]
        i += 1
        if rest_positional or tok == "-" or not tok.startswith("-"):
            yield tok, None, tok, tok
            continue
        if tok == "--":
            rest_positional = True
            continue
        if tok.startswith("--"):
            name, eq, value = tok[2:].partition("=")
            opt = _LONG.get(name)
            if opt is None:
                raise AdmUsageError(f"--{name}: unknown option")
            if opt.arg == "none":
                if eq:
                    raise AdmUsageError(f"--{name}: option does not take an argument")
                yield tok, opt, None, tok
            elif eq:
                yield f"--{name}", opt, value, tok
            elif opt.arg == "required":
                if i >= len(argv):
                    raise AdmUsageError(f"--{name}: missing argument")
                yield f"--{name}", opt, argv[i], tok
                i += 1
            elif i < len(argv) and not argv[i].startswith("-"):
                yield f"--{name}", opt, argv[i], tok
                i += 1
            else:
                yield f"--{name}", opt, None, tok
            continue
        j = 1
        while j < len(tok):
            ch = tok[j]
            j += 1
            sopt = _SHORT.get(ch)
            if sopt is None:
                raise AdmUsageError(f"-{ch}: unknown option")
            if sopt.arg == "none":
                yield f"-{ch}", sopt, None, tok
                continue
            attached = tok[j:]
            if attached:
                yield f"-{ch}", sopt, attached, tok
            elif sopt.arg == "required":
                if i >= len(argv):
                    raise AdmUsageError(f"-{ch}: missing argument")
                yield f"-{ch}", sopt, argv[i], tok
                i += 1
            elif i < len(argv) and not argv[i].startswith("-"):
                yield f"-{ch}", sopt, argv[i], tok
                i += 1
            else:
                yield f"-{ch}", sopt, None, tok
            break


# ---- parsing ------------------------------------------------------------------------------


# ipvsadm's limits for the sync daemon's options: (field, low, high, message).
_DAEMON_NUMBERS = {
    "syncid": ("syncid", 0, 255, "illegal syncid specified"),
    "sync-maxlen": ("sync_maxlen", 1, 65535 - 20 - 8, "illegal sync-maxlen specified"),
    "mcast-port": ("mcast_port", 1, 65535, "illegal mcast-port specified"),
    "mcast-ttl": ("mcast_ttl", 1, 255, "illegal mcast-ttl specified"),
}
IFNAMSIZ = 16


def _daemon_option(raw: _Raw, key: str, arg: str) -> None:
    if key == "mcast-interface":
        # ipvsadm keeps what fits in the kernel's interface name buffer.
        raw.daemon["mcast_ifn"] = arg[: IFNAMSIZ - 1]
    elif key == "mcast-group":
        v6 = ":" in arg
        try:
            group = ipaddress.ip_address(arg)
        except ValueError:
            group = None
        if group is None or group.version != (6 if v6 else 4) or not group.is_multicast:
            raise AdmUsageError(f"invalid IPv{6 if v6 else 4} mcast-group `{arg}'")
        raw.daemon["mcast_group"] = group
    else:
        name, lo, hi, message = _DAEMON_NUMBERS[key]
        value = _string_to_number(arg, lo, hi)
        if value is None:
            raise AdmUsageError(message)
        raw.daemon[name] = value


def _set_option(raw: _Raw, name: str) -> None:
    if name in raw.options:
        raise AdmUsageError(f"multiple '{name}' options specified")
    raw.options.append(name)


def _check_options(command: str, options: Sequence[str]) -> None:
    table = COMMANDS[command]
    exclusive: str | None = None
    for name in OPTION_NAMES:
        code = table.get(name, "x")
        if name not in options:
            if code == "+":
                raise AdmUsageError(f"You need to supply the '{name}' option for the "
                                    f"'{command}' command")
            continue
        if code == "x":
            raise AdmUsageError(f"Illegal '{name}' option with the '{command}' command")
        if code == "1":
            if exclusive is not None:
                raise AdmUsageError(f"The option '{name}' conflicts with the '{exclusive}' "
                                    f"option in the '{command}' command")
            exclusive = name


def _apply_option(raw: _Raw, spelling: str, key: str, arg: str | None) -> None:
    if key in ("t", "u", "sctp-service"):
        _set_option(raw, "service-address")
        raw.protocol = {"t": Protocol.TCP, "u": Protocol.UDP}.get(key, Protocol.SCTP)
        parsed = _parse_service(arg or "", raw.protocol)
        if parsed is None:
            raise AdmUsageError("illegal virtual server address[:port] specified")
        raw.af, raw.addr, port = parsed
        if port is not None:
            raw.port = port
        if raw.af == socket.AF_INET6:
            raw.netmask = 128
    elif key == "f":
        _set_option(raw, "service-address")
        raw.af, raw.protocol = socket.AF_INET, Protocol.TCP
        mark = _string_to_number(arg or "", 1, 0xFFFF_FFFF)
        if mark is None:
            raise AdmUsageError(f"invalid fwmark value `{arg}' specified")
        raw.fwmark = mark
    elif key == "s":
        _set_option(raw, "scheduler")
        raw.sched = (arg or "")[:15]
    elif key == "p":
        _set_option(raw, "persistent")
        if arg is None:
            raw.persistent = DEFAULT_PERSISTENT_TIMEOUT
        else:
            value = _string_to_number(arg, 1, MAX_TIMEOUT)
            if value is None:
                raise AdmUsageError(f"invalid timeout value `{arg}' specified")
            raw.persistent = value
    elif key == "M":
        _set_option(raw, "netmask")
        if raw.af != socket.AF_INET6:
            mask = _host_to_v4(arg or "")
            if mask is None:
                raise AdmUsageError("illegal virtual server persistent mask specified")
            raw.netmask = mask
        else:
            raw.netmask = _atoi(arg or "")
            if not 1 <= raw.netmask <= 128:
                raise AdmUsageError("illegal ipv6 netmask specified")
    elif key == "r":
        _set_option(raw, "real-server")
        parsed = _parse_service(arg or "", raw.protocol)
        if parsed is None:
            raise AdmUsageError("illegal real server address[:port] specified")
        raw.d_af, raw.d_addr, port = parsed
        raw.d_port = raw.port if port is None else port
    elif key in ("i", "g", "m", "fullnat"):
        _set_option(raw, "forwarding-method")
        raw.fwd = {"i": FwdMethod.TUNNEL, "g": FwdMethod.ROUTE, "m": FwdMethod.MASQ,
                   "fullnat": FwdMethod.FULLNAT}[key]
    elif key in ("w", "x", "y"):
        name = {"w": "weight", "x": "u-threshold", "y": "l-threshold"}[key]
        _set_option(raw, name)
        value = _string_to_number(arg or "", 0, INT_MAX)
        if value is None:
            raise AdmUsageError(f"illegal {name.replace('-', '_')} specified")
        if key == "w":
            raw.weight = value
        elif key == "x":
            raw.u_thresh = value
        else:
            raw.l_thresh = value
    elif key == "c":
        _set_option(raw, "connection")
    elif key == "n":
        _set_option(raw, "numeric")
        raw.fmt["numeric"] = True
    elif key in ("mcast-interface", "mcast-group", "mcast-port", "mcast-ttl",
                 "sync-maxlen", "syncid"):
        _set_option(raw, key)
        _daemon_option(raw, key, arg or "")
    elif key in ("timeout", "daemon"):
        _set_option(raw, key)
    elif key in ("stats", "rate", "thresholds", "persistent-conn", "nosort", "tun-info"):
        _set_option(raw, key)
        raw.fmt[key.replace("-", "_")] = True
    elif key == "sort":
        pass  # the default; accepted for compatibility
    elif key == "X":
        _set_option(raw, "exact")
        raw.fmt["exact"] = True
    elif key == "6":
        if not raw.fwmark:
            raise AdmUsageError("-6 used before -f\n")
        raw.af, raw.netmask = socket.AF_INET6, 128
    elif key == "o":
        _set_option(raw, "ops")
        raw.flags |= IP_VS_SVC_F_ONEPACKET
    elif key == "pe":
        _set_option(raw, "pe")
        raw.pe_name = arg
    elif key == "b":
        _set_option(raw, "sched-flags")
        raw.sched_flags_arg = arg or ""
    elif key == "tun-type":
        _set_option(raw, "tun-type")
        types = {"ipip": TunnelType.IPIP, "gue": TunnelType.GUE, "gre": TunnelType.GRE}
        if arg not in types:
            raise AdmUsageError("illegal tunnel type specified")
        raw.tun_type = types[arg]
    elif key == "tun-port":
        _set_option(raw, "tun-port")
        value = _string_to_number(arg or "", 1, 65535)
        if value is None:
            raise AdmUsageError("illegal tunnel port specified")
        raw.tun_port = value
    elif key in ("tun-nocsum", "tun-csum", "tun-remcsum"):
        _set_option(raw, key)
        raw.tun_flags |= {"tun-nocsum": 0, "tun-csum": 1, "tun-remcsum": 2}[key]
    elif key in ("synproxy", "no-synproxy"):
        _set_option(raw, "synproxy")
        raw.synproxy = key == "synproxy"
    else:  # a second command
        raise AdmUsageError(f"invalid option `{spelling}'")


def _first_command(spelling: str, key: str, arg: str | None) -> tuple[str, str | None]:
    if key == "h":
        return "help", None
    if key == "v":
        return "version", None
    if key not in _COMMAND_OF_KEY:
        raise AdmUsageError(f"the first option must be a command (-A -E -D -C -R -S -a -e "
                            f"-d -L -Z --set …), not {spelling}", try_help=True)
    command = _COMMAND_OF_KEY[key]
    state = None
    if command in ("start-daemon", "stop-daemon"):
        if arg not in ("master", "backup"):
            raise AdmUsageError("illegal start-daemon parameter specified"
                                if command == "start-daemon"
                                else "illegal start_daemon specified")
        state = arg
    return command, state


def parse(argv: Sequence[str]) -> AdmCommand:
    """Parse one ipvsadm command line (without the program name)."""
    if not argv:
        return AdmCommand("list")
    raw = _Raw()
    command: str | None = None
    state: str | None = None
    laddr_arg: str | None = None
    positional: list[str] = []
    for spelling, opt, arg, _ in _tokens(argv):
        if opt is None:
            if command is None:
                raise AdmUsageError(f"the first argument must be a command option, "
                                    f"not {arg!r}", try_help=True)
            positional.append(arg or "")
            continue
        if command is None:
            command, state = _first_command(spelling, opt.key, arg)
            if command in ("help", "version"):
                return AdmCommand(command)
            if command in ("laddr-add", "laddr-del"):
                laddr_arg = arg
            continue
        _apply_option(raw, spelling, opt.key, arg)
    assert command is not None
    timeouts = None
    if command == "set":
        if len(positional) < 3:
            raise AdmUsageError("--set option requires 3 timeout values")
        values = []
        for text in positional[:3]:
            value = _string_to_number(text, 0, MAX_TIMEOUT)
            if value is None:
                raise AdmUsageError(f"invalid timeout value `{text}' specified")
            values.append(value)
        positional = positional[3:]
        try:
            timeouts = Timeouts(tcp=values[0], tcp_fin=values[1], udp=values[2])
        except ModelError as exc:
            raise AdmUsageError(f"--set: {exc.message}") from None
    if positional:
        raise AdmUsageError(f"unexpected argument {positional[0]}")
    if raw.sched_flags_arg:
        raw.flags = (raw.flags & ~_SCHED_FLAG_MASK) | \
            _parse_sched_flags(raw.sched, raw.sched_flags_arg)
    _check_options(command, raw.options)
    if command in ("add-service", "edit-service"):
        if not raw.fwmark and not raw.port and not raw.persistent:
            raise AdmUsageError("Zero port specified for non-persistent service")
        if raw.flags & IP_VS_SVC_F_ONEPACKET and not raw.fwmark \
                and raw.protocol is not Protocol.UDP:
            raise AdmUsageError("One-Packet Scheduling is only for UDP virtual services")
        if raw.synproxy and not raw.fwmark and raw.protocol is not Protocol.TCP:
            raise AdmUsageError("--synproxy: the SYN proxy is for TCP services only")
        if not raw.sched:
            raw.sched = DEFAULT_SCHEDULER
    if command in ("add-server", "edit-server"):
        if not raw.fwmark and raw.fwd in (FwdMethod.TUNNEL, FwdMethod.ROUTE):
            raw.d_port = raw.port
        if raw.d_af != raw.af and raw.fwd is not FwdMethod.TUNNEL:
            raise AdmUsageError("Different address family is allowed only for tunneling "
                                "servers")
        tun_opts = {"tun-type", "tun-port", "tun-nocsum", "tun-csum", "tun-remcsum"}
        if tun_opts & set(raw.options) and raw.fwd is not FwdMethod.TUNNEL:
            raise AdmUsageError("Tunnel options conflict with forward method")
        _check_tunnel_options(raw)
    if command == "list":
        opts = set(raw.options)
        if (opts & {"connection", "timeout", "daemon"}
                and opts & {"stats", "rate", "thresholds"}) or \
                (opts & {"timeout", "daemon"} and "persistent-conn" in opts):
            raise AdmUsageError("options conflicts in the list command")
    laddr = None
    if command in ("laddr-add", "laddr-del"):
        flag = f"--{command}"
        try:
            laddr = ipaddress.ip_address((laddr_arg or "").strip("[]"))
        except ValueError:
            raise AdmUsageError(f"{flag}: not an IP address: {laddr_arg!r}") from None
        if laddr.version != (6 if raw.af == socket.AF_INET6 else 4):
            raise AdmUsageError(f"{flag}: {laddr} is not of the service's address family")
    daemon = None
    if state is not None:
        # ipvsadm's defaults: interface eth0, sync id 0; the kernel fills the rest.
        fields: dict[str, Any] = {"mcast_ifn": "eth0", "syncid": 0, **raw.daemon}
        daemon = SyncDaemon(state=state, **fields)
    return AdmCommand(command=command, options=frozenset(raw.options),
                      fmt=Format(**raw.fmt), service=_service_of(raw, command),
                      dest=_dest_of(raw, command), timeouts=timeouts, laddr=laddr,
                      daemon_state=state, daemon=daemon)


def _check_tunnel_options(raw: _Raw) -> None:
    names = {TunnelType.IPIP: "ipip", TunnelType.GUE: "gue", TunnelType.GRE: "gre"}
    allowed = {TunnelType.IPIP: {},
               TunnelType.GUE: {"tun-port": "+", "tun-nocsum": "1", "tun-csum": "1",
                                "tun-remcsum": "1"},
               TunnelType.GRE: {"tun-nocsum": "1", "tun-csum": "1"}}[TunnelType(raw.tun_type)]
    first: str | None = None
    for name in ("tun-port", "tun-nocsum", "tun-csum", "tun-remcsum"):
        code = allowed.get(name, "x")
        if name not in raw.options:
            if code == "+":
                raise AdmUsageError(f"You need to supply the '{name}' option for the "
                                    f"'{names[TunnelType(raw.tun_type)]}' tunnel type")
            continue
        if code == "x":
            raise AdmUsageError(f"Illegal '{name}' option with the "
                                f"'{names[TunnelType(raw.tun_type)]}' tunnel type")
        if code == "1":
            if first is not None:
                raise AdmUsageError(f"The option '{name}' conflicts with the '{first}' "
                                    f"option in the '{names[TunnelType(raw.tun_type)]}' "
                                    "tunnel type")
            first = name


def _service_of(raw: _Raw, command: str) -> Service | None:
    if "service-address" not in raw.options:
        return None
    protocol = raw.protocol or Protocol.TCP
    source = "-f" if raw.fwmark else _PROTO_OPTION[protocol]
    netmask: int | None
    if raw.af == socket.AF_INET6:
        netmask = raw.netmask
    else:
        netmask = _mask_to_prefix(raw.netmask)
        if netmask is None:
            raise AdmUsageError("-M: only contiguous persistent masks are supported "
                                f"(got {ipaddress.IPv4Address(raw.netmask)})")
    editing = command in ("add-service", "edit-service")
    try:
        svc = make_service(
            source=source, protocol=protocol.value,
            addr=None if raw.fwmark else raw.addr, port=0 if raw.fwmark else raw.port,
            fwmark=raw.fwmark,
            family="ipv6" if raw.fwmark and raw.af == socket.AF_INET6 else "ipv4",
            scheduler=raw.sched or DEFAULT_SCHEDULER,
            persistent=raw.persistent if editing else 0,
            # a port-0 service is persistent: only its key matters for lookups
            netmask=netmask, synproxy=raw.synproxy and editing,
            flags=raw.flags if editing else 0)
        if raw.pe_name is not None:
            svc = dataclasses.replace(svc, pe_name=raw.pe_name or None)
    except ModelError as exc:
        if exc.field == "port" and not editing:
            # deleting/listing "VIP:0" names the persistent all-ports service
            return _service_key(raw)
        raise AdmUsageError(f"{source}: {exc.field}: {exc.message}") from None
    return svc


def _service_key(raw: _Raw) -> Service:
    """A service value that only identifies (port 0 is legal for lookups)."""
    return Service(protocol=raw.protocol or Protocol.TCP, addr=raw.addr, port=raw.port,
                   persistent=1)


def _dest_of(raw: _Raw, command: str) -> Dest | None:
    if "real-server" not in raw.options or raw.d_addr is None:
        return None
    try:
        dest = make_dest(source="-r", addr=raw.d_addr, port=raw.d_port, fwd=int(raw.fwd),
                         weight=raw.weight, u_thresh=raw.u_thresh, l_thresh=raw.l_thresh)
        return dataclasses.replace(dest, tun_type=TunnelType(raw.tun_type),
                                   tun_port=raw.tun_port, tun_flags=raw.tun_flags)
    except ModelError as exc:
        flag = {"u_thresh": "-x", "l_thresh": "-y", "weight": "-w"}.get(exc.field, "-r")
        raise AdmUsageError(f"{flag}: {exc.message}") from None


# ---- formatting (pure functions of model values) -----------------------------------------


def _c_int(value: int) -> int:
    """An unsigned difference as C converts it to int (ipvsadm's comparators)."""
    value &= 0xFFFF_FFFF
    return value - (1 << 32) if value & 0x8000_0000 else value


def _addr_words(addr: IPAddress | None, af: int) -> list[int]:
    if addr is None:
        return [0] * (4 if af == socket.AF_INET6 else 1)
    raw = addr.packed
    return [int.from_bytes(raw[i:i + 4], "big") for i in range(0, len(raw), 4)]


def _cmp_words(a: list[int], b: list[int]) -> int:
    r = 0
    for x, y in zip(a, b, strict=False):
        r = _c_int(x - y)
        if r:
            break
    return r


def _cmp_services(a: Service, b: Service) -> int:
    for x, y in ((a.fwmark, b.fwmark), (int(a.af), int(b.af)),
                 (0 if a.fwmark else a.protocol.number, 0 if b.fwmark else b.protocol.number)):
        r = _c_int(x - y)
        if r:
            return r
    r = _cmp_words(_addr_words(a.addr, a.af), _addr_words(b.addr, a.af))
    return r or a.port - b.port


def _cmp_dests(a: Dest, b: Dest) -> int:
    r = _cmp_words(_addr_words(a.addr, a.af), _addr_words(b.addr, a.af))
    return r or a.port - b.port


def sort_services(services: Iterable[Service]) -> list[Service]:
    return sorted(services, key=functools.cmp_to_key(_cmp_services))


def sort_dests(dests: Iterable[Dest]) -> list[Dest]:
    return sorted(dests, key=functools.cmp_to_key(_cmp_dests))


def _ntop(addr: IPAddress) -> str:
    fam = socket.AF_INET if addr.version == 4 else socket.AF_INET6
    return socket.inet_ntop(fam, addr.packed)


def _resolve_addr(addr: IPAddress) -> str:
    try:
        return socket.gethostbyaddr(_ntop(addr))[0]
    except (OSError, UnicodeError):
        return _ntop(addr)


def _resolve_port(port: int, protocol: Protocol) -> str:
    try:
        return socket.getservbyport(port, protocol.value)
    except (OSError, OverflowError):
        return str(port)


def addrport(addr: IPAddress, port: int, protocol: Protocol, numeric: bool) -> str:
    """ipvsadm's addrport_to_anyname()."""
    host = _ntop(addr) if numeric else _resolve_addr(addr)
    service = str(port) if numeric else _resolve_port(port, protocol)
    return f"[{host}]:{service}" if addr.version == 6 else f"{host}:{service}"


def format_largenum(value: int, exact: bool) -> str:
    """ipvsadm's print_largenum(): 9 columns, K/M/G/T unless exact."""
    if exact:
        text = str(value)
        return text.rjust(9 if len(text) <= 8 else len(text) + 1)
    for limit, div, unit in ((100_000_000, 1, ""), (1_000_000_000, 1000, "K"),
                             (100_000_000_000, 1_000_000, "M"),
                             (100_000_000_000_000, 1_000_000_000, "G")):
        if value < limit:
            return f"{value // div:{8 if unit else 9}d}{unit}"
    return f"{value // 1_000_000_000_000:8d}T"


def _sched_flags_text(svc: Service) -> str:
    names: list[str] = []
    if svc.scheduler in ("sh", "mh"):
        if svc.flags & IP_VS_SVC_F_SCHED1:
            names.append(f"{svc.scheduler}-fallback")
        if svc.flags & IP_VS_SVC_F_SCHED2:
            names.append(f"{svc.scheduler}-port")
    else:
        for i, bit in enumerate((IP_VS_SVC_F_SCHED1, IP_VS_SVC_F_SCHED2,
                                 IP_VS_SVC_F_SCHED3), 1):
            if svc.flags & bit:
                names.append(f"flag-{i}")
    return ",".join(names)


_PROTO_OPTION = {Protocol.TCP: "-t", Protocol.UDP: "-u", Protocol.SCTP: "--sctp-service"}
_FWD_NAME = {FwdMethod.MASQ: "Masq", FwdMethod.LOCAL: "Local", FwdMethod.TUNNEL: "Tunnel",
             FwdMethod.ROUTE: "Route", FwdMethod.FULLNAT: "FullNat"}
_FWD_SWITCH = {FwdMethod.MASQ: "-m", FwdMethod.LOCAL: "-g", FwdMethod.TUNNEL: "-i",
               FwdMethod.ROUTE: "-g", FwdMethod.FULLNAT: "--fullnat"}


def service_name(svc: Service, fmt: Format) -> str:
    """The service as ipvsadm names it in a listing or (rule) a command line."""
    if svc.fwmark:
        v6 = svc.af == Family.INET6
        if fmt.rule:
            return f"-f {svc.fwmark} -6" if v6 else f"-f {svc.fwmark}"
        return f"FWM  {svc.fwmark} IPv6" if v6 else f"FWM  {svc.fwmark}"
    assert svc.addr is not None
    vname = addrport(svc.addr, svc.port, svc.protocol, fmt.numeric)
    if fmt.rule:
        return f"{_PROTO_OPTION[svc.protocol]} {vname}"
    name = f"{svc.protocol.name:<4s} {vname}"
    return name if svc.af == Family.INET6 else name[:33]


def _mask_text(svc: Service) -> str:
    if svc.af == Family.INET6:
        return str(svc.prefix)
    return str(ipaddress.IPv4Address((0xFFFF_FFFF << (32 - svc.prefix)) & 0xFFFF_FFFF))


def format_title(fmt: Format) -> str:
    if fmt.stats:
        return (f"{'Prot LocalAddress:Port':<33s} {'Conns':>8s} {'InPkts':>8s} "
                f"{'OutPkts':>8s} {'InBytes':>8s} {'OutBytes':>8s}\n  -> RemoteAddress:Port\n")
    if fmt.rate:
        return (f"{'Prot LocalAddress:Port':<33s} {'CPS':>8s} {'InPPS':>8s} {'OutPPS':>8s} "
                f"{'InBPS':>8s} {'OutBPS':>8s}\n  -> RemoteAddress:Port\n")
    if fmt.thresholds:
        return (f"{'Prot LocalAddress:Port':<33s} {'Uthreshold':<10s} {'Lthreshold':<10s} "
                f"{'ActiveConn':<10s} {'InActConn':<10s}\n  -> RemoteAddress:Port\n")
    if fmt.persistent_conn:
        return (f"{'Prot LocalAddress:Port':<33s} {'Weight':<9s} {'PersistConn':<11s} "
                f"{'ActiveConn':<10s} {'InActConn':<10s}\n  -> RemoteAddress:Port\n")
    if fmt.tun_info:
        return ("Prot LocalAddress:Port Scheduler Flags\n  -> RemoteAddress:Port           "
                "Forward TunnelInfo    Weight ActiveConn InActConn\n")
    if fmt.rule:
        return ""
    return ("Prot LocalAddress:Port Scheduler Flags\n"
            "  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n")


def _tun_info(dest: Dest) -> str:
    if dest.fwd is not FwdMethod.TUNNEL:
        return "n/a"
    if dest.tun_type is TunnelType.GUE:
        return f"gue:{dest.tun_port}:{_TUN_FLAG_NAMES.get(dest.tun_flags, '')}"
    if dest.tun_type is TunnelType.GRE:
        return f"gre:{_TUN_FLAG_NAMES.get(dest.tun_flags, '')}"
    return "ipip"


def _service_line(svc: Service, fmt: Format, name: str) -> str:
    stats = svc.stats or Stats()
    if fmt.rule:
        line = f"-A {name} -s {svc.scheduler}"
        if svc.persistent:
            line += f" -p {svc.persistent}"
            if svc.netmask is not None:
                line += f" -M {_mask_text(svc)}"
        if svc.pe_name:
            line += f" --pe {svc.pe_name}"
        if svc.flags & IP_VS_SVC_F_ONEPACKET:
            line += " -o"
        if svc.flags & _SCHED_FLAG_MASK:
            line += f" -b {_sched_flags_text(svc)}"
        if svc.synproxy:
            line += " --synproxy"
        return line
    if fmt.stats or fmt.rate:
        values = ((stats.conns, stats.inpkts, stats.outpkts, stats.inbytes, stats.outbytes)
                  if fmt.stats else
                  (stats.cps, stats.inpps, stats.outpps, stats.inbps, stats.outbps))
        return f"{name:<33s}" + "".join(format_largenum(v, fmt.exact) for v in values)
    line = f"{name} {svc.scheduler}"
    if svc.flags & _SCHED_FLAG_MASK:
        line += f" ({_sched_flags_text(svc)})"
    if svc.persistent:
        line += f" persistent {svc.persistent}"
        if svc.netmask is not None:
            line += f" mask {_mask_text(svc)}"
        if svc.pe_name:
            line += f" pe {svc.pe_name}"
    if svc.flags & IP_VS_SVC_F_ONEPACKET:
        line += " ops"
    if svc.synproxy:
        line += " synproxy"
    return line


def _dest_line(svc_name: str, svc: Service, dest: Dest, fmt: Format) -> str:
    dname = addrport(dest.addr, dest.port, svc.protocol, fmt.numeric)
    if not fmt.rule and dest.af != Family.INET6:
        dname = dname[:28]
    stats = dest.stats or Stats()
    if fmt.rule:
        line = f"-a {svc_name} -r {dname} {_FWD_SWITCH[dest.fwd]} -w {dest.weight}"
        if dest.fwd is FwdMethod.TUNNEL:
            line += f" --tun-type {dest.tun_type.name.lower()}"
            if dest.tun_type is TunnelType.GUE:
                line += f" --tun-port {dest.tun_port}"
            if dest.tun_type is not TunnelType.IPIP:
                line += f" {_TUN_FLAG_OPTS.get(dest.tun_flags, '')}"
        return line
    if fmt.stats:
        return f"  -> {dname:<28s}" + "".join(
            format_largenum(v, fmt.exact) for v in
            (stats.conns, stats.inpkts, stats.outpkts, stats.inbytes, stats.outbytes))
    if fmt.rate:
        return (f"  -> {dname:<28s} {stats.cps:8d} {stats.inpps:8d} {stats.outpps:8d}"
                + format_largenum(stats.inbps, fmt.exact)
                + format_largenum(stats.outbps, fmt.exact))
    if fmt.thresholds:
        return (f"  -> {dname:<28s} {dest.u_thresh:<10d} {dest.l_thresh:<10d} "
                f"{dest.active_conns:<10d} {dest.inact_conns:<10d}")
    if fmt.persistent_conn:
        return (f"  -> {dname:<28s} {dest.weight:<9d} {dest.persist_conns:<11d} "
                f"{dest.active_conns:<10d} {dest.inact_conns:<10d}")
    if fmt.tun_info:
        return (f"  -> {dname:<28s} {_FWD_NAME[dest.fwd]:<7s} {_tun_info(dest):<13s} "
                f"{dest.weight:<6d} {dest.active_conns:<10d} {dest.inact_conns:<10d}")
    return (f"  -> {dname:<28s} {_FWD_NAME[dest.fwd]:<7s} {dest.weight:<6d} "
            f"{dest.active_conns:<10d} {dest.inact_conns:<10d}")


def format_service(svc: Service, dests: Sequence[Dest], fmt: Format,
                   laddrs: Sequence[Laddr] = ()) -> str:
    """One service and its real servers (ipvsadm's print_service_entry())."""
    name = service_name(svc, fmt)
    lines = [_service_line(svc, fmt, name)]
    for dest in dests if fmt.nosort else sort_dests(dests):
        lines.append(_dest_line(name, svc, dest, fmt))
    if fmt.rule:
        lines += [f"--laddr-add {_ntop(la.addr)} {name}" for la in laddrs]
    return "".join(f"{line}\n" for line in lines)


def format_header(info: Info) -> str:
    return f"IP Virtual Server version {info.version} (size={info.conn_tab_size})\n"


def format_table(info: Info | None,
                 entries: Sequence[tuple[Service, Sequence[Dest], Sequence[Laddr]]],
                 fmt: Format) -> str:
    """``-L``/``-S``: the whole table (``info`` None: no version line, as for ``-L -t``)."""
    out = format_header(info) if info is not None and not fmt.rule else ""
    out += format_title(fmt)
    if not fmt.nosort:
        order = {id(svc): i for i, svc in enumerate(sort_services(e[0] for e in entries))}
        entries = sorted(entries, key=lambda e: order[id(e[0])])
    for svc, dests, laddrs in entries:
        out += format_service(svc, dests, fmt, laddrs)
    return out


def format_timeouts(t: Timeouts) -> str:
    return f"Timeout (tcp tcpfin udp): {t.tcp} {t.tcp_fin} {t.udp}\n"


def format_daemons(daemons: Sequence[SyncDaemon]) -> str:
    """``-L --daemon``: one line per running sync daemon (ipvsadm's list_daemon())."""
    out = ""
    for d in daemons:
        if d.state not in ("master", "backup"):
            continue
        out += f"{d.state} sync daemon (mcast={d.mcast_ifn}, syncid={d.syncid}"
        if d.sync_maxlen:
            out += f", maxlen={d.sync_maxlen}"
        if d.mcast_group is not None:
            out += f", group={_ntop(d.mcast_group)}"
        if d.mcast_port:
            out += f", port={d.mcast_port}"
        if d.mcast_ttl:
            out += f", ttl={d.mcast_ttl}"
        out += ")\n"
    return out


def _conn_addr(text: str) -> IPAddress:
    try:
        return ipaddress.IPv6Address(socket.inet_pton(socket.AF_INET6, text))
    except (OSError, ValueError):
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, text))
    except (OSError, ValueError):
        m = re.match(r"\s*(?:0[xX])?([0-9a-fA-F]*)", text)
        return ipaddress.IPv4Address(int(m.group(1) or "0", 16) & 0xFFFF_FFFF if m else 0)


def format_connections(proc_text: str, fmt: Format) -> str:
    """``-L -c``: /proc/net/ip_vs_conn in ipvsadm's layout."""
    out = "IPVS connection entries\n"
    if fmt.persistent_conn:
        out += (f"pro expire {'state':<11s} {'source':<18s} {'virtual':<18s} "
                f"{'destination':<18s} {'pe name':<16s} pe_data\n")
    else:
        out += (f"pro expire {'state':<11s} {'source':<18s} {'virtual':<18s} "
                "destination\n")
    for line in proc_text.splitlines()[1:]:
        f = line.split()
        if len(f) < 9:
            continue
        proto_name = f[0]
        protocol = {"TCP": Protocol.TCP, "UDP": Protocol.UDP,
                    "SCTP": Protocol.SCTP}.get(proto_name, Protocol.TCP)
        caddr, vaddr, daddr = _conn_addr(f[1]), _conn_addr(f[3]), _conn_addr(f[5])
        cport, vport, dport = (int(f[i], 16) & 0xFFFF for i in (2, 4, 6))
        expires = int(f[8])
        cname = addrport(caddr, cport, protocol, fmt.numeric)
        vname = addrport(vaddr, vport, protocol, fmt.numeric)
        dname = addrport(daddr, dport, protocol, fmt.numeric)
        expire = f"{expires // 60:02d}:{expires % 60:02d}"
        if fmt.persistent_conn and len(f) >= 11:
            out += (f"{proto_name:<3s} {expire:<6s} {f[7]:<11s} {cname:<18s} {vname:<18s} "
                    f"{dname:<16s} {f[9]:<18s} {f[10]}\n")
        else:
            out += (f"{proto_name:<3s} {expire:<6s} {f[7]:<11s} {cname:<18s} {vname:<18s} "
                    f"{dname}\n")
    return out


def format_laddrs(entries: Sequence[tuple[Service, Sequence[Laddr]]], fmt: Format) -> str:
    """``--laddr-list``: each service, then its local addresses with their counters."""
    out = (f"{'Prot LocalAddress:Port':<33s} Laddrs\n"
           f"  -> {'LocalAddress':<28s} {'Conflicts':<10s} {'Conns':<10s}\n")
    if not fmt.nosort:
        order = {id(svc): i for i, svc in enumerate(sort_services(e[0] for e in entries))}
        entries = sorted(entries, key=lambda e: order[id(e[0])])
    for svc, laddrs in entries:
        out += f"{service_name(svc, fmt):<33s} {len(laddrs)}\n"
        for la in laddrs:
            host = _ntop(la.addr) if fmt.numeric else _resolve_addr(la.addr)
            out += f"  -> {host:<28s} {la.port_conflict:<10d} {la.conn_counts:<10d}\n"
    return out


# ---- running commands ---------------------------------------------------------------------

# ipvsadm's ipvs_strerror(): per operation first, then per errno.
_OP_ERRORS: dict[tuple[str, int], str] = {
    ("add-service", errno.EEXIST): "Service already exists",
    ("add-service", errno.ENOENT): "Scheduler or persistence engine not found",
    ("edit-service", errno.ESRCH): "No such service",
    ("edit-service", errno.ENOENT): "Scheduler or persistence engine not found",
    ("delete-service", errno.ESRCH): "No such service",
    ("zero", errno.ESRCH): "No such service",
    ("add-server", errno.ESRCH): "Service not defined",
    ("add-server", errno.EEXIST): "Destination already exists",
    ("edit-server", errno.ESRCH): "Service not defined",
    ("edit-server", errno.ENOENT): "No such destination",
    ("delete-server", errno.ESRCH): "Service not defined",
    ("delete-server", errno.ENOENT): "No such destination",
    ("list", errno.ESRCH): "No such service",
    ("list", errno.ENOENT): "No such service",
    ("laddr-add", errno.ESRCH): "Service not defined",
    ("laddr-add", errno.EEXIST): "Local address already exists",
    ("laddr-del", errno.ESRCH): "Service not defined",
    ("laddr-del", errno.ENOENT): "No such Local address",
    ("laddr-list", errno.ESRCH): "No such service",
    ("start-daemon", errno.EEXIST): "Daemon has already run",
    ("stop-daemon", errno.ESRCH): "No daemon is running",
}
_ERRNO_TEXT = {
    errno.EPERM: "Permission denied (you must be root)",
    errno.EINVAL: "Invalid operation.  Possibly wrong module version, address not "
                  "unicast, ...",
    errno.ENOPROTOOPT: "Protocol not available",
    errno.ENOMEM: "Memory allocation problem",
    errno.EOPNOTSUPP: "Operation not supported with IPv6",
    errno.EAFNOSUPPORT: "Operation not supported with specified address family",
    errno.EMSGSIZE: "Module is wrong version",
}


def _is_local_address(addr: IPAddress, ns: str | None) -> bool:
    """Whether addr is an address of network namespace ns (it can be bound)."""
    fam = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    sock = socket_in(ns, fam, socket.SOCK_DGRAM) if ns else socket.socket(fam, socket.SOCK_DGRAM)
    with sock as s:
        try:
            s.bind((str(addr), 0))
        except OSError:
            return False
    return True


def kernel_error_text(command: str, code: int) -> str:
    return _OP_ERRORS.get((command, code)) or _ERRNO_TEXT.get(code) or os.strerror(code)


@dataclass
class Io:
    """Where a command reads and writes; ``read_conn`` returns /proc/net/ip_vs_conn."""

    stdin: TextIO
    stdout: TextIO
    stderr: TextIO
    read_conn: Callable[[], str]


def _read_proc_conn() -> str:
    with open(CONN_PROC_FILE) as f:
        return f.read()


def usage_text(prog: str) -> str:
    return (
        f"{version_text()}"
        "Usage:\n"
        f"  {prog} -A|E virtual-service [-s scheduler] [-p [timeout]] [-M netmask] "
        "[--pe persistence_engine] [-b sched-flags] [--synproxy|--no-synproxy]\n"
        f"  {prog} -D virtual-service\n"
        f"  {prog} -C\n"
        f"  {prog} -R\n"
        f"  {prog} -S [-n]\n"
        f"  {prog} -a|e virtual-service -r server-address [options]\n"
        f"  {prog} -d virtual-service -r server-address\n"
        f"  {prog} -L|l [virtual-service] [options]\n"
        f"  {prog} -Z [virtual-service]\n"
        f"  {prog} --set tcp tcpfin udp\n"
        f"  {prog} --laddr-add|--laddr-del address virtual-service\n"
        f"  {prog} --laddr-list [virtual-service] [-n]\n"
        f"  {prog} -h\n\n"
        "Commands, virtual-service and options are those of ipvsadm 1.31 (man ipvsadm):\n"
        "  -A -E -D -C -R -S -a -e -d -L|-l -Z --set, -t -u --sctp-service -f [-6],\n"
        "  -s -p -M --pe -b -o -r -g -i -m -w -x -y --tun-type --tun-port --tun-nocsum\n"
        "  --tun-csum --tun-remcsum, -c -n --timeout --daemon --stats --rate --exact\n"
        "  --thresholds --persistent-conn --tun-info --sort --nosort.\n\n"
        "ipvs-synproxy extensions:\n"
        "  --fullnat                           FULLNAT forwarding (with -a/-e)\n"
        "  --synproxy / --no-synproxy          SYN proxy on/off (with -A/-E, TCP)\n"
        "  --laddr-add address                 add a FULLNAT local address to a service\n"
        "  --laddr-del address                 delete a FULLNAT local address\n"
        "  --laddr-list                        list local addresses and their counters\n"
    )


def version_text() -> str:
    try:
        from importlib.metadata import version

        ours = version("ipvs-synproxy")
    except Exception:  # not installed: running from a checkout
        ours = "unknown"
    return f"ipvs-synproxy adm {ours} (ipvsadm v{IPVS_VERSION_TEXT} compatible)\n"


def _need(value: _T | None) -> _T:
    assert value is not None  # guaranteed by the command/option table
    return value


class _Runner:
    def __init__(self, io: Io, connect: Callable[[], IPVS], prog: str,
                 netns: str | None = None) -> None:
        self.io = io
        self.connect = connect
        self.prog = prog
        self.netns = netns
        self._ipvs: IPVS | None = None

    @property
    def ipvs(self) -> IPVS:
        if self._ipvs is None:
            self._ipvs = self.connect()
        return self._ipvs

    def close(self) -> None:
        if self._ipvs is not None:
            self._ipvs.close()

    def run(self, cmd: AdmCommand, reading_stdin: bool = False) -> int:
        listing = cmd.command in ("list", "save", "laddr-list")
        try:
            return self._run(cmd, reading_stdin)
        except IpvsUnavailable:
            raise
        except NotSupported as exc:
            ours = cmd.command.startswith("laddr") or (
                cmd.dest is not None and cmd.dest.fwd is FwdMethod.FULLNAT)
            text = str(exc) if ours else kernel_error_text(cmd.command, exc.code)
            self.io.stderr.write(f"{text}\n")
        except NetlinkError as exc:
            why = self._synproxy_refusal(cmd) if exc.code == errno.EINVAL else None
            self.io.stderr.write(f"{why or kernel_error_text(cmd.command, exc.code)}\n")
        return EXIT_LIST_ERROR if listing else EXIT_KERNEL

    def _synproxy_refusal(self, cmd: AdmCommand) -> str | None:
        """Why the kernel refused a real server for a SYN-proxy service, or
        the SYN proxy for a service with such real servers; None otherwise."""
        if cmd.service is None or cmd.command not in ("add-server", "edit-server",
                                                      "edit-service"):
            return None
        try:
            svc = self.ipvs.service(cmd.service)
            dests = [cmd.dest] if cmd.dest is not None else list(self.ipvs.dests(svc))
        except (NetlinkError, NotSupported):
            return None
        if cmd.command != "edit-service" and not svc.synproxy:
            return None
        if cmd.command == "edit-service" and (svc.synproxy or not cmd.service.synproxy):
            return None
        for d in dests:
            if why := synproxy_dest_error(d):
                return why
        for d in dests:
            if _is_local_address(d.addr, self.netns):
                return (f"real server {d} is one of this host's own addresses: a "
                        f"SYN-proxy service needs real servers on other hosts (its "
                        f"replies must pass the proxy's translation)")
        return None


    def _entries(self, services: list[Service], with_laddrs: bool
                 ) -> list[tuple[Service, Sequence[Dest], Sequence[Laddr]]]:
        laddrs_ok = with_laddrs and self.ipvs.supports(IPVS_CMD_GET_LADDR)
        return [(svc, self.ipvs.dests(svc), self.ipvs.laddrs(svc) if laddrs_ok else ())
                for svc in services]

    def _list(self, cmd: AdmCommand) -> int:
        out = self.io.stdout
        if "connection" in cmd.options:
            try:
                text = self.io.read_conn()
            except OSError:
                self.io.stderr.write(f"cannot open file {CONN_PROC_FILE}\n")
                return EXIT_LIST_ERROR
            out.write(format_connections(text, cmd.fmt))
        elif cmd.service is not None:
            svc = self.ipvs.service(cmd.service)
            out.write(format_title(cmd.fmt)
                      + format_service(svc, self.ipvs.dests(svc), cmd.fmt))
        elif "timeout" in cmd.options:
            out.write(format_timeouts(self.ipvs.timeouts()))
        elif "daemon" in cmd.options:
            out.write(format_daemons(self.ipvs.daemons()))
        else:
            info = self.ipvs.info()
            out.write(format_table(info, self._entries(self.ipvs.services(), False),
                                   cmd.fmt))
        return EXIT_OK

    def _run(self, cmd: AdmCommand, reading_stdin: bool) -> int:
        out = self.io.stdout
        c = cmd.command
        if c == "help":
            out.write(usage_text(self.prog))
        elif c == "version":
            out.write(version_text())
        elif c == "restore":
            if reading_stdin:
                raise AdmUsageError("-R: cannot restore from within a restore", try_help=True)
            return self.restore()
        elif c == "start-daemon" and cmd.daemon is not None:
            self.ipvs.start_daemon(cmd.daemon)
        elif c == "stop-daemon" and cmd.daemon is not None:
            self.ipvs.stop_daemon(cmd.daemon)
        elif c == "list":
            return self._list(cmd)
        elif c == "save":
            fmt = dataclasses.replace(cmd.fmt, rule=True)
            out.write(format_table(None, self._entries(self.ipvs.services(), True), fmt))
        elif c == "laddr-list":
            services = [self.ipvs.service(cmd.service)] if cmd.service is not None \
                else self.ipvs.services()
            out.write(format_laddrs([(s, self.ipvs.laddrs(s)) for s in services], cmd.fmt))
        elif c == "flush":
            self.ipvs.flush()
        elif c == "add-service":
            self.ipvs.add_service(_need(cmd.service))
        elif c == "edit-service":
            self.ipvs.edit_service(_need(cmd.service))
        elif c == "delete-service":
            self.ipvs.del_service(_need(cmd.service))
        elif c == "zero":
            self.ipvs.zero(cmd.service)
        elif c == "add-server":
            self.ipvs.add_dest(_need(cmd.service), _need(cmd.dest))
        elif c == "edit-server":
            self.ipvs.edit_dest(_need(cmd.service), _need(cmd.dest))
        elif c == "delete-server":
            self.ipvs.del_dest(_need(cmd.service), _need(cmd.dest))
        elif c == "set":
            self.ipvs.set_timeouts(_need(cmd.timeouts))
        elif c in ("laddr-add", "laddr-del"):
            assert cmd.laddr is not None
            (self.ipvs.add_laddr if c == "laddr-add" else self.ipvs.del_laddr)(
                _need(cmd.service), cmd.laddr)
        return EXIT_OK

    def restore(self) -> int:
        """``-R``: every line is checked first, so bad input changes nothing; then
        the lines run in order as with ipvsadm (a line the kernel refuses is
        reported and the next one still runs; the status is the last line's)."""
        commands: list[AdmCommand] = []
        for number, line in enumerate(self.io.stdin.read().splitlines(), 1):
            try:
                words = shlex.split(line, comments=True)
            except ValueError as exc:
                raise AdmUsageError(f"-R: line {number}: {exc}") from None
            if not words:
                continue
            try:
                cmd = parse(words)
            except AdmUsageError as exc:
                raise AdmUsageError(f"-R: line {number}: {exc.message}") from None
            if cmd.command == "restore":
                raise AdmUsageError(f"-R: line {number}: -R inside a restore")
            commands.append(cmd)
        result = EXIT_OK
        for cmd in commands:
            result = self.run(cmd, reading_stdin=True)
        return result


def run(argv: Sequence[str], *, netns: str | None = None, prog: str = "ipvsadm-sp",
        stdin: TextIO | None = None, stdout: TextIO | None = None,
        stderr: TextIO | None = None, read_conn: Callable[[], str] | None = None) -> int:
    """Run one ipvsadm command line (IPVS of ``netns``); returns the exit status."""
    io = Io(stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr,
            read_conn or _read_proc_conn)
    runner = _Runner(io, lambda: IPVS(netns), prog, netns)
    try:
        return runner.run(parse(argv))
    except AdmUsageError as exc:
        io.stderr.write(f"{exc.message}\n")
        if exc.try_help:
            io.stderr.write(f"Try `{prog} -h' or '{prog} --help' for more information.\n")
        return EXIT_USAGE
    except IpvsUnavailable as exc:
        io.stderr.write(f"Can't initialize ipvs: {exc}\nAre you sure that IP Virtual "
                        "Server is built in the kernel or as module?\n")
        return EXIT_USAGE
    finally:
        runner.close()


def main(argv: Sequence[str] | None = None, prog: str = "ipvs-synproxy adm") -> int:
    return run(sys.argv[1:] if argv is None else list(argv), prog=prog)


def script() -> None:
    """The ``ipvsadm-sp`` console script."""
    sys.exit(main(sys.argv[1:], prog="ipvsadm-sp"))
