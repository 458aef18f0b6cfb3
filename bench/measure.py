"""One measurement each: a flood's rate and cost, connections, a transfer.

Everything runs in the guest against the standard topology: lb, the client and
the real servers are namespaces of one kernel. veth delivers a frame in the
sender's context, so a flood's path through lb would run on the generator's
vCPU; while a flood's cost is measured, RPS on lb's client-side veth moves it
(and all it sets off: the answer, the real server's part, the client's drop
of the answer) to LB_CPU, whose softirq time is then the balancer's cost.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

from bench.contenders import (
    BASELINE,
    CONN_PORT,
    CONTENDERS,
    NF,
    OURS,
    REF_PORT,
    RS_NAMES,
    STOCK,
    XFER_PORT,
    XFER_REF_PORT,
    Contender,
    add_drop,
    del_drop,
)
from ipvs_synproxy_testbed import netns, topology
from ipvs_synproxy_testbed.flood import Flood
from ipvs_synproxy_testbed.transfer import MB, ConnTiming, connect_once, transfer

CLK_TCK = os.sysconf("SC_CLK_TCK")
# vCPU placement (bench.run pins itself, and so the servers' process, to LEGIT_CPU):
# the flood generator runs on FLOOD_CPU, so the flood's path through lb does too;
# legitimate clients and servers share LEGIT_CPU, so their wake-ups need no
# cross-vCPU interrupt, which a busy host delivers late.
LEGIT_CPU, FLOOD_CPU = 0, 1
# The vCPU that does lb's part of a flood while its cost is measured (RPS).
LB_CPU = LEGIT_CPU
LB_IFACE = "eth0"       # lb's client-side veth


def pin(cpu: int) -> None:
    """Pin the calling thread (and what it starts later) to ``cpu`` if the guest has it."""
    if cpu < (os.cpu_count() or 1):
        os.sched_setaffinity(0, {cpu})


def start_flood(flood: Flood) -> Flood:
    """Start ``flood`` with trafgen on FLOOD_CPU (a child inherits its parent
    thread's CPU mask at fork)."""
    old = os.sched_getaffinity(0)
    pin(FLOOD_CPU)
    try:
        return flood.start()
    finally:
        os.sched_setaffinity(0, old)


def _stat_ticks(name: str) -> list[int]:
    """The tick counters of one /proc/stat line ("cpu": all CPUs, "cpuN": one)."""
    with open("/proc/stat") as f:
        for line in f:
            fields = line.split()
            if fields[0] == name:
                return [int(v) for v in fields[1:]]
    raise KeyError(name)


def cpu_busy_seconds() -> float:
    """CPU seconds the guest spent busy (user, nice, system, irq, softirq; all CPUs)."""
    user, nice, system, _idle, _iowait, irq, softirq = _stat_ticks("cpu")[:7]
    return (user + nice + system + irq + softirq) / CLK_TCK


def softirq_seconds(cpu: int) -> float:
    """Softirq CPU seconds of one vCPU (where a packet's receive path runs)."""
    return _stat_ticks(f"cpu{cpu}")[6] / CLK_TCK


def _rps(mask: int) -> None:
    # /sys/class/net shows a namespace's devices only as ip netns exec mounts it
    path = f"/sys/class/net/{LB_IFACE}/queues/rx-0/rps_cpus"
    subprocess.run(["ip", "netns", "exec", "lb", "sh", "-c", f"echo {mask:x} > {path}"],
                   check=True, capture_output=True, timeout=60)


@contextmanager
def lb_receive_on(cpu: int) -> Iterator[None]:
    """lb's receive path from the client side (and all it triggers) on ``cpu``."""
    _rps(1 << cpu)
    try:
        yield
    finally:
        _rps(0)


def _proc_lines(ns: str, path: str) -> list[str]:
    with netns.netns(ns), open(path) as f:
        return f.read().splitlines()


def _netstat(ns: str, group: str, name: str) -> int:
    lines = _proc_lines(ns, "/proc/net/netstat")
    for head, vals in zip(lines[::2], lines[1::2], strict=False):
        if head.startswith(group + ":"):
            return int(dict(zip(head.split()[1:], vals.split()[1:], strict=True))[name])
    raise KeyError(f"{group}{name}")


def kernel_synacks(c: Contender) -> int:
    """SYN/ACKs the contender's kernel code says it sent (a counter that only grows)."""
    if c.name in OURS:
        for line in _proc_lines("lb", "/proc/net/ip_vs_ext_stats")[1:]:
            parts = line.split()
            if parts[0] == "synproxy_cookie_sent":
                return int(parts[1])
        return 0
    if c.name == NF:
        rows = _proc_lines("lb", "/proc/net/stat/synproxy")[1:]
        return sum(int(r.split()[1], 16) for r in rows if r.strip())  # syn_received
    if c.name == STOCK:
        return sum(_netstat(rs, "TcpExt", "SyncookiesSent") for rs in RS_NAMES)
    return 0


def flood_rate(c: Contender, seconds: float) -> dict[str, Any]:
    """Flood the VIP flat out (one trafgen process on FLOOD_CPU) for ``seconds``
    with lb's part on LB_CPU: its softirq time there is what the flood cost the
    balancer (the run's own Python, trafgen's set-up and the counters' reading
    are process time, not softirq)."""
    with lb_receive_on(LB_CPU):
        k0, cpu0, lb0 = kernel_synacks(c), cpu_busy_seconds(), softirq_seconds(LB_CPU)
        flood = start_flood(Flood("syn", duration=seconds))
        res = flood.wait()
        lb1, cpu1, k1 = softirq_seconds(LB_CPU), cpu_busy_seconds(), kernel_synacks(c)
    return {"sent": res.sent, "seconds": res.seconds, "pps": res.pps,
            "replies": res.replies, "cpu_busy_s": cpu1 - cpu0,
            "lb_softirq_s": lb1 - lb0, "kernel_synacks": k1 - k0}


def merged(parts: list[dict[str, Any]], more: tuple[str, ...] = ()) -> dict[str, Any]:
    """One flood's figures from its pieces: sums (those of ``more`` too),
    replies (None if any piece could not count them), the rate."""
    out = {k: sum(p[k] for p in parts)
           for k in ("sent", "seconds", "cpu_busy_s", "lb_softirq_s", "kernel_synacks", *more)}
    replies = [p["replies"] for p in parts]
    out["replies"] = None if None in replies else sum(replies)
    out["pps"] = out["sent"] / out["seconds"] if out["seconds"] else 0.0
    out["chunks"] = len(parts)
    return out


def flood_costs(c: Contender, seconds: float, chunks: int) -> tuple[dict[str, Any],
                                                                    dict[str, Any]]:
    """The baseline flood (dropped in lb's raw PREROUTING) and ``c``'s flood,
    ``seconds`` each, in ``chunks`` alternating pieces: the host's speed moves
    within seconds (other guests), and alternating lets both meet the same."""
    base, flood = [], []
    for _ in range(chunks):
        add_drop()
        try:
            base.append(flood_rate(CONTENDERS[BASELINE], seconds / chunks))
        finally:
            del_drop()
        flood.append(flood_rate(c, seconds / chunks))
    return merged(base), merged(flood)


# At most this long per set of connections: a contender whose legitimate
# connections stall under a flood gets fewer samples, not an endless run.
CONNECT_BUDGET = 60.0


def connections(n: int, timeout: float, budget: float = CONNECT_BUDGET) -> list[ConnTiming]:
    """Up to ``n`` sequential request/reply connections from the client's own
    address, for at most ``budget`` seconds."""
    out: list[ConnTiming] = []
    deadline = time.monotonic() + budget
    with netns.netns("client"):
        while len(out) < n and time.monotonic() < deadline:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            out.append(connect_once(s, topology.VIP4, CONN_PORT, timeout))
    return out


def timings(ts: list[ConnTiming]) -> dict[str, Any]:
    return {"n": len(ts), "ok": sum(t.ok for t in ts),
            "connect_s": [round(t.connect, 6) for t in ts],
            "total_s": [round(t.total, 6) for t in ts],
            "ok_flags": [t.ok for t in ts],
            "errors": sorted({t.error for t in ts if t.error})[:5]}


def connect_times(n: int, timeout: float) -> dict[str, Any]:
    return timings(connections(n, timeout))


def legit_during_flood(n: int, timeout: float, warmup: float = 0.5) -> dict[str, Any]:
    """``n`` connections while a flat-out flood runs; with the flood's own rate."""
    flood = start_flood(Flood("syn"))
    try:
        time.sleep(warmup)
        ts = connections(n, timeout)
    finally:
        res = flood.stop()
    out = timings(ts)
    out.update({"flood_sent": res.sent, "flood_seconds": res.seconds, "flood_pps": res.pps})
    return out


def conn_rate(seconds: float, timeout: float = 5.0,
              target: tuple[str, int] = (topology.VIP4, CONN_PORT)) -> dict[str, Any]:
    """New connections per second to ``target``, sequential, for ``seconds``."""
    ok = failed = 0
    with netns.netns("client"):
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            if connect_once(s, *target, timeout).ok:
                ok += 1
            else:
                failed += 1
        elapsed = time.monotonic() - t0
    return {"ok": ok, "failed": failed, "seconds": elapsed, "per_s": ok / elapsed}


def conn_rates(seconds: float, chunks: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Connections per second straight to a real server (past IPVS: the host's
    speed of the moment) and through the VIP, ``seconds`` each, alternating
    in ``chunks`` pieces."""
    ref = (topology.RS4[RS_NAMES[0]], REF_PORT)
    parts: dict[str, list[dict[str, Any]]] = {"ref": [], "vip": []}
    for _ in range(chunks):
        parts["ref"].append(conn_rate(seconds / chunks, target=ref))
        parts["vip"].append(conn_rate(seconds / chunks))
    out = []
    for kind in ("ref", "vip"):
        ok = sum(p["ok"] for p in parts[kind])
        elapsed = sum(p["seconds"] for p in parts[kind])
        out.append({"ok": ok, "failed": sum(p["failed"] for p in parts[kind]),
                    "seconds": elapsed, "per_s": ok / elapsed, "chunks": chunks})
    return out[0], out[1]


def throughputs(mb: int, pairs: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Downloads of ``mb`` MB straight from a real server (past IPVS: the host's
    speed of the moment) and through the VIP, alternating, ``pairs`` of each.
    Bytes are not hashed: the rate is the path's."""
    ref = (topology.RS4[RS_NAMES[0]], XFER_REF_PORT)
    secs: dict[str, float] = {"ref": 0.0, "vip": 0.0}
    for _ in range(pairs):
        for kind, (addr, port) in (("ref", ref), ("vip", (topology.VIP4, XFER_PORT))):
            secs[kind] += mb / transfer(addr, port, "download", mb * MB, check=False)
    ref_rec, vip_rec = ({"mb": mb * pairs, "seconds": secs[k], "mb_per_s": mb * pairs / secs[k],
                         "pairs": pairs} for k in ("ref", "vip"))
    return ref_rec, vip_rec


def describe(c: Contender) -> dict[str, Any]:
    d = asdict(c)
    d.pop("_saved", None)
    d["fwd"] = c.fwd.name
    return d
