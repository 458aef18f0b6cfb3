"""Counters: per-service and per-real-server statistics and the extended counters.

A :class:`Snapshot` is what the kernel reports at one moment (through
:mod:`netlink`): every service and real server with its cumulative counters
and the kernel's own 2-second rate estimates, plus the extended counters of
the ipvs-synproxy modules (``/proc/net/ip_vs_ext_stats``) when they are
loaded, and the counters of the XDP programs attached in the namespace
(:func:`ipvs_synproxy.kernel.xdp.all_stats`, per device). :func:`ext_rates`
and :func:`xdp_rates` turn two snapshots into per-second rates; the
formatting functions are pure, for the CLI and tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from ipvs_synproxy.kernel import netlink
from ipvs_synproxy.kernel.model import Dest, Service, Stats
from ipvs_synproxy.kernel.xdp import DeviceStats, all_stats


@dataclass(frozen=True)
class ServiceStats:
    service: Service
    dests: tuple[Dest, ...]


@dataclass(frozen=True)
class Snapshot:
    time: float  # time.monotonic() when taken
    wall: float  # time.time()
    services: tuple[ServiceStats, ...]
    ext: Mapping[str, int] | None  # None: not available (stock modules)
    xdp: tuple[DeviceStats, ...] = ()  # the XDP programs of the netns, by device


# device -> counter -> per second
XdpRates = dict[str, dict[str, float]]
XdpReader = Callable[[str | None], Sequence[DeviceStats]]


def snapshot(ipvs: netlink.IPVS, xdp_read: XdpReader | None = None) -> Snapshot:
    """Everything ``ipvs`` reports, and the counters of the XDP programs of its
    namespace (``xdp_read``, by default :func:`~ipvs_synproxy.kernel.xdp.all_stats`)."""
    services = []
    for svc in ipvs.services():
        try:
            dests = tuple(ipvs.dests(svc))
        except netlink.ServiceNotFound:  # deleted while we listed
            continue
        services.append(ServiceStats(svc, dests))
    ext = None
    if ipvs.supports(netlink.IPVS_CMD_GET_EXT_STATS):
        try:
            ext = ipvs.ext_stats()
        except netlink.NotSupported:
            ext = None
    devices = tuple((xdp_read or all_stats)(ipvs.netns))
    return Snapshot(time.monotonic(), time.time(), tuple(services), ext, devices)


def ext_rates(prev: Snapshot, cur: Snapshot) -> dict[str, float] | None:
    """Per-second increase of each extended counter between two snapshots."""
    if prev.ext is None or cur.ext is None:
        return None
    dt = cur.time - prev.time
    if dt <= 0:
        return None
    return {k: max(0, v - prev.ext.get(k, v)) / dt for k, v in cur.ext.items()}


def xdp_rates(prev: Snapshot, cur: Snapshot) -> XdpRates | None:
    """Per-second increase of each XDP counter, per device, between two
    snapshots (a device attached since counts from 0 on; a re-attach that
    started its counters again shows 0)."""
    dt = cur.time - prev.time
    if dt <= 0:
        return None
    old = {d.dev: d.stats for d in prev.xdp}
    return {d.dev: {k: max(0, v - old.get(d.dev, {}).get(k, 0)) / dt
                    for k, v in d.stats.items()} for d in cur.xdp}


_STATS_FIELDS = [f.name for f in fields(Stats)]


def _stats_dict(s: Stats | None) -> dict[str, int]:
    s = s or Stats()
    return {name: getattr(s, name) for name in _STATS_FIELDS}


def to_json(snap: Snapshot, rates: Mapping[str, float] | None = None,
            xrates: XdpRates | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"time": snap.wall, "services": []}
    for st in snap.services:
        svc = st.service
        out["services"].append({
            "service": str(svc),
            "scheduler": svc.scheduler,
            "synproxy": svc.synproxy,
            "stats": _stats_dict(svc.stats),
            "real_servers": [{
                "addr": str(d.addr), "port": d.port, "forward": d.fwd.name.lower(),
                "weight": d.weight, "active_conns": d.active_conns,
                "inact_conns": d.inact_conns, "persist_conns": d.persist_conns,
                "stats": _stats_dict(d.stats),
            } for d in st.dests],
        })
    out["ext_stats"] = dict(snap.ext) if snap.ext is not None else None
    if rates is not None:
        out["ext_rates"] = {k: round(v, 3) for k, v in rates.items()}
    out["xdp"] = [_xdp_json(d, xrates) for d in snap.xdp]
    return out


def _xdp_json(d: DeviceStats, xrates: XdpRates | None) -> dict[str, Any]:
    out: dict[str, Any] = {"device": d.dev, "mode": d.mode, "counters": dict(d.stats)}
    if xrates is not None:
        out["rates"] = {k: round(v, 3) for k, v in xrates.get(d.dev, {}).items()}
    return out


def human(n: float) -> str:
    """9999 -> 9999, 12345 -> 12.3K, 1234567 -> 1.2M, 4.5e10 -> 45.0G."""
    for unit, size, start in (("G", 1e9, 1e9), ("M", 1e6, 1e6), ("K", 1e3, 1e4)):
        if abs(n) >= start:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.1f}"


_HEAD = ("Service / real server", "Conns", "InPkts", "OutPkts", "InBytes", "OutBytes",
         "CPS", "InPPS", "OutPPS", "InBPS", "OutBPS", "ActConn", "InActConn")


def _row(name: str, s: Stats | None, act: str, inact: str, exact: bool
         ) -> tuple[str, ...]:
    s = s or Stats()
    fmt = str if exact else human
    return (name, *(fmt(getattr(s, f)) for f in
                    ("conns", "inpkts", "outpkts", "inbytes", "outbytes", "cps", "inpps",
                     "outpps", "inbps", "outbps")), act, inact)


def format_table(snap: Snapshot, rates: Mapping[str, float] | None = None,
                 exact: bool = False, xrates: XdpRates | None = None) -> Iterator[str]:
    """The human view: one row per service and real server (``exact``: full
    numbers instead of K/M/G), then the extended counters (with per-second
    rates when ``rates`` is given), then each attached XDP program's counters
    (with per-second rates when ``xrates`` is given; nothing when none is)."""
    yield from _format_services(snap, exact)
    yield ""
    if snap.ext is None:
        yield "extended counters: not available (stock IPVS modules)"
    else:
        yield from format_ext(snap.ext, rates)
    for d in snap.xdp:
        yield ""
        yield from format_xdp(d, None if xrates is None else xrates.get(d.dev, {}))


def _format_services(snap: Snapshot, exact: bool) -> Iterator[str]:
    rows: list[tuple[str, ...]] = [_HEAD]
    for st in snap.services:
        svc = st.service
        flags = " synproxy" if svc.synproxy else ""
        rows.append(_row(f"{svc.protocol.value.upper() if not svc.fwmark else 'FWM'} "
                         f"{_svc_name(svc)} {svc.scheduler}{flags}", svc.stats,
                         str(sum(d.active_conns for d in st.dests)),
                         str(sum(d.inact_conns for d in st.dests)), exact))
        for d in st.dests:
            rows.append(_row(f"  -> {d} {d.fwd.name.lower()} w{d.weight}", d.stats,
                             str(d.active_conns), str(d.inact_conns), exact))
    if len(rows) == 1:
        yield "no services"
    else:
        widths = [max(len(r[i]) for r in rows) for i in range(len(_HEAD))]
        for r in rows:
            yield "  ".join([r[0].ljust(widths[0])] +
                            [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
                            ).rstrip()


def _svc_name(svc: Service) -> str:
    return str(svc).rsplit("/", 1)[0] if not svc.fwmark else str(svc.fwmark)


def format_ext(ext: Mapping[str, int], rates: Mapping[str, float] | None = None
               ) -> Iterator[str]:
    width = max([len("Extended counter"), *(len(k) for k in ext)])
    head = f"{'Extended counter'.ljust(width)}  {'Total':>14}"
    yield head + (f"  {'Per second':>10}" if rates is not None else "")
    for name in ext:
        line = f"{name.ljust(width)}  {ext[name]:>14}"
        if rates is not None:
            line += f"  {rates.get(name, 0.0):>10.1f}"
        yield line


def format_xdp(d: DeviceStats, rates: Mapping[str, float] | None = None
               ) -> Iterator[str]:
    """One XDP program's counters under a head naming its device and mode."""
    title = f"XDP on {d.dev} ({d.mode or 'not attached'})"
    width = max([len(title), *(len(k) for k in d.stats)])
    yield f"{title.ljust(width)}  {'Total':>14}" + (f"  {'Per second':>10}"
                                                     if rates is not None else "")
    for name, value in d.stats.items():
        line = f"{name.ljust(width)}  {value:>14}"
        if rates is not None:
            line += f"  {rates.get(name, 0.0):>10.1f}"
        yield line
