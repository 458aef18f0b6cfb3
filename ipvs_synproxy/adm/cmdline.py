"""ipvsadm 1.31's command line: one argv in, an :class:`AdmCommand` out.

Options are checked the way ipvsadm does: the first option is the command,
every option at most once, the command/option table, then the per-command
rules. Bad input raises :class:`AdmUsageError` (exit status 2) before anything
touches the kernel.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ipvs_synproxy.adm.command import (
    DEFAULT_PERSISTENT_TIMEOUT,
    DEFAULT_SCHEDULER,
    MAX_TIMEOUT,
    PROTO_OPTION,
    SCHED_FLAG_MASK,
    AdmCommand,
    AdmUsageError,
    Format,
)
from ipvs_synproxy.kernel.model import (
    INT_MAX,
    IP_VS_SVC_F_ONEPACKET,
    IP_VS_SVC_F_SCHED1,
    IP_VS_SVC_F_SCHED2,
    IP_VS_SVC_F_SCHED3,
    Dest,
    FwdMethod,
    IPAddress,
    ModelError,
    Protocol,
    ProxyProtocol,
    Service,
    SyncDaemon,
    Timeouts,
    TunnelType,
    make_dest,
    make_service,
)

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
    "synproxy", "proxy-protocol", "proxy-info",
)

# Per command: the options it accepts ("+" required, "1" at most one of these,
# " " optional); any other option is illegal with it.
_SVC_OPTS = {"service-address": "+", "scheduler": " ", "persistent": " ", "netmask": " ",
             "ops": " ", "pe": " ", "sched-flags": " ", "synproxy": " "}
_DEST_OPTS = {"service-address": "+", "real-server": "+", "forwarding-method": " ",
              "weight": " ", "u-threshold": " ", "l-threshold": " ", "tun-type": " ",
              "tun-port": " ", "tun-nocsum": " ", "tun-csum": " ", "tun-remcsum": " ",
              "proxy-protocol": " "}
COMMANDS: dict[str, dict[str, str]] = {
    "add-service": _SVC_OPTS,
    "edit-service": _SVC_OPTS,
    "delete-service": {"service-address": "+"},
    "flush": {},
    "list": {"numeric": " ", "connection": "1", "service-address": "1", "timeout": "1",
             "daemon": "1", "stats": " ", "rate": " ", "thresholds": " ",
             "persistent-conn": " ", "nosort": " ", "syncid": " ", "exact": " ",
             "tun-info": " ", "proxy-info": " "},
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
    "proxy-protocol": _Opt("proxy-protocol", "required"),
    "proxy-info": _Opt("proxy-info", "none"),
}
_SHORT: dict[str, _Opt] = {o.key: o for o in _LONG.values() if len(o.key) == 1}
_SHORT["l"] = _Opt("L", "none")


def option_table() -> list[tuple[str, str | None, str]]:
    """Every long option the parser takes: (name, its short letter or None,
    "none"/"required"/"optional" argument), for man pages and completion."""
    return [(name, o.key if _SHORT.get(o.key) == o else None, o.arg)
            for name, o in sorted(_LONG.items())]

_COMMAND_OF_KEY = {
    "A": "add-service", "E": "edit-service", "D": "delete-service", "C": "flush",
    "L": "list", "Z": "zero", "a": "add-server", "e": "edit-server", "d": "delete-server",
    "set": "set", "R": "restore", "S": "save", "start-daemon": "start-daemon",
    "stop-daemon": "stop-daemon", "laddr-add": "laddr-add", "laddr-del": "laddr-del",
    "laddr-list": "laddr-list",
}


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
    proxy_protocol: ProxyProtocol = ProxyProtocol.OFF
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
    elif key in ("stats", "rate", "thresholds", "persistent-conn", "nosort", "tun-info",
                 "proxy-info"):
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
    elif key == "proxy-protocol":
        _set_option(raw, "proxy-protocol")
        try:
            raw.proxy_protocol = ProxyProtocol.parse(arg, "--proxy-protocol")
        except ModelError as exc:
            raise AdmUsageError(f"--proxy-protocol: {exc.message}") from None
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
        raw.flags = (raw.flags & ~SCHED_FLAG_MASK) | \
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
        _check_proxy_protocol(raw)
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


def _check_proxy_protocol(raw: _Raw) -> None:
    """v1/v2 only for FULLNAT real servers of TCP (or fwmark) services; ``off``
    is accepted with any method (it is what every other real server has)."""
    pp = raw.proxy_protocol
    if pp is ProxyProtocol.OFF:
        return
    if raw.fwd is not FwdMethod.FULLNAT:
        method = {FwdMethod.MASQ: "-m", FwdMethod.ROUTE: "-g",
                  FwdMethod.TUNNEL: "-i"}.get(raw.fwd, raw.fwd.name.lower())
        raise AdmUsageError(f"--proxy-protocol {pp}: the PROXY protocol header needs "
                            f"FULLNAT forwarding (--fullnat), not {method}")
    if not raw.fwmark and raw.protocol is not Protocol.TCP:
        proto = (raw.protocol or Protocol.TCP).name
        raise AdmUsageError(f"--proxy-protocol {pp}: the PROXY protocol header is for TCP "
                            f"services only, not {proto}")


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
    source = "-f" if raw.fwmark else PROTO_OPTION[protocol]
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
                                   tun_port=raw.tun_port, tun_flags=raw.tun_flags,
                                   proxy_protocol=raw.proxy_protocol)
    except ModelError as exc:
        flag = {"u_thresh": "-x", "l_thresh": "-y", "weight": "-w"}.get(exc.field, "-r")
        raise AdmUsageError(f"{flag}: {exc.message}") from None
