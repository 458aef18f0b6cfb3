"""The console's service layer: everything the pages, the API and /metrics ask of
the kernel, through :mod:`ipvs_synproxy` only (never netlink messages here).

:class:`ConsoleService` takes a ``connect`` callable that returns an IPVS
control connection (:class:`ipvs_synproxy.kernel.netlink.IPVS` in production, a stand-in
in tests) and a sysctl reader. A connection is opened per call: ``IPVS`` is not
thread-safe and the WSGI server runs requests on several threads.

Input from the web is validated here, before anything reaches the kernel:
:class:`InputError` (HTTP 400) names the field; nothing is changed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

from ipvs_synproxy.exporter import collector, series
from ipvs_synproxy.kernel import netlink, xdp
from ipvs_synproxy.kernel import sysctl as sysctl_mod
from ipvs_synproxy.kernel.model import (
    PROXY_PROTOCOL_NAMES,
    Dest,
    Family,
    FwdMethod,
    IPAddress,
    Laddr,
    ModelError,
    ProxyProtocol,
    Service,
    Stats,
    make_dest,
    proxy_protocol_error,
)
from webui import validate

WEIGHT_MAX = 2**31 - 1  # the kernel's, ipvsadm's and the config file's limit (INT_MAX)
STATS_FIELDS = [f.name for f in dataclasses.fields(Stats)]
PROC_STATS = "/proc/thread-self/net/ip_vs_stats"  # thread-self: setns is per thread


class Kernel(collector.Source, Protocol):
    """What the console needs of an IPVS connection (netlink.IPVS has it all): the
    exporter's reads, and the edits of the console's forms."""

    def __enter__(self) -> Kernel: ...
    def edit_service(self, svc: Service) -> None: ...
    def add_dest(self, svc: Service, dest: Dest) -> None: ...
    def edit_dest(self, svc: Service, dest: Dest) -> None: ...
    def del_dest(self, svc: Service, dest: Dest) -> None: ...


class SysctlReader(Protocol):
    def read_all(self) -> dict[str, sysctl_mod.Value]: ...
    def read(self, name: str) -> sysctl_mod.Value: ...


class ConsoleError(Exception):
    status = 500

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InputError(ConsoleError):
    """Bad input from the user (HTTP 400); nothing was changed."""

    status = 400


class NotFoundError(ConsoleError):
    """A page or API resource that does not exist (HTTP 404)."""

    status = 404


class ConflictError(ConsoleError):
    """The kernel's table is not in the state the request assumed (HTTP 409)."""

    status = 409


class KernelError(ConsoleError):
    """The kernel refused or IPVS is unreachable (HTTP 502/503)."""

    status = 502


# ---- identifiers in URLs ------------------------------------------------------------------
#
# A service is ``tcp_198.51.100.10_80``, ``tcp_2001:db8:1::10_80`` or ``fwm_5_ipv4``;
# a real server ``192.0.2.11_80``. Addresses never contain "_", so it splits cleanly.


def service_id(svc: Service) -> str:
    if svc.fwmark:
        return f"fwm_{svc.fwmark}_{'ipv6' if svc.af == Family.INET6 else 'ipv4'}"
    return f"{svc.protocol.value}_{svc.addr}_{svc.port}"


def dest_id(dest: Dest) -> str:
    return f"{dest.addr}_{dest.port}"


def _split_dest_id(text: str) -> tuple[IPAddress, int]:
    addr_text, _, port_text = text.rpartition("_")
    try:
        return (validate.ip_address(addr_text, "real_server"),
                validate.port(port_text, "real_server", lo=0))
    except validate.Invalid:
        raise InputError(f"not a real server: {text!r} (expected ADDRESS_PORT)",
                         "real_server") from None


# ---- validating input --------------------------------------------------------------------


def _checked(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    try:
        return fn(*args, **kw)
    except validate.Invalid as exc:
        raise InputError(str(exc), exc.field) from None


def parse_weight(value: object) -> int:
    """A weight from a form or JSON: a decimal integer 0-2147483647 (ipvsadm's range)."""
    return int(_checked(validate.integer, value, "weight", 0, WEIGHT_MAX))


def parse_proxy_protocol(value: object) -> ProxyProtocol:
    """A PROXY protocol setting from a form or JSON: off, v1 or v2."""
    return ProxyProtocol(_checked(validate.proxy_protocol, value))


def parse_bool(value: object, field: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("on", "true", "1", "yes"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("off", "false", "0", "no"):
        return False
    raise InputError(f"{field} must be true or false, got {value!r}", field)


def parse_port(value: object, field: str = "port") -> int:
    """A real server's port from a form or JSON: 1-65535."""
    return int(_checked(validate.port, value, field))


FWD_CHOICES = ("masq", "route", "tunnel", "fullnat")
PROXY_CHOICES = PROXY_PROTOCOL_NAMES


def _with_proxy_protocol(svc: Service, dest: Dest, pp: ProxyProtocol) -> Dest:
    """``dest`` with PROXY setting ``pp``, or InputError: v1/v2 need a FULLNAT real
    server of a TCP (or fwmark) service."""
    try:
        new = dataclasses.replace(dest, proxy_protocol=pp)
    except ModelError as exc:
        raise InputError(f"proxy_protocol: {exc.message}", "proxy_protocol") from None
    if why := proxy_protocol_error(svc, new):
        raise InputError(f"proxy_protocol: {why}", "proxy_protocol")
    return new


# ---- reading ------------------------------------------------------------------------------


def health(dest: Dest) -> str:
    """What IPVS itself knows of a real server: health checks (keepalived) show up
    as weight changes or removal, so weight 0 is "drained"; a server at its upper
    connection threshold gets no new connections ("overloaded")."""
    if dest.weight == 0:
        return "drained"
    if dest.u_thresh and dest.active_conns + dest.inact_conns >= dest.u_thresh:
        return "overloaded"
    return "up"


def stats_dict(s: Stats | None) -> dict[str, int]:
    s = s or Stats()
    return {name: getattr(s, name) for name in STATS_FIELDS}


def dest_dict(dest: Dest) -> dict[str, Any]:
    return {"id": dest_id(dest), "addr": str(dest.addr), "port": dest.port,
            "forward": dest.fwd.name.lower(), "weight": dest.weight,
            "proxy_protocol": str(dest.proxy_protocol),
            "upper_threshold": dest.u_thresh, "lower_threshold": dest.l_thresh,
            "active_conns": dest.active_conns, "inactive_conns": dest.inact_conns,
            "persistent_conns": dest.persist_conns, "health": health(dest),
            "stats": stats_dict(dest.stats)}


def service_dict(svc: Service, dests: list[Dest]) -> dict[str, Any]:
    methods = sorted({d.fwd.name.lower() for d in dests})
    up = sum(1 for d in dests if health(d) == "up")
    return {
        "id": service_id(svc), "name": str(svc),
        "protocol": svc.protocol.value if not svc.fwmark else "fwmark",
        "vip": str(svc.addr) if svc.addr is not None else None, "port": svc.port,
        "fwmark": svc.fwmark or None, "family": "ipv6" if svc.af == Family.INET6 else "ipv4",
        "scheduler": svc.scheduler, "persistent": svc.persistent, "synproxy": svc.synproxy,
        "methods": methods, "stats": stats_dict(svc.stats),
        "active_conns": sum(d.active_conns for d in dests),
        "inactive_conns": sum(d.inact_conns for d in dests),
        "health": "down" if dests and not up else ("no real servers" if not dests else
                                                   f"{up}/{len(dests)} up"),
        "real_servers": [dest_dict(d) for d in dests],
    }


@dataclasses.dataclass(frozen=True)
class Table:
    """One read of the kernel's table (what /metrics and the pages show)."""

    services: tuple[tuple[Service, tuple[Dest, ...], tuple[Laddr, ...]], ...]
    ext: Mapping[str, int] | None
    totals: Mapping[str, int] | None  # /proc/net/ip_vs_stats (None: not readable)


def parse_proc_stats(text: str) -> dict[str, int]:
    """The totals row of /proc/net/ip_vs_stats (hexadecimal numbers)."""
    lines = [ln.split() for ln in text.splitlines() if ln.strip()]
    row = lines[2]
    names = ("conns", "inpkts", "outpkts", "inbytes", "outbytes")
    return {n: int(v, 16) for n, v in zip(names, row[:5], strict=True)}


def read_proc_stats(netns: str | None) -> dict[str, int] | None:
    ctx: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if netns is not None:
        from ipvs_synproxy.kernel.netns import netns as enter_netns

        ctx = enter_netns(netns)
    try:
        with ctx, open(PROC_STATS) as f:
            return parse_proc_stats(f.read())
    except (OSError, IndexError, ValueError):
        return None


class _RateSampler:
    """Per-second rates of the extended counters, between reads at least
    ``min_interval`` apart (several browsers polling share one estimate)."""

    def __init__(self, clock: Callable[[], float], min_interval: float = 0.5) -> None:
        self.clock = clock
        self.min_interval = min_interval
        self.lock = threading.Lock()
        self.prev: tuple[float, dict[str, int]] | None = None
        self.rates: dict[str, float] = {}

    def update(self, ext: Mapping[str, int]) -> dict[str, float]:
        now = self.clock()
        with self.lock:
            if self.prev is None:
                self.prev = (now, dict(ext))
                self.rates = {k: 0.0 for k in ext}
            elif now - self.prev[0] >= self.min_interval:
                t0, old = self.prev
                dt = now - t0
                self.rates = {k: round(max(0, v - old.get(k, v)) / dt, 3)
                              for k, v in ext.items()}
                self.prev = (now, dict(ext))
            return dict(self.rates)


class _XdpSampler:
    """Per-second rates of each XDP program's counters, per device (a device
    seen for the first time starts at 0/s; one no longer attached is forgotten)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.lock = threading.Lock()
        self.devices: dict[str, _RateSampler] = {}

    def update(self, devices: Iterable[xdp.DeviceStats]) -> list[dict[str, Any]]:
        devs = list(devices)
        with self.lock:
            for gone in set(self.devices) - {d.dev for d in devs}:
                del self.devices[gone]
            samplers = [self.devices.setdefault(d.dev, _RateSampler(self.clock))
                        for d in devs]
        return [xdp_device_dict(d, s.update(d.stats)) for d, s in zip(devs, samplers,
                                                                      strict=True)]


def xdp_device_dict(d: xdp.DeviceStats, rates: Mapping[str, float]) -> dict[str, Any]:
    """One interface of the XDP view: its mode (None: pinned, not attached), the
    program's counters and their per-second rates."""
    return {"device": d.dev, "mode": d.mode, "counters": dict(d.stats), "rates": dict(rates)}


# ---- the attack view ----------------------------------------------------------------------
#
# Per SYN-proxy service, from its own counters (Service.sp_stats): SYNs, cookies, valid
# ACKs and proxied connections per second, drops by reason, and whether it is under a
# flood. The threshold and the drop reasons are the exporter's (ipvs_synproxy.exporter
# .series), so the console's badge, the alert rules and the dashboards agree.

# What each VIP's chart shows (the reply's key → the kernel's per-service counter).
ATTACK_RATES: dict[str, str] = {
    "syns": "synproxy_syn_received",
    "cookies": "synproxy_cookie_sent",
    "valid_acks": "synproxy_ack_valid",
    "proxied": "synproxy_conn_proxied",
    "invalid_acks": "synproxy_ack_invalid",
}
# Drop counters by the reason label of the exporter's ipvs_synproxy_drops_total.
DROP_REASONS: dict[str, str] = {
    ext: labels["reason"] for ext, (name, labels) in series.SERVICE_EXT.items()
    if name == "ipvs_synproxy_drops_total"}


@dataclasses.dataclass(frozen=True)
class FloodThreshold:
    """When a service counts as under flood (defaults: the exporter's, which the alert
    rules use too): over the last ``window`` seconds, at least ``syn_rate`` SYNs per
    second and fewer than ``valid_ack_ratio`` of its cookies came back as valid ACKs.
    No cookie sent is no flood, as in the alert rules (monitoring/): SYNs dropped before
    a cookie show as drops. The flag clears ``clear_after`` seconds after the last
    flooded window."""

    syn_rate: float = series.FLOOD_SYN_RATE
    valid_ack_ratio: float = series.FLOOD_VALID_ACK_RATIO
    window: float = series.FLOOD_WINDOW_S
    clear_after: float = series.FLOOD_CLEAR_S

    def flooded(self, rates: Mapping[str, float]) -> bool:
        ratio = valid_ack_ratio(rates)
        return rates["syns"] >= self.syn_rate and ratio is not None and \
            ratio < self.valid_ack_ratio

    def as_dict(self) -> dict[str, float]:
        return {"syn_rate": self.syn_rate, "valid_ack_ratio": self.valid_ack_ratio,
                "window_s": self.window, "clear_s": self.clear_after}


def valid_ack_ratio(rates: Mapping[str, float]) -> float | None:
    """Valid ACKs per cookie sent (None: no cookie sent)."""
    return rates["valid_acks"] / rates["cookies"] if rates["cookies"] > 0 else None


def attack_counters(sp: Mapping[str, int]) -> dict[str, int]:
    """The counters the attack view uses, from a service's ``sp_stats``."""
    names = (*ATTACK_RATES.values(), *DROP_REASONS)
    return {n: int(sp.get(n, 0)) for n in names}


@dataclasses.dataclass
class _FloodWindow:
    """One service's samples (time, counters), oldest first, and its flood state."""

    samples: deque[tuple[float, dict[str, int]]] = dataclasses.field(default_factory=deque)
    rates: dict[str, float] = dataclasses.field(default_factory=dict)
    flooding: bool = False
    first_flooded: float | None = None  # start of the current episode
    last_flooded: float | None = None  # time of the last flooded window


class _AttackSampler:
    """Rates of each SYN-proxy service's counters over the last ``window`` seconds and
    its flood flag with hysteresis. Sampled when read, at most every ``min_interval``
    seconds per service (several browsers polling share one estimate): a rate spans
    from the newest sample at least ``window`` old to now — or, with reads further
    apart than that, from the previous read (an older one only when nothing newer is
    left). Counters that went down (the service was deleted and added again) start
    its history afresh."""

    def __init__(self, clock: Callable[[], float], min_interval: float = 0.5) -> None:
        self.clock = clock
        self.min_interval = min_interval
        self.lock = threading.Lock()
        self.windows: dict[str, _FloodWindow] = {}

    def update(self, counters: Mapping[str, Mapping[str, int]],
               threshold: FloodThreshold) -> dict[str, _FloodWindow]:
        """``counters`` by service id → each service's window (services no longer
        listed are forgotten)."""
        now = self.clock()
        with self.lock:
            for sid in set(self.windows) - set(counters):
                del self.windows[sid]
            out = {}
            for sid, values in counters.items():
                w = self.windows.setdefault(sid, _FloodWindow())
                if not w.samples or now - w.samples[-1][0] >= self.min_interval:
                    _sample(w, now, dict(values), threshold)
                out[sid] = dataclasses.replace(w, samples=deque(), rates=dict(w.rates))
            return out


def _sample(w: _FloodWindow, now: float, values: dict[str, int],
            threshold: FloodThreshold) -> None:
    if w.samples and any(v < w.samples[-1][1].get(k, 0) for k, v in values.items()):
        w.samples.clear()
    s = w.samples
    s.append((now, values))
    while len(s) >= 2 and (s[1][0] <= now - threshold.window or
                           (len(s) >= 3 and s[0][0] < now - 2 * threshold.window)):
        s.popleft()
    t0, old = s[0]
    dt = now - t0
    w.rates = {key: round(max(0, values[c] - old.get(c, 0)) / dt, 3) if dt > 0 else 0.0
               for key, c in (*ATTACK_RATES.items(), *((c, c) for c in DROP_REASONS))}
    w.flooding = len(s) >= 2 and threshold.flooded(w.rates)
    if w.flooding:
        w.last_flooded = now
        if w.first_flooded is None:
            w.first_flooded = now
    elif w.last_flooded is not None and now - w.last_flooded >= threshold.clear_after:
        w.first_flooded = w.last_flooded = None


def attack_entry(svc: Service, w: _FloodWindow | None, now: float,
                 threshold: FloodThreshold) -> dict[str, Any]:
    """One service of the attack view (``w`` None: the kernel keeps no counters for it)."""
    sp = attack_counters(svc.sp_stats or {})
    rates = w.rates if w is not None and w.rates else dict.fromkeys(
        (*ATTACK_RATES, *DROP_REASONS), 0.0)
    under = w is not None and w.last_flooded is not None
    ratio = valid_ack_ratio(rates)
    return {
        "id": service_id(svc), "name": str(svc),
        "vip": str(svc.addr) if svc.addr is not None else None, "port": svc.port,
        "protocol": svc.protocol.value if not svc.fwmark else "fwmark",
        "synproxy": svc.synproxy, "counters": svc.sp_stats is not None,
        "rates": {k: rates[k] for k in ATTACK_RATES},
        "totals": {k: sp[c] for k, c in ATTACK_RATES.items()},
        "valid_ack_ratio": None if ratio is None else round(ratio, 4),
        "under_flood": under,
        "flooding_now": bool(w is not None and w.flooding),
        "flood_for_s": round(now - w.first_flooded, 1)
        if under and w is not None and w.first_flooded is not None else None,
        "clears_in_s": round(max(0.0, w.last_flooded + threshold.clear_after - now), 1)
        if under and w is not None and w.last_flooded is not None and not w.flooding
        else None,
        "drops": {reason: {"rate": rates[c], "total": sp[c]}
                  for c, reason in sorted(DROP_REASONS.items(), key=lambda kv: kv[1])},
    }


class ConsoleService:
    def __init__(self, connect: Callable[[], Kernel], sysctls: SysctlReader,
                 proc_stats: Callable[[], dict[str, int] | None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic,
                 allow_loopback: bool = False,
                 flood: FloodThreshold = FloodThreshold(),
                 services_changed: Callable[[Kernel], None] = lambda k: None,
                 xdp_stats: Callable[[], Iterable[xdp.DeviceStats]] = tuple) -> None:
        self._connect = connect
        self._xdp_stats = xdp_stats
        self._xdp_sampler = _XdpSampler(clock)
        self._services_changed = services_changed
        self.allow_loopback = allow_loopback
        self._sysctls = sysctls
        self._proc_stats = proc_stats
        self._clock = clock
        self._sampler = _RateSampler(clock)
        self.flood = flood
        self._attack = _AttackSampler(clock)

    @classmethod
    def for_netns(cls, netns: str | None, allow_loopback: bool = False,
                  flood: FloodThreshold = FloodThreshold()) -> ConsoleService:
        return cls(lambda: netlink.IPVS(netns), sysctl_mod.Sysctls(netns),
                   lambda: read_proc_stats(netns), allow_loopback=allow_loopback,
                   flood=flood,
                   # an XDP program attached there answers the new set of VIPs
                   services_changed=lambda k: xdp.mirror_services(netns, k.services),
                   xdp_stats=lambda: xdp.all_stats(netns))

    @contextlib.contextmanager
    def _kernel(self) -> Iterator[Kernel]:
        try:
            with self._connect() as k:
                yield k
        except netlink.IpvsUnavailable as exc:
            err = KernelError(str(exc))
            err.status = 503
            raise err from None
        except netlink.NotFound as exc:
            raise InputError(str(exc)) from None
        except netlink.AlreadyExists as exc:
            raise ConflictError(str(exc)) from None
        except netlink.NetlinkError as exc:
            raise KernelError(str(exc)) from None
        except OSError as exc:  # no such netns, no permission
            err = KernelError(f"cannot reach IPVS: {exc.strerror or exc}")
            err.status = 503
            raise err from None

    # -- reads

    def table(self, with_laddrs: bool = True) -> Table:
        rows = []
        with self._kernel() as k:
            has_laddr = k.supports(netlink.IPVS_CMD_GET_LADDR)
            for svc in k.services():
                try:
                    dests = tuple(k.dests(svc))
                    laddrs = tuple(k.laddrs(svc)) if with_laddrs and has_laddr else ()
                except netlink.ServiceNotFound:  # deleted while we listed
                    continue
                rows.append((svc, dests, laddrs))
            ext = None
            if k.supports(netlink.IPVS_CMD_GET_EXT_STATS):
                with contextlib.suppress(netlink.NotSupported):
                    ext = k.ext_stats()
        return Table(tuple(rows), ext, self._proc_stats())

    def overview(self) -> dict[str, Any]:
        t = self.table(with_laddrs=False)
        return {"services": [service_dict(s, list(d)) for s, d, _ in t.services],
                "extended_stats": t.ext is not None}

    def _find(self, k: Kernel, sid: str, status: type[ConsoleError]) -> Service:
        for svc in k.services():
            if service_id(svc) == sid:
                return svc
        raise status(f"no service {sid!r}", "service")

    def _find_dest(self, k: Kernel, svc: Service, rid: str) -> Dest:
        addr, port = _split_dest_id(rid)
        for d in k.dests(svc):
            if (d.addr, d.port) == (addr, port):
                return d
        raise InputError(f"service {svc} has no real server {rid!r}", "real_server")

    def _lport_range(self) -> int:
        try:
            knobs = self._sysctls.read_all()
        except sysctl_mod.SysctlError:
            knobs = {}
        lo = knobs.get("fullnat_lport_min", (1024,))[0]
        hi = knobs.get("fullnat_lport_max", (65535,))[0]
        return max(1, hi - lo + 1)

    def service(self, sid: str) -> dict[str, Any]:
        with self._kernel() as k:
            svc = self._find(k, sid, NotFoundError)
            dests = k.dests(svc)
            laddrs = k.laddrs(svc) if k.supports(netlink.IPVS_CMD_GET_LADDR) else None
        out = service_dict(svc, dests)
        ports = self._lport_range()
        out["laddrs_supported"] = laddrs is not None
        out["laddrs"] = [{"addr": str(la.addr), "conns": la.conn_counts,
                          "port_conflicts": la.port_conflict, "ports": ports,
                          "usage_percent": round(100.0 * la.conn_counts / ports, 2)}
                         for la in laddrs or []]
        return out

    def dest(self, sid: str, rid: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """(service summary, real server) for confirm pages; unknown → 400."""
        with self._kernel() as k:
            svc = self._find(k, sid, InputError)
            dest = self._find_dest(k, svc, rid)
        return service_dict(svc, []), dest_dict(dest)

    def ext(self) -> dict[str, Any]:
        with self._kernel() as k:
            ext = None
            if k.supports(netlink.IPVS_CMD_GET_EXT_STATS):
                with contextlib.suppress(netlink.NotSupported):
                    ext = k.ext_stats()
        if ext is None:
            return {"available": False, "time": time.time(), "totals": {}, "rates": {}}
        return {"available": True, "time": time.time(), "totals": dict(ext),
                "rates": self._sampler.update(ext)}

    def xdp_counters(self) -> dict[str, Any]:
        """The XDP fast path: per interface it is attached to, its mode and the
        program's counters with per-second rates (no interface: an empty list)."""
        return {"time": time.time(),
                "devices": self._xdp_sampler.update(self._xdp_stats())}

    def attack(self) -> dict[str, Any]:
        """The attack view: every service that has (or had) the SYN proxy on, with its
        rates over the flood window, drops by reason and the "under flood" flag."""
        with self._kernel() as k:
            svcs = [s for s in k.services() if s.synproxy or s.sp_stats is not None]
        windows = self._attack.update(
            {service_id(s): attack_counters(s.sp_stats) for s in svcs
             if s.sp_stats is not None}, self.flood)
        now = self._clock()
        return {"time": time.time(), "threshold": self.flood.as_dict(),
                "services": [attack_entry(s, windows.get(service_id(s)), now, self.flood)
                             for s in svcs]}

    def sysctls(self) -> list[dict[str, Any]]:
        try:
            live = self._sysctls.read_all()
        except sysctl_mod.SysctlError as exc:
            raise KernelError(str(exc)) from None
        out = []
        for name in sorted(set(live) | set(sysctl_mod.KNOBS)):
            knob = sysctl_mod.KNOBS.get(name)
            value = live.get(name)
            out.append({
                "name": f"{sysctl_mod.PREFIX}{name}",
                "value": None if value is None else sysctl_mod.display(name, value),
                "present": value is not None,
                "default": knob.default.replace("\t", " ") if knob else None,
                "changed": (value is not None and knob is not None and bool(knob.default)
                            and sysctl_mod.display(name, value) != knob.default.replace("\t", " ")),
                "meaning": knob.meaning if knob else None,
                "origin": knob.origin if knob else None,
            })
        return out

    # -- changes (each returns a description for the audit log and the reply)

    def set_weight(self, sid: str, rid: str, weight: object) -> dict[str, Any]:
        w = parse_weight(weight)
        with self._kernel() as k:
            svc = self._find(k, sid, InputError)
            dest = self._find_dest(k, svc, rid)
            k.edit_dest(svc, dataclasses.replace(dest, weight=w))
        return {"service": sid, "real_server": rid, "old_weight": dest.weight,
                "weight": w}

    def set_proxy_protocol(self, sid: str, rid: str, value: object) -> dict[str, Any]:
        """The PROXY protocol header of a FULLNAT real server of a TCP (or fwmark)
        service: off, v1 or v2. Anything else is refused before the kernel sees it."""
        pp = parse_proxy_protocol(value)
        with self._kernel() as k:
            svc = self._find(k, sid, InputError)
            dest = self._find_dest(k, svc, rid)
            new = _with_proxy_protocol(svc, dest, pp)
            if new.proxy_protocol != dest.proxy_protocol:
                k.edit_dest(svc, new)
        return {"service": sid, "real_server": rid,
                "old_proxy_protocol": str(dest.proxy_protocol), "proxy_protocol": str(pp)}

    def _new_dest(self, k: Kernel, svc: Service, addr: object, port: object,
                  weight: object, forward: object, proxy_protocol: object = None) -> Dest:
        w = parse_weight(weight)
        pp = ProxyProtocol.OFF if proxy_protocol in (None, "") \
            else parse_proxy_protocol(proxy_protocol)
        address = _checked(validate.real_server_address, addr,
                           allow_loopback=self.allow_loopback)
        if forward not in (None, "", *FWD_CHOICES):
            raise InputError(f"forward must be one of {', '.join(FWD_CHOICES)}, "
                             f"got {forward!r}", "forward")
        p = svc.port if port in (None, "") else parse_port(port)
        existing = k.dests(svc)
        fwd: object = forward or (existing[0].fwd.name.lower() if existing else "masq")
        try:
            dest = make_dest(source="web", addr=address, port=p, fwd=fwd, weight=w)
        except ModelError as exc:
            raise InputError(f"{exc.field}: {exc.message}", exc.field) from None
        if dest.af != svc.af and dest.fwd != FwdMethod.TUNNEL:
            raise InputError(f"addr: {dest.addr} is not of the service's family "
                             "(only tunnel forwarding may mix families)", "addr")
        if any((d.addr, d.port) == (dest.addr, dest.port) for d in existing):
            raise ConflictError(f"service {svc} already has real server {dest}")
        return _with_proxy_protocol(svc, dest, pp)

    def check_new_dest(self, sid: str, addr: object, port: object = None,
                       weight: object = 1, forward: object = None,
                       proxy_protocol: object = None
                       ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Validate a new real server without adding it (for the confirm step)."""
        with self._kernel() as k:
            svc = self._find(k, sid, InputError)
            dest = self._new_dest(k, svc, addr, port, weight, forward, proxy_protocol)
        return service_dict(svc, []), dest_dict(dest)

    def add_dest(self, sid: str, addr: object, port: object = None, weight: object = 1,
                 forward: object = None, proxy_protocol: object = None) -> dict[str, Any]:
        with self._kernel() as k:
            svc = self._find(k, sid, InputError)
            dest = self._new_dest(k, svc, addr, port, weight, forward, proxy_protocol)
            k.add_dest(svc, dest)
        return {"service": sid, "real_server": dest_id(dest), "weight": dest.weight,
                "forward": dest.fwd.name.lower(),
                "proxy_protocol": str(dest.proxy_protocol)}

    def del_dest(self, sid: str, rid: str) -> dict[str, Any]:
        with self._kernel() as k:
            svc = self._find(k, sid, InputError)
            dest = self._find_dest(k, svc, rid)
            k.del_dest(svc, dest)
        return {"service": sid, "real_server": rid}

    def set_synproxy(self, sid: str, enabled: object) -> dict[str, Any]:
        on = parse_bool(enabled, "synproxy")
        with self._kernel() as k:
            svc = self._find(k, sid, InputError)
            try:
                new = dataclasses.replace(svc, synproxy=on, stats=None)
            except ModelError as exc:
                raise InputError(exc.message, "synproxy") from None
            if new.synproxy != svc.synproxy:
                k.edit_service(new)
                self._services_changed(k)
        return {"service": sid, "old_synproxy": svc.synproxy, "synproxy": on}

    # -- the exporter's reading, for /metrics

    def reading(self) -> collector.Reading:
        """One read for the exporter's collector (:mod:`ipvs_synproxy.exporter`); raises
        what netlink raises, which the collector reports as ``ipvs_synproxy_up 0``."""
        return collector.read(self._connect, self._sysctls, xdp=self._xdp_stats)
