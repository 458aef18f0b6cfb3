"""Load the declarative config file into model values, or say exactly what is wrong.

The file describes the whole IPVS table of one network namespace (services,
their real servers and laddr pools) plus the ``net.ipv4.vs.*`` sysctls it
names, optionally where the SYN-proxy cookie secret lives, and the interfaces
that run the XDP fast path (:mod:`~ipvs_synproxy.config.xdp_settings`). The schema is
documented in ``docs/operator-guide.md``; :func:`load` turns the file into a
:class:`Config` of :mod:`~ipvs_synproxy.kernel.model` values or raises
:class:`~ipvs_synproxy.config.reader.ConfigError` naming ``file:line`` and the
key path of the first bad value.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar, cast

from ipvs_synproxy.config import keepalived_settings, xdp_settings
from ipvs_synproxy.config.keepalived_settings import KeepalivedSettings
from ipvs_synproxy.config.reader import (
    ConfigError,
    Reader,
    YamlMap,
    int_field,
    parse_yaml,
    read_bool,
    read_str,
    typename,
)
from ipvs_synproxy.config.state import ServiceState, State, XdpAttachment
from ipvs_synproxy.kernel import sysctl as sysctl_mod
from ipvs_synproxy.kernel.model import (
    IP_VS_SVC_F_ONEPACKET,
    IP_VS_SVC_F_SCHED1,
    IP_VS_SVC_F_SCHED2,
    IP_VS_SVC_F_SCHED3,
    Dest,
    Family,
    FwdMethod,
    IPAddress,
    Laddr,
    ModelError,
    Protocol,
    ProxyProtocol,
    Service,
    TunnelType,
    format_endpoint,
    parse_addr,
    parse_endpoint,
    parse_int,
    parse_protocol,
    proxy_protocol_error,
    synproxy_dest_error,
)

SECRET_LEN = 16
_T = TypeVar("_T")


@dataclass(frozen=True)
class Config:
    path: str
    state: State
    secret: bytes | None = None
    secret_file: str | None = None
    # where things came from, for messages: service key -> "file:line"
    origins: Mapping[Any, str] = field(default_factory=dict, compare=False)
    # the ``keepalived`` section and health checks (keepalived_config.read)
    keepalived: KeepalivedSettings | None = field(default=None, compare=False)
    # the interfaces that run the XDP fast path (xdp_settings.read): all of
    # them, as the services are; none detaches every program of ours
    xdp: tuple[XdpAttachment, ...] = ()


TOP_KEYS = ("services", "sysctl", "cookie_secret_file", "xdp", "keepalived")
SERVICE_KEYS = ("vip", "fwmark", "family", "protocol", "scheduler", "persistent", "netmask",
                "persistence_engine", "one_packet", "scheduler_flags", "synproxy", "forward",
                "proxy_protocol", "laddrs", "real_servers", "healthcheck")
DEST_KEYS = ("addr", "weight", "forward", "upper_threshold", "lower_threshold",
             "tunnel_type", "tunnel_port", "proxy_protocol")
SCHED_FLAGS = {"sh-fallback": IP_VS_SVC_F_SCHED1, "mh-fallback": IP_VS_SVC_F_SCHED1,
               "flag-1": IP_VS_SVC_F_SCHED1, "sh-port": IP_VS_SVC_F_SCHED2,
               "mh-port": IP_VS_SVC_F_SCHED2, "flag-2": IP_VS_SVC_F_SCHED2,
               "flag-3": IP_VS_SVC_F_SCHED3}


def _netmask(value: object, source: str) -> int:
    if isinstance(value, str) and "." in value:
        try:
            net = ipaddress.IPv4Network(f"0.0.0.0/{value.strip()}")
        except ValueError:
            raise ModelError(source, "netmask", f"not a netmask: {value!r}") from None
        return net.prefixlen
    return parse_int(value, source, "netmask", 1, 128)


def _proxy_protocol(value: object, source: str) -> ProxyProtocol:
    """off, v1 or v2. YAML 1.1 reads a bare ``off`` (and ``no``, ``false``) as
    false, which means off too; true names no version."""
    if value is False:
        return ProxyProtocol.OFF
    if value is True:
        raise ModelError(source, "proxy_protocol",
                         "true is not a PROXY protocol version: write v1, v2 or off")
    return ProxyProtocol.parse(value, source)


def _read_service(r: Reader, raw: object, line: int, path: str) -> ServiceState:
    m = r.mapping(raw, line, path, SERVICE_KEYS)
    if ("vip" in m) == ("fwmark" in m):
        raise r.err(m.line, path, "a service needs exactly one of 'vip' (ADDR:PORT) "
                                  "or 'fwmark'")
    kw: dict[str, Any] = {}
    if "vip" in m:
        for k in ("family",):
            if k in m:
                raise r.err(r.at(m, k), f"{path}.{k}", "'family' is only for fwmark "
                                                       "services (a vip has its own)")
        addr, port = r.parse(m, "vip", path, lambda s: parse_endpoint(
            read_str(m["vip"], s, "vip"), s))
        kw.update(addr=addr, port=port)
        if "protocol" in m:
            kw["protocol"] = r.parse(m, "protocol", path,
                                     lambda s: parse_protocol(read_str(m["protocol"], s,
                                                                   "protocol"), s))
    else:
        if "protocol" in m:
            raise r.err(r.at(m, "protocol"), f"{path}.protocol",
                        "a fwmark service matches every protocol; remove 'protocol'")
        kw["fwmark"] = r.parse(m, "fwmark", path,
                               lambda s: parse_int(m["fwmark"], s, "fwmark", 1, 0xFFFF_FFFF))
        fams = {"ipv4": Family.INET, "inet": Family.INET, "ipv6": Family.INET6,
                "inet6": Family.INET6}
        fam = m.get("family", "ipv4")
        if not isinstance(fam, str) or fam.lower() not in fams:
            raise r.err(r.at(m, "family"), f"{path}.family",
                        f"unknown family {fam!r} (ipv4 or ipv6)")
        kw["fwmark_af"] = fams[fam.lower()]
    if "scheduler" in m:
        kw["scheduler"] = r.parse(m, "scheduler", path,
                                  lambda s: read_str(m["scheduler"], s, "scheduler"))
    if "persistent" in m:
        kw["persistent"] = r.parse(m, "persistent", path, lambda s: parse_int(
            m["persistent"], s, "persistent", 0, 0xFFFF_FFFF))
    if "netmask" in m:
        kw["netmask"] = r.parse(m, "netmask", path, lambda s: _netmask(m["netmask"], s))
    if "persistence_engine" in m:
        kw["pe_name"] = r.parse(m, "persistence_engine", path,
                                lambda s: read_str(m["persistence_engine"], s, "engine"))
    if "synproxy" in m:
        kw["synproxy"] = r.parse(m, "synproxy", path,
                                 lambda s: read_bool(m["synproxy"], s, "synproxy"))
    flags = 0
    if "one_packet" in m and r.parse(m, "one_packet", path,
                                     lambda s: read_bool(m["one_packet"], s, "one_packet")):
        flags |= IP_VS_SVC_F_ONEPACKET
    if "scheduler_flags" in m:
        seq = r.seq(m["scheduler_flags"], r.at(m, "scheduler_flags"),
                    f"{path}.scheduler_flags")
        for i, f in enumerate(seq):
            if not isinstance(f, str) or f.lower() not in SCHED_FLAGS:
                raise r.err(seq.item_lines[i], f"{path}.scheduler_flags[{i}]",
                            f"unknown scheduler flag {f!r} (one of "
                            f"{', '.join(SCHED_FLAGS)})")
            flags |= SCHED_FLAGS[f.lower()]
    kw["flags"] = flags
    try:
        svc = Service(**kw)
    except ModelError as exc:
        key = {"address": "vip", "port": "vip", "pe_name": "persistence_engine"}.get(
            exc.field, exc.field)
        msg = exc.message
        if exc.field == "port" and kw.get("port") == 0:
            msg = "port 0 (every port) needs a persistent service ('persistent: SECONDS')"
        raise r.err(r.at(m, key), f"{path}.{key}", msg) from None

    default_fwd = FwdMethod.MASQ
    if "forward" in m:
        default_fwd = r.parse(m, "forward", path, lambda s: FwdMethod.parse(
            read_str(m["forward"], s, "forward"), s))
    default_pp = ProxyProtocol.OFF
    if "proxy_protocol" in m:
        default_pp = r.parse(m, "proxy_protocol", path,
                             lambda s: _proxy_protocol(m["proxy_protocol"], s))
        if default_pp is not ProxyProtocol.OFF and not svc.fwmark \
                and svc.protocol is not Protocol.TCP:
            raise r.err(r.at(m, "proxy_protocol"), f"{path}.proxy_protocol",
                        f"the PROXY protocol header is for TCP services only, not "
                        f"{svc.protocol.name}")

    laddrs: list[Laddr] = []
    if "laddrs" in m:
        seq = r.seq(m["laddrs"], r.at(m, "laddrs"), f"{path}.laddrs")
        seen: dict[IPAddress, int] = {}
        for i, a in enumerate(seq):
            lpath, lline = f"{path}.laddrs[{i}]", seq.item_lines[i]
            try:
                addr = parse_addr(a, "", "laddr")
            except ModelError as exc:
                raise r.err(lline, lpath, exc.message) from None
            if addr.version != (4 if svc.af == Family.INET else 6):
                raise r.err(lline, lpath, f"laddr {addr} is not of the service's "
                                          f"family (IPv{4 if svc.af == Family.INET else 6})")
            if addr in seen:
                raise r.err(lline, lpath, f"duplicate laddr {addr} (first on line "
                                          f"{seen[addr]})")
            seen[addr] = lline
            laddrs.append(Laddr(addr))

    dests: list[Dest] = []
    if "real_servers" in m:
        seq = r.seq(m["real_servers"], r.at(m, "real_servers"), f"{path}.real_servers")
        dseen: dict[tuple[IPAddress, int], int] = {}
        for i, raw_d in enumerate(seq):
            dpath = f"{path}.real_servers[{i}]"
            dest = _read_dest(r, raw_d, seq.item_lines[i], dpath, svc, default_fwd,
                              default_pp, r.at(m, "proxy_protocol"), path)
            dm = cast(YamlMap, raw_d)
            if (dest.addr, dest.port) in dseen:
                raise r.err(r.at(dm, "addr"), f"{dpath}.addr",
                            f"duplicate real server {dest} (first on line "
                            f"{dseen[(dest.addr, dest.port)]})")
            dseen[(dest.addr, dest.port)] = r.at(dm, "addr")
            if svc.synproxy and (why := synproxy_dest_error(dest)):
                if "forward" in dm:
                    raise r.err(r.at(dm, "forward"), f"{dpath}.forward", why)
                raise r.err(r.at(m, "forward"), f"{path}.forward", why)
            dests.append(dest)
    fullnat = [d for d in dests if d.fwd is FwdMethod.FULLNAT]
    if fullnat and not laddrs:
        key = "forward" if "forward" in m else "real_servers"
        raise r.err(r.at(m, key), f"{path}.laddrs",
                    f"FULLNAT real server {fullnat[0]} needs the service's local addresses: "
                    "add 'laddrs' (balancer addresses of the service's family that the real "
                    "servers reach; the kernel drops FULLNAT connections without one)")
    return ServiceState(svc, tuple(dests), tuple(laddrs))


def _read_dest(r: Reader, raw: object, line: int, path: str, svc: Service,
               default_fwd: FwdMethod, default_pp: ProxyProtocol = ProxyProtocol.OFF,
               default_pp_line: int = 0, svc_path: str = "") -> Dest:
    m = r.mapping(raw, line, path, DEST_KEYS)
    if "addr" not in m:
        raise r.err(m.line, path, "a real server needs 'addr' (ADDR or ADDR:PORT)")
    # ipvsadm's rule: without a port the real server takes the service's.
    addr, port = r.parse(m, "addr", path, lambda s: parse_endpoint(
        read_str(m["addr"], s, "addr"), s, default_port=svc.port))
    kw: dict[str, Any] = {"addr": addr, "port": port, "fwd": default_fwd}
    if "forward" in m:
        kw["fwd"] = r.parse(m, "forward", path, lambda s: FwdMethod.parse(
            read_str(m["forward"], s, "forward"), s))
    for key, attr in (("weight", "weight"), ("upper_threshold", "u_thresh"),
                      ("lower_threshold", "l_thresh")):
        if key in m:
            value = m[key]
            kw[attr] = r.parse(m, key, path, partial(int_field, value, key))
    if "tunnel_type" in m:
        names = {t.name.lower(): t for t in TunnelType}
        tt = m["tunnel_type"]
        if not isinstance(tt, str) or tt.lower() not in names:
            raise r.err(r.at(m, "tunnel_type"), f"{path}.tunnel_type",
                        f"unknown tunnel type {tt!r} (ipip, gue or gre)")
        kw["tun_type"] = names[tt.lower()]
    if "tunnel_port" in m:
        kw["tun_port"] = r.parse(m, "tunnel_port", path,
                                 lambda s: parse_int(m["tunnel_port"], s, "tunnel_port",
                                                     0, 65535))
    # the real server's own setting wins over the service's default
    kw["proxy_protocol"] = default_pp
    if "proxy_protocol" in m:
        kw["proxy_protocol"] = r.parse(m, "proxy_protocol", path,
                                       lambda s: _proxy_protocol(m["proxy_protocol"], s))
    elif default_pp is not ProxyProtocol.OFF and kw["fwd"] is not FwdMethod.FULLNAT:
        raise r.err(default_pp_line, f"{svc_path}.proxy_protocol",
                    f"the service's proxy_protocol {default_pp} applies to real server "
                    f"{format_endpoint(addr, port)}, which uses "
                    f"{kw['fwd'].name.lower()} forwarding: the header needs FULLNAT "
                    "(give that real server 'proxy_protocol: off', or 'forward: fullnat')")
    try:
        dest = Dest(**kw)
    except ModelError as exc:
        key = {"u_thresh": "upper_threshold", "l_thresh": "lower_threshold",
               "address": "addr", "port": "addr"}.get(exc.field, exc.field)
        raise r.err(r.at(m, key), f"{path}.{key}", exc.message) from None
    if why := proxy_protocol_error(svc, dest):
        raise r.err(r.at(m, "proxy_protocol"), f"{path}.proxy_protocol", why)
    if dest.af != svc.af and dest.fwd is not FwdMethod.TUNNEL:
        raise r.err(r.at(m, "addr"), f"{path}.addr",
                    f"IPv{dest.addr.version} real server behind an IPv"
                    f"{4 if svc.af == Family.INET else 6} service: only the tunnel "
                    "method crosses families")
    return dest


def _read_sysctls(r: Reader, raw: object, line: int) -> dict[str, sysctl_mod.Value]:
    if not isinstance(raw, YamlMap):
        raise r.err(getattr(raw, "line", line), "sysctl",
                    f"expected a mapping of net.ipv4.vs knobs, got {typename(raw)}")
    out: dict[str, sysctl_mod.Value] = {}
    for key, value in raw.items():
        kline = raw.key_lines[key]
        if not isinstance(key, str):
            raise r.err(kline, f"sysctl.{key}", "not a sysctl name")
        try:
            short, val = sysctl_mod.validate(key, value)
        except sysctl_mod.SysctlError as exc:
            raise r.err(kline, f"sysctl.{key}", exc.message) from None
        if short in out:
            raise r.err(kline, f"sysctl.{key}", f"{short} is set twice")
        out[short] = val
    return out


def read_secret(path: str, source: str, *, require_root_owner: bool = True) -> bytes:
    """The 16-byte cookie secret from ``path``: 32 hex digits (a trailing newline
    is fine) or 16 raw bytes. The file must be a regular file that only its
    owner (root) can read."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ModelError(source, "cookie_secret_file",
                         f"cannot read {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ModelError(source, "cookie_secret_file", f"{path} is not a regular file")
    if st.st_mode & 0o077:
        raise ModelError(source, "cookie_secret_file",
                         f"{path} is accessible to group or others (mode "
                         f"{stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}")
    if require_root_owner and st.st_uid != 0:
        raise ModelError(source, "cookie_secret_file",
                         f"{path} is owned by uid {st.st_uid}, not root; run: "
                         f"chown root: {path}")
    try:
        with open(path, "rb") as f:
            data = f.read(4096)
    except OSError as exc:
        raise ModelError(source, "cookie_secret_file",
                         f"cannot read {path}: {exc.strerror}") from None
    text = data.strip()
    if len(text) == 2 * SECRET_LEN:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    if len(data) == SECRET_LEN:
        return data
    raise ModelError(source, "cookie_secret_file",
                     f"{path} must hold {2 * SECRET_LEN} hex digits or {SECRET_LEN} raw "
                     f"bytes (got {len(data)} bytes); make one with: "
                     f"head -c {SECRET_LEN} /dev/urandom | od -An -tx1 | tr -d ' \\n' > {path}")


class _Errors:
    """Raise the first error (``loads``), or collect them all (``check``)."""

    def __init__(self, keep_going: bool) -> None:
        self.keep_going = keep_going
        self.found: list[ConfigError] = []

    def run(self, fn: Callable[..., _T], *args: Any) -> _T | None:
        try:
            return fn(*args)
        except ConfigError as exc:
            self.report(exc)
            return None

    def report(self, exc: ConfigError) -> None:
        if not self.keep_going:
            raise exc
        self.found.append(exc)


def _secret(r: Reader, top: YamlMap, require_root_owner: bool) -> tuple[bytes, str]:
    secret_file = r.parse(top, "cookie_secret_file", "", lambda s: read_str(
        top["cookie_secret_file"], s, "cookie_secret_file"))
    if not os.path.isabs(secret_file):
        raise r.err(r.at(top, "cookie_secret_file"), "cookie_secret_file",
                    f"must be an absolute path, got {secret_file!r}")
    secret = r.parse(top, "cookie_secret_file", "", lambda s: read_secret(
        secret_file, s, require_root_owner=require_root_owner))
    return secret, secret_file


def _services(r: Reader, top: YamlMap, errors: _Errors
              ) -> tuple[list[ServiceState], dict[Any, str], bool]:
    """The services, where each came from, and whether all of them were valid."""
    services: list[ServiceState] = []
    origins: dict[Any, str] = {}
    seq = errors.run(r.seq, top["services"], r.at(top, "services"), "services")
    if seq is None:
        return services, origins, False
    complete = True
    for i, raw in enumerate(seq):
        st = errors.run(_read_service, r, raw, seq.item_lines[i], f"services[{i}]")
        if st is None:
            complete = False
            continue
        key = st.service.key()
        where = f"{r.filename}:{seq.item_lines[i]}"
        if key in origins:
            errors.report(ConfigError(where, f"services[{i}]",
                                      f"duplicate service {st.service} (first at "
                                      f"{origins[key]})"))
            complete = False
            continue
        origins[key] = where
        services.append(st)
    return services, origins, complete


def _load(text: str, filename: str, errors: _Errors, require_root_owner: bool
          ) -> Config | None:
    r = Reader(filename)
    doc = errors.run(parse_yaml, text, filename)
    if errors.found:
        return None
    if doc is None:
        doc = YamlMap()
        doc.line, doc.key_lines = 1, {}
    top = errors.run(r.mapping, doc, 1, "", TOP_KEYS)
    if top is None:
        return None
    sysctls: dict[str, sysctl_mod.Value] = {}
    if "sysctl" in top and top["sysctl"] is not None:
        sysctls = errors.run(_read_sysctls, r, top["sysctl"], r.at(top, "sysctl")) or {}
    secret = secret_file = None
    if "cookie_secret_file" in top:
        secret, secret_file = errors.run(_secret, r, top, require_root_owner) or (None, None)
    services: list[ServiceState] = []
    origins: dict[Any, str] = {}
    complete = True
    if "services" in top and top["services"] is not None:
        services, origins, complete = _services(r, top, errors)
    xdp = errors.run(xdp_settings.read, r, top)
    # the keepalived section pairs health checks with the services by position
    keepalived = (errors.run(keepalived_settings.read, r, top, services, xdp or ())
                  if complete else None)
    if errors.found:
        return None
    return Config(filename, State(tuple(services), sysctls), secret, secret_file, origins,
                  keepalived, xdp or ())


def loads(text: str, filename: str = "<config>", *, require_root_owner: bool = True
          ) -> Config:
    """Parse and validate a config; raises the first :class:`ConfigError`."""
    cfg = _load(text, filename, _Errors(keep_going=False), require_root_owner)
    assert cfg is not None
    return cfg


def check(text: str, filename: str = "<config>", *, require_root_owner: bool = True
          ) -> list[ConfigError]:
    """Every error of a config, in file order (a service with several bad
    values reports its first; the ``keepalived`` section is checked once the
    services are valid)."""
    errors = _Errors(keep_going=True)
    _load(text, filename, errors, require_root_owner)
    return sorted(errors.found, key=_line)


def _line(exc: ConfigError) -> int:
    tail = exc.source.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(path, "file", exc.strerror or str(exc)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(path, "file", f"not UTF-8 text: {exc.reason}") from None


def load(path: str, *, require_root_owner: bool = True) -> Config:
    return loads(read_text(path), path, require_root_owner=require_root_owner)
