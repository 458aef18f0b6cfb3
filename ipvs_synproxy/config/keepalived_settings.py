"""The ``keepalived:`` section of the config file and per-service ``healthcheck:``.

The IPVS part of the file (services, real servers, laddrs) is read by
:mod:`~ipvs_synproxy.config.load`; this module reads what only keepalived needs: the router id,
the health checks of the real servers and the VRRP instances that move the
VIPs between balancers. :func:`read` is called by :func:`~ipvs_synproxy.config.load.loads`, so a
typo here is an error of every command that loads the file, reported like
the rest with ``file:line`` and the key path.

What the IPVS part may say but keepalived.conf cannot express (the ``local``
forwarding method, a scheduler keepalived does not know…) does not stop
``apply``: it is collected in :attr:`KeepalivedSettings.problems` and
``keepalived render`` refuses such a file.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from ipvs_synproxy.config.reader import (
    ConfigError,
    Reader,
    YamlMap,
    YamlSeq,
    read_bool,
    typename,
)
from ipvs_synproxy.config.state import ServiceState, XdpAttachment
from ipvs_synproxy.kernel.model import (
    IP_VS_SVC_F_ONEPACKET,
    FwdMethod,
    IPAddress,
    ModelError,
    Protocol,
    parse_addr,
)

# Schedulers keepalived 2.2.7 accepts in lvs_sched (check_parser.c).
KEEPALIVED_SCHEDULERS = ("rr", "wrr", "lc", "wlc", "lblc", "sh", "mh", "dh", "fo", "ovf",
                         "lblcr", "sed", "nq", "twos")
CHECK_TYPES = ("tcp", "http", "misc", "none")
CHECK_KEYS = ("type", "interval", "timeout", "retry", "delay_before_retry", "port", "path",
              "status_code", "command", "inhibit_on_failure")
HTTP_ONLY = ("path", "status_code")
SECTION_KEYS = ("router_id", "healthcheck", "vrrp", "pair", "xdp_command")
PAIR_KEYS = ("sync_interface", "sync_instance", "syncid", "sync_group")
VRRP_KEYS = ("name", "interface", "state", "virtual_router_id", "priority", "advert_int",
             "preempt", "auth_pass", "unicast_src_ip", "unicast_peers", "vips")

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_IFNAME = re.compile(r"[A-Za-z0-9_.@:-]{1,15}")
_PATH = re.compile(r"/[!-~]*")  # an HTTP path: printable, no blanks
# an absolute path a notify script line can carry unquoted
_FILE = re.compile(r"/[A-Za-z0-9_.,+=@%/-]*")
# what the Debian package installs (and its units run)
XDP_COMMAND = "/usr/sbin/ipvs-synproxy"


@dataclass(frozen=True)
class HealthCheck:
    """How keepalived checks a real server (one checker per real server).

    ``kind``: ``tcp`` (TCP_CHECK: connect), ``http`` (HTTP_GET of ``path``,
    expecting ``status_code``), ``misc`` (MISC_CHECK: run ``command``, exit 0 =
    up; ``{addr}`` and ``{port}`` are replaced by the real server's) or
    ``none`` (no checker: always up). Times are seconds.
    """

    kind: str = "tcp"
    interval: float = 5.0
    timeout: float = 3.0
    retry: int = 1
    delay_before_retry: float = 1.0
    port: int | None = None
    path: str = "/"
    status_code: int = 200
    command: str | None = None
    inhibit_on_failure: bool = False


@dataclass(frozen=True)
class VrrpInstance:
    """A VRRP instance: the VIPs that move to whichever balancer is master."""

    name: str
    interface: str
    virtual_router_id: int
    vips: tuple[ipaddress.IPv4Interface | ipaddress.IPv6Interface, ...]
    state: str = "BACKUP"
    priority: int = 100
    advert_int: int = 1
    preempt: bool = True
    auth_pass: str | None = None
    unicast_src_ip: IPAddress | None = None
    unicast_peers: tuple[IPAddress, ...] = ()


@dataclass(frozen=True)
class Pair:
    """Two balancers that hand their connections over: every VRRP instance in
    one ``vrrp_sync_group`` (the VIPs and the shared laddrs move together) and
    keepalived's ``lvs_sync_daemon`` (IPVS's connection sync on
    ``sync_interface``: master where ``sync_instance`` is MASTER, backup on
    the other balancer)."""

    sync_interface: str
    sync_instance: str
    syncid: int = 1
    sync_group: str = "VG_PAIR"


@dataclass(frozen=True)
class KeepalivedSettings:
    """The keepalived part of a config file (defaults when it has none).

    ``checks`` holds the effective health check of each service, in the
    order of the file's services; ``problems`` what keeps the file from
    being rendered as keepalived.conf.
    """

    router_id: str = "ipvs-synproxy"
    checks: tuple[HealthCheck, ...] = ()
    vrrp: tuple[VrrpInstance, ...] = ()
    pair: Pair | None = None
    # the ipvs-synproxy that the notify scripts of the XDP fast path run
    xdp_command: str = XDP_COMMAND
    problems: tuple[ConfigError, ...] = field(default=(), compare=False)


# ---- reading ------------------------------------------------------------------------------


def _seconds(value: object, source: str, *, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ModelError(source, name, f"not a number of seconds: {value!r}")
    if not 0 < value <= 86400:
        raise ModelError(source, name, f"{value} out of range (0, 86400] seconds")
    return float(value)


def _int(value: object, source: str, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelError(source, name, f"not an integer: {value!r}")
    if not lo <= value <= hi:
        raise ModelError(source, name, f"{value} out of range {lo}-{hi}")
    return value


def _word(value: object, source: str, name: str, pattern: re.Pattern[str],
          what: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ModelError(source, name, f"not {what}: {value!r}")
    return value


def _command(value: object, source: str, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ModelError(source, name, f"not a command line: {value!r}")
    if any(c in value for c in '"\n\r\\'):
        raise ModelError(source, name, "a command may not contain double quotes, "
                                       "backslashes or line breaks")
    bad = set(re.findall(r"\{([^}]*)\}", value)) - {"addr", "port"}
    if bad:
        raise ModelError(source, name, f"unknown placeholder {{{sorted(bad)[0]}}} "
                                       "(only {addr} and {port})")
    return value.strip()


def _read_check(r: Reader, raw: object, line: int, path: str, base: HealthCheck
                ) -> HealthCheck:
    m = r.mapping(raw, line, path, CHECK_KEYS)
    kw: dict[str, Any] = {}
    if "type" in m:
        kind = m["type"]
        if not isinstance(kind, str) or kind.lower() not in CHECK_TYPES:
            raise r.err(r.at(m, "type"), f"{path}.type",
                        f"unknown check type {kind!r} (one of {', '.join(CHECK_TYPES)})")
        kw["kind"] = kind.lower()
    for key in ("interval", "timeout", "delay_before_retry"):
        if key in m:
            kw[key] = r.parse(m, key, path, partial(_seconds, m[key], name=key))
    if "retry" in m:
        kw["retry"] = r.parse(m, "retry", path, lambda s: _int(m["retry"], s, "retry", 0,
                                                                 1000))
    if "port" in m:
        kw["port"] = r.parse(m, "port", path, lambda s: _int(m["port"], s, "port", 1, 65535))
    if "path" in m:
        kw["path"] = r.parse(m, "path", path, lambda s: _word(
            m["path"], s, "path", _PATH, "an HTTP path (/..., no blanks)"))
    if "status_code" in m:
        kw["status_code"] = r.parse(m, "status_code", path, lambda s: _int(
            m["status_code"], s, "status_code", 100, 599))
    if "command" in m:
        kw["command"] = r.parse(m, "command", path, lambda s: _command(m["command"], s,
                                                                       "command"))
    if "inhibit_on_failure" in m:
        kw["inhibit_on_failure"] = r.parse(m, "inhibit_on_failure", path, lambda s: read_bool(
            m["inhibit_on_failure"], s, "inhibit_on_failure"))
    check = dataclasses.replace(base, **kw)
    for key in HTTP_ONLY:
        if key in m and check.kind != "http":
            raise r.err(r.at(m, key), f"{path}.{key}",
                        f"'{key}' is for http checks (this one is {check.kind})")
    if "command" in m and check.kind != "misc":
        raise r.err(r.at(m, "command"), f"{path}.command",
                    f"'command' is for misc checks (this one is {check.kind})")
    if check.kind == "misc" and check.command is None:
        raise r.err(r.at(m, "type") if "type" in m else m.line, f"{path}.command",
                    "a misc check needs a 'command' (exit status 0 = up)")
    if "port" in m and check.kind not in ("tcp", "http"):
        raise r.err(r.at(m, "port"), f"{path}.port",
                    f"'port' is for tcp and http checks (this one is {check.kind})")
    return check


def _interface(text: str, source: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    try:
        iface = ipaddress.ip_interface(text.strip())
    except ValueError:
        raise ModelError(source, "vip", f"not an address or ADDR/PREFIX: {text!r}") from None
    if iface.ip.is_unspecified or iface.ip.is_multicast:
        raise ModelError(source, "vip", f"not a unicast address: {text!r}")
    return iface


def _addr_list(r: Reader, m: YamlMap, key: str, path: str) -> list[IPAddress]:
    seq = r.seq(m[key], r.at(m, key), f"{path}.{key}")
    out: list[IPAddress] = []
    for i, a in enumerate(seq):
        try:
            addr = parse_addr(a, "", "address")
        except ModelError as exc:
            raise r.err(seq.item_lines[i], f"{path}.{key}[{i}]", exc.message) from None
        if addr in out:
            raise r.err(seq.item_lines[i], f"{path}.{key}[{i}]", f"duplicate address {addr}")
        out.append(addr)
    return out


def _default_vips(services: Sequence[ServiceState]
                  ) -> tuple[ipaddress.IPv4Interface | ipaddress.IPv6Interface, ...]:
    vips: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = []
    for st in services:
        addr = st.service.addr
        if addr is not None:
            iface = ipaddress.ip_interface(f"{addr}/{addr.max_prefixlen}")
            if iface not in vips:
                vips.append(iface)
    return tuple(vips)


def _read_vrrp(r: Reader, raw: object, line: int, path: str, single: bool,
               services: Sequence[ServiceState]) -> VrrpInstance:
    m = r.mapping(raw, line, path, VRRP_KEYS)
    for key in ("name", "interface", "virtual_router_id"):
        if key not in m:
            raise r.err(m.line, path, f"a VRRP instance needs '{key}'")
    kw: dict[str, Any] = {
        "name": r.parse(m, "name", path, lambda s: _word(
            m["name"], s, "name", _NAME, "a name (letters, digits, _ . -)")),
        "interface": r.parse(m, "interface", path, lambda s: _word(
            m["interface"], s, "interface", _IFNAME, "an interface name")),
        "virtual_router_id": r.parse(m, "virtual_router_id", path, lambda s: _int(
            m["virtual_router_id"], s, "virtual_router_id", 1, 255)),
    }
    if "state" in m:
        state = m["state"]
        if not isinstance(state, str) or state.upper() not in ("MASTER", "BACKUP"):
            raise r.err(r.at(m, "state"), f"{path}.state",
                        f"unknown state {state!r} (master or backup)")
        kw["state"] = state.upper()
    if "priority" in m:
        kw["priority"] = r.parse(m, "priority", path, lambda s: _int(
            m["priority"], s, "priority", 1, 254))
    if "advert_int" in m:
        kw["advert_int"] = r.parse(m, "advert_int", path, lambda s: _int(
            m["advert_int"], s, "advert_int", 1, 255))
    if "preempt" in m:
        kw["preempt"] = r.parse(m, "preempt", path, lambda s: read_bool(m["preempt"], s,
                                                                     "preempt"))
        if not kw["preempt"] and kw.get("state", "BACKUP") != "BACKUP":
            raise r.err(r.at(m, "preempt"), f"{path}.preempt",
                        "'preempt: false' needs 'state: backup' (keepalived's nopreempt)")
    if "auth_pass" in m:
        kw["auth_pass"] = r.parse(m, "auth_pass", path, lambda s: _word(
            m["auth_pass"], s, "auth_pass", re.compile(r"[!-~]{1,8}"),
            "a password of 1-8 printable characters without blanks"))
    if "unicast_src_ip" in m:
        kw["unicast_src_ip"] = r.parse(m, "unicast_src_ip", path, lambda s: parse_addr(
            m["unicast_src_ip"], s, "unicast_src_ip"))
    if "unicast_peers" in m:
        peers = _addr_list(r, m, "unicast_peers", path)
        src = kw.get("unicast_src_ip")
        for i, p in enumerate(peers):
            if src is not None and p.version != src.version:
                raise r.err(m["unicast_peers"].item_lines[i], f"{path}.unicast_peers[{i}]",
                            f"peer {p} is not of unicast_src_ip's family")
        kw["unicast_peers"] = tuple(peers)
    if "vips" in m:
        seq = r.seq(m["vips"], r.at(m, "vips"), f"{path}.vips")
        vips: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = []
        for i, v in enumerate(seq):
            vpath = f"{path}.vips[{i}]"
            if not isinstance(v, str):
                raise r.err(seq.item_lines[i], vpath, f"expected ADDR or ADDR/PREFIX, got "
                                                      f"{typename(v)}")
            try:
                iface = _interface(v.strip("[]") if "/" not in v else v, "")
            except ModelError as exc:
                raise r.err(seq.item_lines[i], vpath, exc.message) from None
            if "/" not in v:  # a bare address is a host route
                iface = ipaddress.ip_interface(f"{iface.ip}/{iface.ip.max_prefixlen}")
            if iface in vips:
                raise r.err(seq.item_lines[i], vpath, f"duplicate VIP {iface}")
            vips.append(iface)
        if not vips:
            raise r.err(r.at(m, "vips"), f"{path}.vips", "an empty list of VIPs")
        kw["vips"] = tuple(vips)
    elif single:
        kw["vips"] = _default_vips(services)
        if not kw["vips"]:
            raise r.err(m.line, path, "no 'vips', and no service has a VIP to default to")
    else:
        raise r.err(m.line, path, "with several VRRP instances each needs its 'vips'")
    return VrrpInstance(**kw)


def _problems(r: Reader, top: YamlMap, services: Sequence[ServiceState]
              ) -> list[ConfigError]:
    """What keepalived.conf cannot express; each names the file's line."""
    out: list[ConfigError] = []
    raw_services = top.get("services")
    for i, st in enumerate(services):
        assert isinstance(raw_services, YamlSeq)
        m = raw_services[i]
        assert isinstance(m, YamlMap)
        path = f"services[{i}]"
        svc = st.service
        if svc.scheduler not in KEEPALIVED_SCHEDULERS:
            out.append(r.err(r.at(m, "scheduler"), f"{path}.scheduler",
                             f"keepalived does not know the scheduler {svc.scheduler!r} "
                             f"(one of {', '.join(KEEPALIVED_SCHEDULERS)})"))
        if (svc.flags & IP_VS_SVC_F_ONEPACKET and not svc.fwmark
                and svc.protocol is not Protocol.UDP):
            out.append(r.err(r.at(m, "one_packet"), f"{path}.one_packet",
                             "keepalived allows one-packet scheduling only for UDP"))
        if not st.dests:
            out.append(r.err(m.line, path, "keepalived ignores a virtual server without "
                                           "real servers"))
        if "forward" in m and isinstance(m["forward"], str) and \
                FwdMethod.parse(m["forward"]) is FwdMethod.LOCAL:
            out.append(r.err(r.at(m, "forward"), f"{path}.forward",
                             "keepalived has no 'local' forwarding method"))
        raw_dests = m.get("real_servers")
        for j, d in enumerate(st.dests):
            if d.fwd is FwdMethod.LOCAL and isinstance(raw_dests, YamlSeq):
                dm = raw_dests[j]
                line = r.at(dm, "forward") if isinstance(dm, YamlMap) else raw_dests.line
                out.append(r.err(line, f"{path}.real_servers[{j}].forward",
                                 "keepalived has no 'local' forwarding method"))
    unique: dict[str, ConfigError] = {}  # one message per place
    for e in out:
        unique.setdefault(str(e), e)
    return list(unique.values())


def _read_pair(r: Reader, raw: object, line: int, vrrp: Sequence[VrrpInstance],
               services: Sequence[ServiceState]) -> Pair:
    path = "keepalived.pair"
    m = r.mapping(raw, line, path, PAIR_KEYS)
    if not vrrp:
        raise r.err(m.line, path, "a pair needs 'vrrp' instances to move its addresses")
    if "sync_interface" not in m:
        raise r.err(m.line, path, "a pair needs 'sync_interface' (where the connection "
                                  "sync runs, usually the real servers' side)")
    kw: dict[str, Any] = {
        "sync_interface": r.parse(m, "sync_interface", path, lambda s: _word(
            m["sync_interface"], s, "sync_interface", _IFNAME, "an interface name")),
        "sync_instance": vrrp[0].name,
    }
    if "sync_instance" in m:
        kw["sync_instance"] = r.parse(m, "sync_instance", path, lambda s: _word(
            m["sync_instance"], s, "sync_instance", _NAME, "a VRRP instance name"))
        if kw["sync_instance"] not in [vi.name for vi in vrrp]:
            raise r.err(r.at(m, "sync_instance"), f"{path}.sync_instance",
                        f"no VRRP instance is named {kw['sync_instance']!r}")
    if "syncid" in m:
        kw["syncid"] = r.parse(m, "syncid", path, lambda s: _int(m["syncid"], s, "syncid",
                                                                 1, 255))
    if "sync_group" in m:
        kw["sync_group"] = r.parse(m, "sync_group", path, lambda s: _word(
            m["sync_group"], s, "sync_group", _NAME, "a name (letters, digits, _ . -)"))
    # The real servers answer a FULLNAT connection at its laddr: the pair's
    # laddrs must move to the new master with the VIPs.
    moving = {v.ip for vi in vrrp for v in vi.vips}
    for i, st in enumerate(services):
        for la in st.laddrs:
            if la.addr not in moving:
                raise r.err(m.line, path, f"services[{i}] laddr {la.addr} is not a VIP of "
                            "any VRRP instance: a pair shares its laddrs, and they must "
                            "move to the new master")
    return Pair(**kw)


def _xdp_problems(r: Reader, top: YamlMap, xdp: Sequence[XdpAttachment],
                  vrrp: Sequence[VrrpInstance], pair: Pair | None) -> list[ConfigError]:
    """What keeps the XDP fast path from being rendered: keepalived attaches
    it when this balancer becomes master of the VRRP instance on its
    interface, so there must be one; and each attach sets the module's
    secret, which a pair must share."""
    out: list[ConfigError] = []
    raw = top.get("xdp")
    lines = raw.item_lines if isinstance(raw, YamlSeq) else [r.at(top, "xdp")] * len(xdp)
    on = {vi.interface for vi in vrrp}
    for i, a in enumerate(xdp):
        if a.dev not in on:
            out.append(r.err(lines[i], f"xdp[{i}]", f"keepalived attaches the XDP program to "
                             f"{a.dev} when this balancer becomes master of the VRRP "
                             f"instance on {a.dev}, and no instance is on {a.dev}"))
    if not xdp or "cookie_secret_file" in top:
        return out
    if pair is not None:
        out.append(r.err(r.at(top, "xdp"), "xdp", "a pair shares one cookie secret, and every "
                         "attach of the XDP program sets the module's: name it in "
                         "cookie_secret_file"))
    return out


def _secret_path_problem(r: Reader, top: YamlMap, xdp: Sequence[XdpAttachment]
                         ) -> list[ConfigError]:
    path = top.get("cookie_secret_file")
    if not xdp or not isinstance(path, str) or _FILE.fullmatch(path.strip()):
        return []
    return [r.err(r.at(top, "cookie_secret_file"), "cookie_secret_file",
                  "the XDP notify scripts cannot carry this path (letters, digits and "
                  "_ . , + = @ % / - only)")]


def read(r: Reader, top: YamlMap, services: Sequence[ServiceState],
         xdp: Sequence[XdpAttachment] = ()) -> KeepalivedSettings:
    """The ``keepalived`` section of ``top`` and the services' ``healthcheck``
    keys (``services`` are the already validated services of ``top``, ``xdp``
    its already validated XDP interfaces)."""
    section = top.get("keepalived")
    if section is None:
        section = YamlMap()
        section.line, section.key_lines = r.at(top, "keepalived"), {}
    m = r.mapping(section, r.at(top, "keepalived"), "keepalived", SECTION_KEYS)
    kw: dict[str, Any] = {}
    if "router_id" in m:
        kw["router_id"] = r.parse(m, "router_id", "keepalived", lambda s: _word(
            m["router_id"], s, "router_id", _NAME, "a name (letters, digits, _ . -)"))
    base = HealthCheck()
    if "healthcheck" in m:
        base = _read_check(r, m["healthcheck"], r.at(m, "healthcheck"),
                           "keepalived.healthcheck", base)
    checks = []
    raw_services = top.get("services")
    for i in range(len(services)):
        assert isinstance(raw_services, YamlSeq)
        sm = raw_services[i]
        assert isinstance(sm, YamlMap)
        check = base
        if "healthcheck" in sm:
            check = _read_check(r, sm["healthcheck"], r.at(sm, "healthcheck"),
                                f"services[{i}].healthcheck", base)
        checks.append(check)
    kw["checks"] = tuple(checks)
    if "vrrp" in m:
        seq = r.seq(m["vrrp"], r.at(m, "vrrp"), "keepalived.vrrp")
        instances: list[VrrpInstance] = []
        for i, raw in enumerate(seq):
            vi = _read_vrrp(r, raw, seq.item_lines[i], f"keepalived.vrrp[{i}]",
                            len(seq) == 1, services)
            for other in instances:
                if other.name == vi.name:
                    raise r.err(seq.item_lines[i], f"keepalived.vrrp[{i}].name",
                                f"duplicate VRRP instance name {vi.name!r}")
                if (other.interface, other.virtual_router_id) == (vi.interface,
                                                                   vi.virtual_router_id):
                    raise r.err(seq.item_lines[i], f"keepalived.vrrp[{i}].virtual_router_id",
                                f"virtual_router_id {vi.virtual_router_id} is already used "
                                f"on {vi.interface} by {other.name}")
            instances.append(vi)
        kw["vrrp"] = tuple(instances)
    if "pair" in m:
        kw["pair"] = _read_pair(r, m["pair"], r.at(m, "pair"), kw.get("vrrp", ()), services)
    if "xdp_command" in m:
        kw["xdp_command"] = r.parse(m, "xdp_command", "keepalived", lambda s: _word(
            m["xdp_command"], s, "xdp_command", _FILE,
            "an absolute path (letters, digits and _ . , + = @ % / - only)"))
    kw["problems"] = tuple(_problems(r, top, services)
                           + _xdp_problems(r, top, xdp, kw.get("vrrp", ()), kw.get("pair"))
                           + _secret_path_problem(r, top, xdp))
    return KeepalivedSettings(**kw)
