"""The benchmark run, inside the testbed guest: ``python -m bench.run --out FILE``.

Rounds of two blocks: [control, (a) NAT, (a) FULLNAT] on the patched modules
and [(b), (c)] on the distribution's modules; the blocks swap
order every round and so does the order of the contenders within each block. The
modules are reloaded and the real servers' listeners restarted before each
measurement (an empty connection table, no half-open requests left over).
Each contender, in order: connect times without a flood, connections per
second, one bulk download, the baseline flood (dropped in lb's raw PREROUTING)
and then a flat-out flood of the contender, each with its rate and its cost on
the balancer's vCPU (bench.measure.flood_rate), connect times during a flat-out
flood. The control (patched modules, proxy
off) has no flood. Each round ends with the port search piece
(bench.portsearch: new connections through a FULLNAT service whose local ports
are 90% taken, against one whose ports are free). ``--only`` runs just the
contenders or just the port search. The raw records go to the
output file (JSON); ``bench.report`` turns them into figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import fastpath, measure, portsearch
from bench.contenders import (
    BASELINE,
    CONN_PORT,
    CONTENDERS,
    CONTROL,
    NF,
    OURS,
    REF_PORT,
    RS_NAMES,
    STOCK,
    XFER_PORT,
    XFER_REF_PORT,
    conn_object_size,
    load_ipvs,
    unload_ipvs,
)
from ipvs_synproxy_testbed import topology
from ipvs_synproxy_testbed.transfer import ServerProcess
from ipvs_synproxy_testbed.vm import stop_requested

# The contenders of each module set (their order alternates by round).
BLOCKS = (("patched", (CONTROL, *OURS)), ("stock", (NF, STOCK)))


def log(msg: str) -> None:
    print(f"bench {time.strftime('%H:%M:%S')} {msg}", flush=True)


class Servers:
    """ConnServer on ports 80 and 81 and BlobServer on 8080 and 8081 (81 and 8081
    for the direct references) in each real server, and the port search's
    ConnServers in rs1, in a child process (not sharing this one's GIL with the
    clients). Restarted for every measurement: closing a listener drops its
    queue of half-open requests."""

    def __init__(self) -> None:
        self._proc: ServerProcess | None = None

    def restart(self) -> None:
        self.close()
        self._proc = ServerProcess(
            [f"{kind}:{rs}:{topology.RS4[rs]}:{port}" for rs in RS_NAMES
             for kind, port in (("conn", CONN_PORT), ("conn", REF_PORT),
                                ("blob", XFER_PORT), ("blob", XFER_REF_PORT))]
            + portsearch.server_specs())

    def close(self) -> None:
        if self._proc is not None:
            self._proc.close()
            self._proc = None


def measure_contender(name: str, args: argparse.Namespace) -> dict[str, Any]:
    c = CONTENDERS[name]
    rec: dict[str, Any] = {"contender": name}
    c.setup()
    try:
        if name != BASELINE:
            rec["connect_noflood"] = measure.connect_times(args.legit, args.connect_timeout)
            rec["conn_ref"], rec["conn_rate"] = measure.conn_rates(args.conn_seconds,
                                                                   args.conn_chunks)
            rec["xfer_ref"], rec["throughput"] = measure.throughputs(args.xfer_mb,
                                                                     args.xfer_pairs)
        if c.flood:
            rec["baseline_flood"], rec["flood"] = measure.flood_costs(
                c, args.flood_seconds, args.flood_chunks)
        if name != BASELINE and c.flood:
            rec["connect_flood"] = measure.legit_during_flood(args.legit, args.connect_timeout)
    finally:
        c.teardown()
    return rec


def port_search_line(rec: dict[str, Any]) -> str:
    fill = rec["fill"]
    return (f"port search: {rec['full']['per_s']:.0f} conn/s with {fill['taken']}/{fill['ports']}"
            f" ports taken ({rec['taken_after']} after), {rec['free']['per_s']:.0f} conn/s"
            f" with none; fullnat_lport_give_up +{rec['counters']['fullnat_lport_give_up']},"
            f" held for {rec['held_for_s']:.0f} s")


def fastpath_line(rec: dict[str, Any]) -> str:
    parts = []
    for name in ("baseline", fastpath.MODULE, fastpath.XDP, "baseline_nf", NF):
        f = rec[name]
        parts.append(f"{name} {f['pps']:.0f} pps {1e6 * f['lb_softirq_s'] / f['sent']:.1f} us/SYN"
                     f" replies {f['replies']}/{f['sent']}")
    x = rec[fastpath.XDP]
    lx = rec["legit_xdp"]
    return (f"xdp piece: {'; '.join(parts)}; program {x['prog_ns'] / max(x['prog_runs'], 1):.0f}"
            f" ns/run; legit under flood through XDP {lx['ok']}/{lx['n']}")


def summary_line(rec: dict[str, Any]) -> str:
    s = str(rec["contender"]) + ":"
    if "flood" in rec:
        f = rec["flood"]
        b = rec["baseline_flood"]
        s += (f" baseline {b['pps']:.0f} pps {1e6 * b['lb_softirq_s'] / b['sent']:.1f} us/SYN,"
              f" flood {f['pps']:.0f} pps {1e6 * f['lb_softirq_s'] / f['sent']:.1f} us/SYN, "
              f"replies {f['replies']}/{f['sent']}, cpu {f['cpu_busy_s']:.2f} s;")
    if "conn_rate" in rec:
        s += (f" {rec['conn_rate']['per_s']:.0f} conn/s"
              f" (direct {rec['conn_ref']['per_s']:.0f}),"
              f" {rec['throughput']['mb_per_s']:.1f} MB/s"
              f" (direct {rec['xfer_ref']['mb_per_s']:.1f})")
    if "connect_flood" in rec:
        cf = rec["connect_flood"]
        s += f", legit under flood {cf['ok']}/{cf['n']} at {cf['flood_pps']:.0f} pps"
    return s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.run", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--flood-seconds", type=float, default=6.0,
                   help="per contender, and as long for its baseline")
    p.add_argument("--flood-chunks", type=int, default=3,
                   help="alternating pieces of baseline and contender flood")
    p.add_argument("--legit", type=int, default=200, help="connections per connect-time set")
    p.add_argument("--connect-timeout", type=float, default=5.0)
    p.add_argument("--conn-seconds", type=float, default=3.0,
                   help="per contender, and as long straight to a real server")
    p.add_argument("--conn-chunks", type=int, default=3,
                   help="alternating pieces of those two")
    p.add_argument("--xfer-mb", type=int, default=50, help="MB per download")
    p.add_argument("--xfer-pairs", type=int, default=3,
                   help="downloads through the VIP, alternating with as many straight"
                   " from a real server")
    p.add_argument("--host-flood", action="store_true",
                   help="the XDP piece's floods from the host (vm exec --nic-pair), not"
                   " trafgen: see bench/README.md, \"The XDP piece\", for why not by default")
    p.add_argument("--only", choices=("contenders", "port-search", "xdp"),
                   help="run only these pieces (default: both; a partial run leaves the"
                   " README's table alone)")
    args = p.parse_args(argv)

    if os.environ.get("IPVS_SP_GUEST") != "1" or os.environ.get("IPVS_SP_TOPOLOGY") != "1":
        print("bench.run runs in the testbed guest: ipvs-synproxy vm exec --topology -- "
              "python -m bench.run ...", file=sys.stderr)
        return 2
    started = time.time()
    out: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "guest": {"kernel": platform.release(), "cpus": os.cpu_count(),
                  "cpu_model": _cpu_model()},
        "params": {k: v for k, v in vars(args).items() if k != "out"},
        "contenders": {n: measure.describe(c) for n, c in CONTENDERS.items()},
        "conn_object_size": {},
        "records": [],
        "port_search": [],
        "fastpath": [],
    }
    nic_pair = fastpath.have_nic_pair()
    fastpath.HOST_FLOOD["on"] = args.host_flood
    if args.only in (None, "xdp") and not nic_pair:
        log("the XDP piece needs the NIC pair (vm exec --nic-pair): skipped")
    measure.pin(measure.LEGIT_CPU)
    servers = Servers()
    try:
        for rnd in range(args.rounds):
            blocks: Sequence[tuple[str, tuple[str, ...]]] = (
                () if args.only not in (None, "contenders")
                else BLOCKS if rnd % 2 == 0 else BLOCKS[::-1])
            for kind, names in blocks:
                order = names if rnd % 2 == 0 else names[::-1]
                for name in order:
                    if stop_requested():
                        log("stop requested")
                        return 130
                    # Fresh modules (an empty connection table) and fresh listeners
                    # (no half-open requests left) for every contender.
                    load_ipvs(kind)
                    out["conn_object_size"][kind] = conn_object_size()
                    servers.restart()
                    rec = measure_contender(name, args)
                    rec.update({"round": rnd, "block": kind})
                    out["records"].append(rec)
                    log(f"round {rnd} {summary_line(rec)}")
                    _save(args.out, out)
            if args.only in (None, "port-search"):
                if stop_requested():
                    log("stop requested")
                    return 130
                load_ipvs("patched")
                out["conn_object_size"]["patched"] = conn_object_size()
                servers.restart()
                ps = portsearch.measure_port_search(args.conn_seconds, args.conn_chunks)
                ps["round"] = rnd
                out["port_search"].append(ps)
                log(f"round {rnd} {port_search_line(ps)}")
                _save(args.out, out)
            if args.only in (None, "xdp") and nic_pair:
                if stop_requested():
                    log("stop requested")
                    return 130
                servers.restart()
                fp = fastpath.measure_fastpath(args.flood_seconds, args.flood_chunks,
                                               args.legit, args.connect_timeout)
                fp["round"] = rnd
                out["fastpath"].append(fp)
                log(f"round {rnd} {fastpath_line(fp)}")
                _save(args.out, out)
    finally:
        servers.close()
        unload_ipvs()
    out["seconds"] = round(time.time() - started, 1)
    args.out.write_text(json.dumps(out, indent=1))
    log(f"done in {out['seconds']:.0f} s: {args.out}")
    return 0


def _save(path: Path, out: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "?"


if __name__ == "__main__":
    sys.exit(main())
