"""Declarative configuration: load a YAML file, diff it against the kernel, apply it.

The file describes the whole IPVS table of one network namespace (services,
their real servers and laddr pools) plus the ``net.ipv4.vs.*`` sysctls it
names and, optionally, where the SYN-proxy cookie secret lives. The schema is
documented in ``docs/operator-guide.md``; :func:`load` turns the file into a
:class:`Config` of :mod:`model` values or raises :class:`ConfigError` naming
``file:line`` and the key path of the first bad value.

:func:`diff` is a pure function from two :class:`State` values to an ordered
list of :class:`Change`; :func:`apply_changes` executes them one by one against
a :class:`Target` and, when one fails, undoes the ones already done in reverse
order (:func:`rollback_plan`), restoring the exact previous objects and
sysctl values. Only what differs is touched: an edit is an edit, never a
delete and re-add, so live connections keep their real server.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, cast
from typing import Protocol as Interface

import yaml

from ipvs_synproxy import netlink
from ipvs_synproxy import sysctl as sysctl_mod
from ipvs_synproxy.model import (
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
    Service,
    TunnelType,
    format_endpoint,
    parse_addr,
    parse_endpoint,
    parse_int,
    parse_protocol,
    synproxy_dest_error,
)

if TYPE_CHECKING:
    from ipvs_synproxy.keepalived_config import KeepalivedSettings

SECRET_LEN = 16


class ConfigError(ModelError):
    """A bad config value: ``source`` is ``file:line``, ``field`` the key path."""


# ---- YAML with line numbers -------------------------------------------------------------


class _Map(dict[Any, Any]):
    """A YAML mapping that remembers its own line and each key's line (1-based)."""

    line: int
    key_lines: dict[Any, int]


class _Seq(list[Any]):
    line: int
    item_lines: list[int]


class _Loader(yaml.SafeLoader):
    """SafeLoader whose mappings and sequences carry line numbers and which
    refuses duplicate keys (PyYAML silently keeps the last one)."""

    filename = "<config>"


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> _Map:
    loader.flatten_mapping(node)
    out = _Map()
    out.line = node.start_mark.line + 1
    out.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            hash(key)
        except TypeError:
            raise ConfigError(f"{loader.filename}:{line}", "key",
                              f"not a valid key: {key!r}") from None
        if key in out:
            raise ConfigError(f"{loader.filename}:{line}", str(key),
                              f"duplicate key (first on line {out.key_lines[key]})")
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = line
    return out


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> _Seq:
    out = _Seq(loader.construct_object(child, deep=True) for child in node.value)
    out.line = node.start_mark.line + 1
    out.item_lines = [child.start_mark.line + 1 for child in node.value]
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def _parse_yaml(text: str, filename: str) -> object:
    loader = _Loader(text)
    loader.filename = filename
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        raise ConfigError(f"{filename}:{line}", "yaml",
                          f"{exc.problem or exc.context or 'syntax error'}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{filename}:1", "yaml", str(exc)) from None
    finally:
        loader.dispose()


# ---- the configuration ------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceState:
    """A service with its real servers and laddr pool."""

    service: Service
    dests: tuple[Dest, ...] = ()
    laddrs: tuple[Laddr, ...] = ()


@dataclass(frozen=True)
class State:
    """An IPVS table plus sysctl values (None: the knob is absent)."""

    services: tuple[ServiceState, ...] = ()
    sysctls: Mapping[str, sysctl_mod.Value | None] = field(default_factory=dict)


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


TOP_KEYS = ("services", "sysctl", "cookie_secret_file", "keepalived")
SERVICE_KEYS = ("vip", "fwmark", "family", "protocol", "scheduler", "persistent", "netmask",
                "persistence_engine", "one_packet", "scheduler_flags", "synproxy", "forward",
                "laddrs", "real_servers", "healthcheck")
DEST_KEYS = ("addr", "weight", "forward", "upper_threshold", "lower_threshold",
             "tunnel_type", "tunnel_port")
SCHED_FLAGS = {"sh-fallback": IP_VS_SVC_F_SCHED1, "mh-fallback": IP_VS_SVC_F_SCHED1,
               "flag-1": IP_VS_SVC_F_SCHED1, "sh-port": IP_VS_SVC_F_SCHED2,
               "mh-port": IP_VS_SVC_F_SCHED2, "flag-2": IP_VS_SVC_F_SCHED2,
               "flag-3": IP_VS_SVC_F_SCHED3}


class _Reader:
    """Walks the parsed YAML, keeping the file name for messages."""

    def __init__(self, filename: str) -> None:
        self.filename = filename

    def err(self, line: int, path: str, message: str) -> ConfigError:
        return ConfigError(f"{self.filename}:{line}", path, message)

    def at(self, m: _Map, key: str) -> int:
        return m.key_lines.get(key, m.line)

    def mapping(self, value: object, line: int, path: str, keys: Sequence[str]) -> _Map:
        if not isinstance(value, _Map):
            raise self.err(getattr(value, "line", line), path,
                           f"expected a mapping, got {_typename(value)}")
        for k in value:
            if k not in keys:
                raise self.err(value.key_lines[k], f"{path}.{k}" if path else str(k),
                               f"unknown key {k!r} (expected one of: {', '.join(keys)})")
        return value

    def seq(self, value: object, line: int, path: str) -> _Seq:
        if not isinstance(value, _Seq):
            raise self.err(getattr(value, "line", line), path,
                           f"expected a list, got {_typename(value)}")
        return value

    def parse(self, m: _Map, key: str, path: str, fn: Callable[[str], Any]) -> Any:
        """Call ``fn(source)``; a ModelError becomes a ConfigError at ``key``."""
        where = f"{self.filename}:{self.at(m, key)}"
        try:
            return fn(where)
        except ModelError as exc:
            raise ConfigError(where, f"{path}.{key}" if path else key, exc.message) from None


def _typename(value: object) -> str:
    if value is None:
        return "nothing"
    return {"_Map": "a mapping", "_Seq": "a list", "str": f"the string {value!r}",
            "bool": f"the boolean {value!r}", "int": f"the integer {value!r}",
            "float": f"the number {value!r}"}.get(type(value).__name__, type(value).__name__)


def _bool(value: object, source: str, name: str) -> bool:
    if not isinstance(value, bool):
        raise ModelError(source, name, f"not a boolean (true/false): {value!r}")
    return value


def _str(value: object, source: str, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ModelError(source, name, f"not a string: {value!r}")
    return value.strip()


def _int_field(value: object, name: str, source: str) -> int:
    return parse_int(value, source, name)


def _netmask(value: object, source: str) -> int:
    if isinstance(value, str) and "." in value:
        try:
            net = ipaddress.IPv4Network(f"0.0.0.0/{value.strip()}")
        except ValueError:
            raise ModelError(source, "netmask", f"not a netmask: {value!r}") from None
        return net.prefixlen
    return parse_int(value, source, "netmask", 1, 128)


def _read_service(r: _Reader, raw: object, line: int, path: str) -> ServiceState:
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
            _str(m["vip"], s, "vip"), s))
        kw.update(addr=addr, port=port)
        if "protocol" in m:
            kw["protocol"] = r.parse(m, "protocol", path,
                                     lambda s: parse_protocol(_str(m["protocol"], s,
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
                                  lambda s: _str(m["scheduler"], s, "scheduler"))
    if "persistent" in m:
        kw["persistent"] = r.parse(m, "persistent", path, lambda s: parse_int(
            m["persistent"], s, "persistent", 0, 0xFFFF_FFFF))
    if "netmask" in m:
        kw["netmask"] = r.parse(m, "netmask", path, lambda s: _netmask(m["netmask"], s))
    if "persistence_engine" in m:
        kw["pe_name"] = r.parse(m, "persistence_engine", path,
                                lambda s: _str(m["persistence_engine"], s, "engine"))
    if "synproxy" in m:
        kw["synproxy"] = r.parse(m, "synproxy", path,
                                 lambda s: _bool(m["synproxy"], s, "synproxy"))
    flags = 0
    if "one_packet" in m and r.parse(m, "one_packet", path,
                                     lambda s: _bool(m["one_packet"], s, "one_packet")):
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
            _str(m["forward"], s, "forward"), s))

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
            dest = _read_dest(r, raw_d, seq.item_lines[i], dpath, svc, default_fwd)
            dm = cast(_Map, raw_d)
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
    return ServiceState(svc, tuple(dests), tuple(laddrs))


def _read_dest(r: _Reader, raw: object, line: int, path: str, svc: Service,
               default_fwd: FwdMethod) -> Dest:
    m = r.mapping(raw, line, path, DEST_KEYS)
    if "addr" not in m:
        raise r.err(m.line, path, "a real server needs 'addr' (ADDR or ADDR:PORT)")
    # ipvsadm's rule: without a port the real server takes the service's.
    addr, port = r.parse(m, "addr", path, lambda s: parse_endpoint(
        _str(m["addr"], s, "addr"), s, default_port=svc.port))
    kw: dict[str, Any] = {"addr": addr, "port": port, "fwd": default_fwd}
    if "forward" in m:
        kw["fwd"] = r.parse(m, "forward", path, lambda s: FwdMethod.parse(
            _str(m["forward"], s, "forward"), s))
    for key, attr in (("weight", "weight"), ("upper_threshold", "u_thresh"),
                      ("lower_threshold", "l_thresh")):
        if key in m:
            value = m[key]
            kw[attr] = r.parse(m, key, path, partial(_int_field, value, key))
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
    try:
        dest = Dest(**kw)
    except ModelError as exc:
        key = {"u_thresh": "upper_threshold", "l_thresh": "lower_threshold",
               "address": "addr", "port": "addr"}.get(exc.field, exc.field)
        raise r.err(r.at(m, key), f"{path}.{key}", exc.message) from None
    if dest.af != svc.af and dest.fwd is not FwdMethod.TUNNEL:
        raise r.err(r.at(m, "addr"), f"{path}.addr",
                    f"IPv{dest.addr.version} real server behind an IPv"
                    f"{4 if svc.af == Family.INET else 6} service: only the tunnel "
                    "method crosses families")
    return dest


def _read_sysctls(r: _Reader, raw: object, line: int) -> dict[str, sysctl_mod.Value]:
    if not isinstance(raw, _Map):
        raise r.err(getattr(raw, "line", line), "sysctl",
                    f"expected a mapping of net.ipv4.vs knobs, got {_typename(raw)}")
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


def loads(text: str, filename: str = "<config>", *, require_root_owner: bool = True
          ) -> Config:
    """Parse and validate a config; raises :class:`ConfigError`."""
    r = _Reader(filename)
    doc = _parse_yaml(text, filename)
    if doc is None:
        doc = _Map()
        doc.line, doc.key_lines = 1, {}
    top = r.mapping(doc, 1, "", TOP_KEYS)
    sysctls: dict[str, sysctl_mod.Value] = {}
    if "sysctl" in top and top["sysctl"] is not None:
        sysctls = _read_sysctls(r, top["sysctl"], r.at(top, "sysctl"))
    secret = secret_file = None
    if "cookie_secret_file" in top:
        secret_file = r.parse(top, "cookie_secret_file", "", lambda s: _str(
            top["cookie_secret_file"], s, "cookie_secret_file"))
        if not os.path.isabs(secret_file):
            raise r.err(r.at(top, "cookie_secret_file"), "cookie_secret_file",
                        f"must be an absolute path, got {secret_file!r}")
        secret = r.parse(top, "cookie_secret_file", "", lambda s: read_secret(
            secret_file, s, require_root_owner=require_root_owner))
    services: list[ServiceState] = []
    origins: dict[Any, str] = {}
    if "services" in top and top["services"] is not None:
        seq = r.seq(top["services"], r.at(top, "services"), "services")
        for i, raw in enumerate(seq):
            st = _read_service(r, raw, seq.item_lines[i], f"services[{i}]")
            key = st.service.key()
            where = f"{filename}:{seq.item_lines[i]}"
            if key in origins:
                raise ConfigError(where, f"services[{i}]",
                                  f"duplicate service {st.service} (first at "
                                  f"{origins[key]})")
            origins[key] = where
            services.append(st)
    from ipvs_synproxy import keepalived_config  # it builds on this module's reader

    keepalived = keepalived_config.read(r, top, services)
    return Config(filename, State(tuple(services), sysctls), secret, secret_file, origins,
                  keepalived)


def load(path: str, *, require_root_owner: bool = True) -> Config:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(path, "file", exc.strerror or str(exc)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(path, "file", f"not UTF-8 text: {exc.reason}") from None
    return loads(text, path, require_root_owner=require_root_owner)


# ---- changes ----------------------------------------------------------------------------


class Op(enum.Enum):
    ADD = "add"
    EDIT = "edit"
    DELETE = "delete"


@dataclass(frozen=True)
class Setting:
    """A sysctl and its value (None: the knob is absent)."""

    name: str
    value: sysctl_mod.Value | None


Item = Service | Dest | Laddr | Setting


@dataclass(frozen=True)
class Change:
    """One kernel operation. ``service`` is the service a dest/laddr belongs to
    (for a service change, the service itself as identified to the kernel)."""

    op: Op
    old: Item | None
    new: Item | None
    service: Service | None = None

    @property
    def kind(self) -> str:
        item = self.new if self.new is not None else self.old
        return {Service: "service", Dest: "dest", Laddr: "laddr",
                Setting: "sysctl"}[type(item)]

    def inverse(self) -> Change:
        op = {Op.ADD: Op.DELETE, Op.DELETE: Op.ADD, Op.EDIT: Op.EDIT}[self.op]
        return Change(op, self.new, self.old, self.service)


def _index(services: Iterable[ServiceState]) -> dict[Any, ServiceState]:
    return {s.service.key(): s for s in services}


def diff(current: State, desired: State) -> list[Change]:
    """The changes, in the order to apply them, that turn ``current`` into
    ``desired``: sysctls; the deletion of services no longer wanted (their real
    servers and laddrs first, so that every step has an exact inverse); then,
    per desired service in order, its addition or edit, laddr additions,
    real-server edits and additions, and only then real-server and laddr
    deletions (a service never runs short of real servers in between). Only
    the sysctls ``desired`` names are managed; the IPVS table is managed whole."""
    changes: list[Change] = []
    for name in sorted(desired.sysctls):
        want = desired.sysctls[name]
        have = current.sysctls.get(name)
        if want is not None and have != want:
            changes.append(Change(Op.EDIT, Setting(name, have), Setting(name, want)))
    wanted = _index(desired.services)
    for st in current.services:
        if st.service.key() not in wanted:
            changes += [Change(Op.DELETE, d, None, st.service) for d in st.dests]
            changes += [Change(Op.DELETE, la, None, st.service) for la in st.laddrs]
            changes.append(Change(Op.DELETE, st.service, None, st.service))
    cur = _index(current.services)
    for st in desired.services:
        svc = st.service
        old = cur.get(svc.key())
        if old is None:
            changes.append(Change(Op.ADD, None, svc, svc))
            changes += [Change(Op.ADD, None, la, svc) for la in st.laddrs]
            changes += [Change(Op.ADD, None, d, svc) for d in st.dests]
            continue
        if old.service != svc:
            changes.append(Change(Op.EDIT, old.service, svc, svc))
        old_laddrs = {la.addr: la for la in old.laddrs}
        new_laddrs = {la.addr for la in st.laddrs}
        changes += [Change(Op.ADD, None, la, svc) for la in st.laddrs
                    if la.addr not in old_laddrs]
        old_dests = {(d.addr, d.port): d for d in old.dests}
        adds = []
        for d in st.dests:
            prev = old_dests.get((d.addr, d.port))
            if prev is None:
                adds.append(Change(Op.ADD, None, d, svc))
            elif prev != d:
                changes.append(Change(Op.EDIT, prev, d, svc))
        changes += adds
        new_dests = {(d.addr, d.port) for d in st.dests}
        changes += [Change(Op.DELETE, d, None, svc) for d in old.dests
                    if (d.addr, d.port) not in new_dests]
        changes += [Change(Op.DELETE, la, None, svc) for la in old.laddrs
                    if la.addr not in new_laddrs]
    return changes


def rollback_plan(done: Sequence[Change]) -> list[Change]:
    """What undoes ``done``: the inverse of each change, last first."""
    return [c.inverse() for c in reversed(done)]


def problems(current: State, desired: Config, caps: Mapping[str, bool]) -> list[str]:
    """What stops the config from being applied to this kernel at all (checked
    before anything is changed). ``caps``: ``laddr``, ``synproxy_secret``."""
    out = []
    for name in sorted(desired.state.sysctls):
        if current.sysctls.get(name) is None:
            knob = sysctl_mod.KNOBS.get(name)
            hint = f" (an {knob.origin} knob)" if knob and knob.origin != "stock" else ""
            out.append(f"sysctl {sysctl_mod.PREFIX}{name} is not present in this "
                       f"kernel{hint}")
    if not caps.get("laddr"):
        for st in desired.state.services:
            if st.laddrs:
                out.append(f"service {st.service} has laddrs, but the loaded IPVS "
                           "modules do not support laddr pools (load the ipvs-synproxy "
                           "modules)")
    if desired.secret is not None and not caps.get("synproxy_secret"):
        out.append(f"cookie_secret_file {desired.secret_file}: NotSupported: the loaded "
                   "IPVS modules cannot set the SYN proxy secret (needs the "
                   "ipvs-synproxy modules with the SYN proxy)")
    return out


# ---- executing changes ------------------------------------------------------------------


class Target(Interface):
    """What :func:`apply_changes` drives: the netlink client and the sysctls."""

    def add_service(self, svc: Service) -> None: ...
    def edit_service(self, svc: Service) -> None: ...
    def del_service(self, svc: Service) -> None: ...
    def add_dest(self, svc: Service, dest: Dest) -> None: ...
    def edit_dest(self, svc: Service, dest: Dest) -> None: ...
    def del_dest(self, svc: Service, dest: Dest) -> None: ...
    def add_laddr(self, svc: Service, addr: IPAddress) -> None: ...
    def del_laddr(self, svc: Service, addr: IPAddress) -> None: ...
    def write_sysctl(self, name: str, value: sysctl_mod.Value) -> None: ...


def execute(change: Change, target: Target) -> None:
    item = change.new if change.new is not None else change.old
    svc = change.service
    if isinstance(item, Setting):
        assert isinstance(change.new, Setting)
        if change.new.value is None:
            raise sysctl_mod.SysctlError(item.name, "cannot restore an absent knob")
        target.write_sysctl(item.name, change.new.value)
        return
    assert svc is not None
    if isinstance(item, Service):
        {Op.ADD: target.add_service, Op.EDIT: target.edit_service,
         Op.DELETE: target.del_service}[change.op](item)
    elif isinstance(item, Dest):
        {Op.ADD: target.add_dest, Op.EDIT: target.edit_dest,
         Op.DELETE: target.del_dest}[change.op](svc, item)
    elif isinstance(item, Laddr):
        if change.op is Op.ADD:
            target.add_laddr(svc, item.addr)
        elif change.op is Op.DELETE:
            target.del_laddr(svc, item.addr)
        else:  # laddrs have nothing to edit
            raise AssertionError(f"cannot edit a laddr: {change}")


@dataclass
class ApplyError(Exception):
    """A change failed (``failed``; None: setting the cookie secret after all
    changes); ``done`` were undone except those in ``rollback_errors``."""

    failed: Change | None
    error: Exception
    done: list[Change]
    rollback_errors: list[tuple[Change, Exception]]

    def __str__(self) -> str:
        what = describe(self.failed) if self.failed else "setting the SYN proxy secret"
        lines = [f"failed: {what}: {self.error}"]
        if not self.done:
            lines.append("nothing had been changed")
        elif not self.rollback_errors:
            lines.append(f"rolled back the {len(self.done)} change(s) already made; "
                         "the previous state is restored")
        else:
            lines.append(f"ROLLBACK INCOMPLETE: {len(self.rollback_errors)} of "
                         f"{len(self.done)} change(s) could not be undone:")
            lines += [f"  {describe(c)}: {e}" for c, e in self.rollback_errors]
        return "\n".join(lines)


def apply_changes(changes: Sequence[Change], target: Target,
                  after: Callable[[], None] | None = None) -> None:
    """Execute ``changes`` in order, then ``after`` (e.g. setting the secret);
    if anything fails, undo what was done and raise :class:`ApplyError`."""
    done: list[Change] = []
    failed: Change | None = None
    try:
        for c in changes:
            failed = c
            execute(c, target)
            done.append(c)
        failed = None
        if after is not None:
            after()
    except Exception as exc:
        errors: list[tuple[Change, Exception]] = []
        for undo in rollback_plan(done):
            try:
                execute(undo, target)
            except Exception as rexc:
                errors.append((undo, rexc))
        raise ApplyError(failed, exc, done, errors) from exc


# ---- presenting changes -----------------------------------------------------------------


def item_dict(item: Item | None) -> dict[str, Any] | None:
    """A JSON-friendly view of a service, real server, laddr or sysctl."""
    if item is None:
        return None
    if isinstance(item, Setting):
        value = None if item.value is None else " ".join(map(str, item.value))
        return {"name": f"{sysctl_mod.PREFIX}{item.name}", "value": value}
    if isinstance(item, Laddr):
        return {"addr": str(item.addr)}
    if isinstance(item, Dest):
        d: dict[str, Any] = {"addr": str(item.addr), "port": item.port,
                             "forward": item.fwd.name.lower(), "weight": item.weight,
                             "upper_threshold": item.u_thresh,
                             "lower_threshold": item.l_thresh}
        if item.fwd is FwdMethod.TUNNEL:
            d.update(tunnel_type=item.tun_type.name.lower(), tunnel_port=item.tun_port)
        return d
    out: dict[str, Any] = {}
    if item.fwmark:
        out.update(fwmark=item.fwmark, family="ipv6" if item.af == Family.INET6 else "ipv4")
    else:
        out.update(protocol=item.protocol.value, vip=format_endpoint(item.addr, item.port))
    out.update(scheduler=item.scheduler, persistent=item.persistent, netmask=item.prefix,
               synproxy=item.synproxy, one_packet=bool(item.flags & IP_VS_SVC_F_ONEPACKET),
               scheduler_flags=[n for n, b in (("flag-1", IP_VS_SVC_F_SCHED1),
                                               ("flag-2", IP_VS_SVC_F_SCHED2),
                                               ("flag-3", IP_VS_SVC_F_SCHED3))
                                if item.flags & b],
               persistence_engine=item.pe_name)
    return out


def _what(item: Item, svc: Service | None) -> str:
    if isinstance(item, Setting):
        return f"sysctl {sysctl_mod.PREFIX}{item.name}"
    if isinstance(item, Service):
        return f"service {item}"
    of = f" of {svc}" if svc is not None else ""
    if isinstance(item, Dest):
        return f"real server {item}{of}"
    return f"laddr {item.addr}{of}"


def _summary(item: Item) -> str:
    if isinstance(item, Service):
        bits = [item.scheduler]
        if item.persistent:
            bits.append(f"persistent {item.persistent}")
        if item.synproxy:
            bits.append("synproxy")
        return ", ".join(bits)
    if isinstance(item, Dest):
        return f"{item.fwd.name.lower()}, weight {item.weight}"
    return ""


def describe(c: Change) -> str:
    """One line: ``+ real server 192.0.2.11:80 of 198.51.100.10:80/tcp (masq, weight 1)``."""
    item = c.new if c.new is not None else c.old
    assert item is not None
    what = _what(item, c.service)
    if c.op is Op.ADD:
        extra = _summary(item)
        return f"+ {what}" + (f" ({extra})" if extra else "")
    if c.op is Op.DELETE:
        return f"- {what}"
    return f"~ {what}: {', '.join(edit_details(c))}"


def edit_details(c: Change) -> list[str]:
    old, new = item_dict(c.old), item_dict(c.new)
    if isinstance(c.new, Setting):
        assert old is not None and new is not None
        return [f"{old['value'] or '(absent)'} -> {new['value']}"]
    assert old is not None and new is not None
    return [f"{k} {_fmt(old.get(k))} -> {_fmt(new.get(k))}"
            for k in new if old.get(k) != new.get(k)]


def _fmt(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(map(str, v)) + "]"
    return str(v)


def change_dict(c: Change) -> dict[str, Any]:
    return {"op": c.op.value, "kind": c.kind,
            "service": str(c.service) if c.service is not None and c.kind != "service"
            else None,
            "old": item_dict(c.old), "new": item_dict(c.new), "text": describe(c)}


def counts(changes: Sequence[Change]) -> dict[str, int]:
    out = {op.value: 0 for op in Op}
    for c in changes:
        out[c.op.value] += 1
    return out


def format_changes(changes: Sequence[Change]) -> Iterator[str]:
    for c in changes:
        yield describe(c)
    n = counts(changes)
    if not changes:
        yield "no changes"
    else:
        yield (f"{len(changes)} change(s): {n['add']} to add, {n['edit']} to edit, "
               f"{n['delete']} to delete")


# ---- the live kernel --------------------------------------------------------------------


def read_state(ipvs: netlink.IPVS, sysctls: sysctl_mod.Sysctls,
               sysctl_names: Iterable[str]) -> State:
    """The kernel's table (with laddrs when the modules support them) and the
    values of the named sysctls (None for an absent knob)."""
    with_laddrs = ipvs.supports(netlink.IPVS_CMD_GET_LADDR)
    services = []
    for svc in ipvs.services():
        laddrs = tuple(ipvs.laddrs(svc)) if with_laddrs else ()
        services.append(ServiceState(svc, tuple(ipvs.dests(svc)), laddrs))
    values: dict[str, sysctl_mod.Value | None] = {}
    for name in sysctl_names:
        try:
            values[name] = sysctls.read(name)
        except sysctl_mod.SysctlMissing:
            values[name] = None
    return State(tuple(services), values)


def capabilities(ipvs: netlink.IPVS) -> dict[str, bool]:
    return {"laddr": ipvs.supports(netlink.IPVS_CMD_NEW_LADDR),
            "synproxy_secret": ipvs.supports(netlink.IPVS_CMD_SET_SYNPROXY_SECRET)}


class KernelTarget:
    """:class:`Target` over a netlink connection and the namespace's sysctls."""

    def __init__(self, ipvs: netlink.IPVS, sysctls: sysctl_mod.Sysctls) -> None:
        self.ipvs = ipvs
        self.sysctls = sysctls
        self.add_service = ipvs.add_service
        self.edit_service = ipvs.edit_service
        self.del_service = ipvs.del_service
        self.add_dest = ipvs.add_dest
        self.edit_dest = ipvs.edit_dest
        self.del_dest = ipvs.del_dest
        self.add_laddr = ipvs.add_laddr
        self.del_laddr = ipvs.del_laddr

    def write_sysctl(self, name: str, value: sysctl_mod.Value) -> None:
        self.sysctls.write(name, value)


@dataclass(frozen=True)
class Plan:
    config: Config
    current: State
    changes: list[Change]
    problems: list[str]


def plan(cfg: Config, ipvs: netlink.IPVS, sysctls: sysctl_mod.Sysctls) -> Plan:
    current = read_state(ipvs, sysctls, cfg.state.sysctls)
    return Plan(cfg, current, diff(current, cfg.state),
                problems(current, cfg, capabilities(ipvs)))


def apply_plan(p: Plan, ipvs: netlink.IPVS, sysctls: sysctl_mod.Sysctls) -> None:
    """Apply ``p`` all or nothing (raises :class:`ApplyError`); the cookie
    secret, which cannot be read back, is set last so a failure leaves it alone."""
    if p.problems:
        raise ValueError("refusing to apply a plan with problems")
    secret = p.config.secret
    after = None if secret is None else (lambda: ipvs.set_synproxy_secret(secret))
    apply_changes(p.changes, KernelTarget(ipvs, sysctls), after)
