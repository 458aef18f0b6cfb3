"""One read of the kernel, turned into the series of :mod:`series`.

:func:`read` takes everything a scrape needs in one pass over netlink and
the sysctls: services with their real servers and FULLNAT local addresses,
the netns extended counters, the sync daemons and the three knobs the
derived gauges need; and the counters of the namespace's XDP programs
(through :func:`ipvs_synproxy.kernel.xdp.all_stats`, never bpf(2) here).
:class:`Collector` turns a :class:`Reading` into metric families; a failed
read yields ``ipvs_synproxy_up 0`` and nothing else, so a dashboard shows a
gap rather than stale numbers.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector as _Collector

from ipvs_synproxy.exporter import series
from ipvs_synproxy.kernel import netlink
from ipvs_synproxy.kernel import sysctl as sysctl_mod
from ipvs_synproxy.kernel.model import Dest, Laddr, Service, Stats, SyncDaemon
from ipvs_synproxy.kernel.xdp import DeviceStats

# The knobs a scrape reads, with the modules' defaults for when one is absent.
KNOBS = {"synproxy_secret_period": 64, "fullnat_lport_min": 1024, "fullnat_lport_max": 65535}


class Source(Protocol):
    """What :func:`read` needs of :class:`netlink.IPVS`."""

    def __enter__(self) -> Source: ...
    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None: ...
    def supports(self, cmd: int) -> bool: ...
    def services(self) -> list[Service]: ...
    def dests(self, svc: Service) -> list[Dest]: ...
    def laddrs(self, svc: Service) -> list[Laddr]: ...
    def ext_stats(self) -> dict[str, int]: ...
    def daemons(self) -> list[SyncDaemon]: ...


class KnobReader(Protocol):
    def read(self, name: str) -> sysctl_mod.Value: ...


@dataclass(frozen=True)
class ServiceReading:
    service: Service
    dests: tuple[Dest, ...]
    laddrs: tuple[Laddr, ...]


@dataclass(frozen=True)
class Reading:
    services: tuple[ServiceReading, ...]
    ext: Mapping[str, int] | None  # None: stock modules
    daemons: tuple[SyncDaemon, ...]
    knobs: Mapping[str, int] = field(default_factory=dict)  # the KNOBS present
    wall: float = 0.0  # time.time() of the read
    xdp: tuple[DeviceStats, ...] = ()  # the XDP programs of the netns, by device


def _knobs(sysctls: KnobReader) -> dict[str, int]:
    out = {}
    for name in KNOBS:
        with contextlib.suppress(sysctl_mod.SysctlError):
            value = sysctls.read(name)
            if value and isinstance(value[0], int):
                out[name] = value[0]
    return out


def read(connect: Callable[[], Source], sysctls: KnobReader,
         clock: Callable[[], float] = time.time,
         xdp: Callable[[], Iterable[DeviceStats]] = tuple) -> Reading:
    """Raises what netlink raises (IpvsUnavailable, NetlinkError, OSError).
    ``xdp`` gives the XDP programs' counters (``partial(xdp.all_stats, netns)``;
    by default none)."""
    rows = []
    with connect() as k:
        has_laddr = k.supports(netlink.IPVS_CMD_GET_LADDR)
        for svc in k.services():
            try:
                dests = tuple(k.dests(svc))
                laddrs = tuple(k.laddrs(svc)) if has_laddr else ()
            except netlink.ServiceNotFound:  # deleted while we listed
                continue
            rows.append(ServiceReading(svc, dests, laddrs))
        ext = None
        if k.supports(netlink.IPVS_CMD_GET_EXT_STATS):
            with contextlib.suppress(netlink.NotSupported):
                ext = k.ext_stats()
        daemons = tuple(k.daemons())
    return Reading(tuple(rows), ext, daemons, _knobs(sysctls), clock(), tuple(xdp()))


def service_labels(svc: Service) -> dict[str, str]:
    if svc.fwmark:
        return {"vip": f"fwmark:{svc.fwmark}", "port": "0", "protocol": "fwmark"}
    return {"vip": str(svc.addr), "port": str(svc.port), "protocol": svc.protocol.value}


class _Families:
    """One metric family per series, filled by label name."""

    def __init__(self) -> None:
        self.families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        for s in series.ALL:
            cls = CounterMetricFamily if s.kind == "counter" else GaugeMetricFamily
            self.families[s.name] = cls(s.name, s.help, labels=list(s.labels))

    def add(self, name: str, labels: Mapping[str, str], value: float) -> None:
        s = series.BY_NAME[name]
        self.families[name].add_metric([labels[k] for k in s.labels], value)

    def __iter__(self) -> Iterator[Metric]:
        return iter(self.families.values())


def _traffic(f: _Families, prefix: str, labels: Mapping[str, str], st: Stats | None
             ) -> None:
    st = st or Stats()
    f.add(f"ipvs_synproxy_{prefix}_connections_total", labels, st.conns)
    for direction, pkts, octets in (("in", st.inpkts, st.inbytes),
                                    ("out", st.outpkts, st.outbytes)):
        both = {**labels, "direction": direction}
        f.add(f"ipvs_synproxy_{prefix}_packets_total", both, pkts)
        f.add(f"ipvs_synproxy_{prefix}_bytes_total", both, octets)


def _service(f: _Families, row: ServiceReading, lports: int) -> None:
    svc = row.service
    labels = service_labels(svc)
    f.add("ipvs_synproxy_service_info",
          {**labels, "scheduler": svc.scheduler, "syn_proxy": "on" if svc.synproxy else "off"},
          1)
    _traffic(f, "service", labels, svc.stats)
    if svc.sp_stats is not None:
        for ext, (name, extra) in series.SERVICE_EXT.items():
            f.add(name, {**labels, **extra}, svc.sp_stats.get(ext, 0))
    for d in row.dests:
        rs = {**labels, "real_server": str(d.addr), "real_port": str(d.port)}
        f.add("ipvs_synproxy_real_server_weight", rs, d.weight)
        f.add("ipvs_synproxy_real_server_active_connections", rs, d.active_conns)
        f.add("ipvs_synproxy_real_server_inactive_connections", rs, d.inact_conns)
        _traffic(f, "real_server", rs, d.stats)
    for la in row.laddrs:
        ll = {**labels, "laddr": str(la.addr)}
        f.add("ipvs_synproxy_fullnat_lports_used", ll, la.conn_counts)
        f.add("ipvs_synproxy_fullnat_lports_free", ll, max(0, lports - la.conn_counts))
        f.add("ipvs_synproxy_fullnat_lport_conflicts_total", ll, la.port_conflict)


def _netns(f: _Families, r: Reading) -> None:
    # Counters with a per-service twin are left out here: summing the
    # per-service series gives them, and serving both would count twice.
    for ext, value in (r.ext or {}).items():
        if ext in series.NETNS_EXT:
            name, extra = series.NETNS_EXT[ext]
            f.add(name, extra, value)
    period = r.knobs.get("synproxy_secret_period")
    if r.ext is not None and period:
        f.add("ipvs_synproxy_cookie_key_period_seconds", {}, period)
        # The kernel's epoch: ktime_get_real_seconds() / period (cookie.py).
        f.add("ipvs_synproxy_cookie_key_epoch", {}, int(r.wall) // period)
    states = {d.state for d in r.daemons}
    for state in ("master", "backup"):
        f.add("ipvs_synproxy_sync_daemon_running", {"state": state},
              1 if state in states else 0)


def _xdp(f: _Families, devices: Iterable[DeviceStats]) -> None:
    for d in devices:
        f.add("ipvs_synproxy_xdp_attached", {"device": d.dev, "mode": d.mode or "none"},
              1 if d.mode else 0)
        for result, value in d.stats.items():
            f.add("ipvs_synproxy_xdp_packets_total", {"device": d.dev, "result": result},
                  value)


def families(r: Reading, version: str) -> Iterator[Metric]:
    """Every family of :data:`series.ALL` (empty ones included: their HELP and
    TYPE still tell a scraper what this exporter can serve)."""
    f = _Families()
    f.add("ipvs_synproxy_up", {}, 1)
    f.add("ipvs_synproxy_build_info",
          {"version": version, "extensions": "no" if r.ext is None else "yes"}, 1)
    lo = r.knobs.get("fullnat_lport_min", KNOBS["fullnat_lport_min"])
    hi = r.knobs.get("fullnat_lport_max", KNOBS["fullnat_lport_max"])
    lports = max(0, hi - lo + 1)
    for row in r.services:
        _service(f, row, lports)
    _netns(f, r)
    _xdp(f, r.xdp)
    return iter(f)


# What a failed read may raise: no IPVS, a netlink error, no such netns or
# no permission.
READ_ERRORS = (netlink.IpvsUnavailable, netlink.NetlinkError, OSError)


class Collector(_Collector):
    def __init__(self, read: Callable[[], Reading], version: str) -> None:
        self._read = read
        self.version = version

    def collect(self) -> Iterator[Metric]:
        try:
            reading = self._read()
        except READ_ERRORS:
            up = GaugeMetricFamily("ipvs_synproxy_up", series.BY_NAME["ipvs_synproxy_up"].help)
            up.add_metric([], 0)
            yield up
            return
        yield from families(reading, self.version)


def package_version() -> str:
    """The installed package's version; "unknown" from a checkout not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ipvs-synproxy")
    except PackageNotFoundError:
        return "unknown"


def registry(read: Callable[[], Reading], version: str | None = None) -> CollectorRegistry:
    """The exporter's registry; ``version`` labels ipvs_synproxy_build_info
    (default: the package's)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(Collector(read, version or package_version()))
    return reg
