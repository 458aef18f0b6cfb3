"""Turn a run's raw records into figures, ratios and target checks (on the host).

``python -m bench.report RAW.json --results bench/results --readme README.md``
writes ``bench/results/bench-<started>.json`` (the raw records, the figures and
the host's description), ``bench/results/bench.png`` and the table between the
README's ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` markers, and prints
the table. ``python -m bench.report --compare A.json B.json`` compares the ratios
of two results files.

While a flood's cost is measured, lb's part of it runs on one vCPU (RPS, see
bench.measure). CPU seconds per million SYNs on the balancer = that vCPU's
softirq seconds / SYNs sent x 1e6; SYN/ACKs per second at saturation = SYNs
answered / those seconds (what one vCPU doing only this would answer); the
whole guest's busy seconds per SYN (generator included) are shown too. The
baseline (the flood dropped in lb's raw PREROUTING) shows the part every
contender pays to receive a packet at all. Figures are medians over the
rounds with their range (min-max); ratios are geometric means of the rounds'
own ratios. The port search piece (bench.portsearch) gives one more ratio:
new connections per second with 90% of a FULLNAT service's local ports taken
over the same with none taken. The XDP piece (bench.fastpath) compares, on a
pair of virtio NICs, the XDP program's answer with the module's and with
netfilter SYNPROXY's. A run of only some pieces (``bench.run --only``) leaves
the README alone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.contenders import BASELINE, CONTROL, NF, OURS, STOCK

Record = dict[str, Any]
SHOWN = (*OURS, NF, STOCK, CONTROL)
SHORT = {"ipvs-synproxy-nat": "(a) NAT", "ipvs-synproxy-fullnat": "(a) FULLNAT",
         NF: "(b) nf SYNPROXY", STOCK: "(c) RS cookies", CONTROL: "control"}
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    s = sorted(values)
    if not s:
        return math.nan
    k = max(0, math.ceil(q / 100 * len(s)) - 1)
    return s[k]


def _conn_stats(c: Record, timeout: float) -> dict[str, float]:
    # A failed connection counts as the full timeout in the percentiles.
    conn = [t if ok else timeout for t, ok in zip(c["connect_s"], c["ok_flags"], strict=True)]
    total = [t if ok else timeout for t, ok in zip(c["total_s"], c["ok_flags"], strict=True)]
    return {"ok_pct": 100.0 * c["ok"] / c["n"],
            "p50_ms": 1e3 * percentile(conn, 50), "p99_ms": 1e3 * percentile(conn, 99),
            "req_p99_ms": 1e3 * percentile(total, 99)}


def derive(raw: Record) -> dict[str, list[Record]]:
    """Per contender, one dict of figures per round."""
    timeout = float(raw["params"]["connect_timeout"])
    base = {(r["round"], r["block"]): r for r in raw["records"] if r["contender"] == BASELINE}
    out: dict[str, list[Record]] = {}
    for r in raw["records"]:
        name = r["contender"]
        if name == BASELINE:
            continue
        fig: Record = {"round": r["round"]}
        if "conn_rate" in r:
            fig["conn_per_s"] = r["conn_rate"]["per_s"]
            if r.get("conn_ref", {}).get("per_s"):
                # in units of the direct rate that alternated with it
                fig["conn_norm"] = fig["conn_per_s"] / r["conn_ref"]["per_s"]
            fig["mb_per_s"] = r["throughput"]["mb_per_s"]
            if r.get("xfer_ref", {}).get("mb_per_s"):
                fig["mb_norm"] = fig["mb_per_s"] / r["xfer_ref"]["mb_per_s"]
            nf = _conn_stats(r["connect_noflood"], timeout)
            fig["noflood_p50_ms"], fig["noflood_p99_ms"] = nf["p50_ms"], nf["p99_ms"]
            fig["noflood_req_p99_ms"] = nf["req_p99_ms"]
        if "flood" in r:
            f = r["flood"]
            b = r.get("baseline_flood") or base[(r["round"], r["block"])]["flood"]
            replies = f["replies"] if f["replies"] is not None else f["kernel_synacks"]
            answered = min(replies, f["sent"])
            fig["flood_pps"] = f["pps"]
            fig["answered_pct"] = 100 * answered / f["sent"]
            # the balancer's vCPU: seconds per million SYNs = µs per SYN
            fig["cpu_s_per_msyn"] = 1e6 * f["lb_softirq_s"] / f["sent"]
            fig["baseline_cpu_s_per_msyn"] = 1e6 * b["lb_softirq_s"] / b["sent"]
            fig["synack_per_s"] = (answered / f["lb_softirq_s"] if f["lb_softirq_s"] > 0
                                   else math.inf)
            fig["guest_cpu_s_per_msyn"] = 1e6 * f["cpu_busy_s"] / f["sent"]
        if "connect_flood" in r:
            cf = _conn_stats(r["connect_flood"], timeout)
            fig["legit_ok_pct"] = cf["ok_pct"]
            fig["flood_p50_ms"], fig["flood_p99_ms"] = cf["p50_ms"], cf["p99_ms"]
            fig["flood_req_p99_ms"] = cf["req_p99_ms"]
            fig["legit_flood_pps"] = r["connect_flood"]["flood_pps"]
            fig["p99_vs_noflood"] = fig["flood_p99_ms"] / fig["noflood_p99_ms"]
        out.setdefault(name, []).append(fig)
    return out


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def summarize(per_round: dict[str, list[Record]]) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, figs in per_round.items():
        keys = [k for k in figs[0] if k != "round"]
        out[name] = {k: spread([f[k] for f in figs if k in f]) for k in keys}
    return out


# Metrics compared as ratios (ours over theirs). Connect-time percentiles under a
# flood are not among them: on an overcommitted host they jump between a few ms
# and hundreds of ms from one round to the next (bench/README.md, "Caveats"),
# so they are shown per contender, against the contender's own no-flood figure.
RATIO_METRICS = {
    "synack_per_s": "SYN/ACKs/s at saturation",
    "cpu_s_per_msyn": "CPU s per million SYNs on the balancer",
    "conn_per_s": "new connections/s (no flood)",
    "mb_per_s": "50 MB transfer throughput",
}


# Figures whose ratios come from their form relative to a reference measured
# alternately with them, seconds apart (derive()). Flood figures have none:
# the baseline flood that alternates with each flood varies by as much from
# piece to piece on its own (34 to 52 us per packet within one run), and
# dividing by it made ratios less reproducible over four runs, not more
# (bench/README.md, "Reproducibility").
RATIO_SOURCE = {"conn_per_s": "conn_norm", "mb_per_s": "mb_norm"}


def _geomean(vals: Sequence[float]) -> float:
    # a round where ours did nothing (0) makes the whole ratio 0, not an error
    return 0.0 if min(vals) <= 0 else statistics.geometric_mean(vals)


def ratios(per_round: dict[str, list[Record]]) -> dict[str, float]:
    """Ours over (b) and (c), ``<ours>/<theirs>:<metric>``: the geometric mean
    of the per-round ratios. Both figures of one round were measured minutes
    apart, so the host's slower drift (other guests) divides out, where a ratio
    of each side's medians would keep it. A geometric mean rather than a
    median: it uses every round (a median of five is one round's figure), and
    ours/theirs is exactly 1/(theirs/ours)."""
    out = {}
    for ours in OURS:
        for theirs in (NF, STOCK):
            theirs_by_round = {f["round"]: f for f in per_round.get(theirs, [])}
            for metric in RATIO_METRICS:
                src = RATIO_SOURCE.get(metric, metric)
                vals = []
                for f in per_round.get(ours, []):
                    t = theirs_by_round.get(f["round"])
                    if t is None:
                        continue
                    m = src if src in f and src in t else metric  # older runs: raw
                    if m in f and t.get(m) and math.isfinite(f[m] / t[m]):
                        vals.append(f[m] / t[m])
                if vals:
                    out[f"{ours}/{theirs}:{metric}"] = _geomean(vals)
    return out


def port_search(raw: Record) -> Record | None:
    """The port search piece's rounds and their summary; None if it did not run.
    The ratio is the geometric mean of the rounds' (90% taken)/(none taken)
    connection rates, which alternated seconds apart."""
    recs = raw.get("port_search") or []
    if not recs:
        return None
    rounds = []
    for r in recs:
        ports = r["fill"]["ports"]
        rounds.append({
            "round": r["round"],
            "full_conn_per_s": r["full"]["per_s"], "free_conn_per_s": r["free"]["per_s"],
            "ratio": r["full"]["per_s"] / r["free"]["per_s"] if r["free"]["per_s"] else 0.0,
            "taken_pct": 100 * r["fill"]["taken"] / ports,
            "taken_after_pct": 100 * r["taken_after"] / ports,
            "give_up_per_kconn": 1e3 * r["counters"]["fullnat_lport_give_up"]
            / max(r["full"]["ok"], 1),
            "expired": r["held_for_s"] > r["hold_s"],
        })
    first = recs[0]
    summ = {k: spread([f[k] for f in rounds]) for k in rounds[0]
            if k not in ("round", "expired")}
    return {"window": first["window"], "laddrs": first["laddrs"],
            "taken_share": first["taken_share"], "tries": first["tries"],
            "ratio": _geomean([f["ratio"] for f in rounds]),
            "expired_rounds": sum(f["expired"] for f in rounds),
            "summary": summ, "per_round": rounds}


XDP, MODULE = "ipvs-synproxy-xdp", "ipvs-synproxy-nat"
FASTPATH_PASSES = ("baseline", MODULE, XDP, "baseline_nf", NF)


def _flood_figures(f: Record) -> Record:
    # The answering code's own count where it has one (module: synproxy_cookie_sent,
    # XDP: syn_answered, netfilter: syn_received): with the host's flood the
    # client's NIC may not take every answer the balancer sent.
    counted = f.get("kernel_synacks") or f["replies"] or 0
    answered = min(counted, f["sent"])
    return {"pps": f["pps"], "answered_pct": 100 * answered / f["sent"],
            "cpu_s_per_msyn": 1e6 * f["lb_softirq_s"] / f["sent"],
            "synack_per_s": answered / f["lb_softirq_s"] if f["lb_softirq_s"] > 0 else math.inf,
            "guest_cpu_s_per_msyn": 1e6 * f["cpu_busy_s"] / f["sent"]}


def fastpath(raw: Record) -> Record | None:
    """The XDP piece's rounds and their summary; None if it did not run.
    Ratios are geometric means of the rounds' own ratios, as in the main table:
    XDP over the module alternated seconds apart; XDP over netfilter SYNPROXY
    a minute apart (a module reload in between)."""
    recs = raw.get("fastpath") or []
    if not recs:
        return None
    rounds = []
    for r in recs:
        fig: Record = {"round": r["round"]}
        for name in FASTPATH_PASSES:
            for k, v in _flood_figures(r[name]).items():
                fig[f"{name}:{k}"] = v
        x = r[XDP]
        fig["prog_ns_per_syn"] = x["prog_ns"] / x["prog_runs"] if x["prog_runs"] else 0.0
        fig["legit_ok_pct"] = 100.0 * r["legit_xdp"]["ok"] / r["legit_xdp"]["n"]
        fig["legit_flood_pps"] = r["legit_xdp"]["flood_pps"]
        rounds.append(fig)
    summ = {k: spread([f[k] for f in rounds]) for k in rounds[0] if k != "round"}

    def ratio(metric: str, a: str, b: str) -> float:
        return _geomean([f[f"{a}:{metric}"] / f[f"{b}:{metric}"] for f in rounds])

    rat = {f"xdp/{t}:{m}": ratio(m, XDP, theirs)
           for t, theirs in (("module", MODULE), ("nf", NF))
           for m in ("synack_per_s", "cpu_s_per_msyn")}
    return {"summary": summ, "ratios": rat, "per_round": rounds,
            "generator": recs[0][XDP].get("generator", "trafgen")}


def fastpath_targets(fp: Record) -> list[Record]:
    r, s = fp["ratios"], fp["summary"]
    syn, cpu = r["xdp/module:synack_per_s"], r["xdp/module:cpu_s_per_msyn"]
    ok = s["legit_ok_pct"]["min"]
    return [
        {"target": "(a) + XDP: SYN/ACKs/s at saturation vs the module's (a)", "measured": syn,
         "goal": ">= 3x", "met": syn >= 3, "unit": "x"},
        {"target": "(a) + XDP: CPU per million SYNs vs the module's (a)", "measured": cpu,
         "goal": "<= 0.33x", "met": cpu <= 1 / 3, "unit": "x"},
        {"target": "(a) + XDP: legit connections ok during a flat-out flood (every round)",
         "measured": ok, "goal": "100%", "met": ok >= 100, "unit": "%"},
    ]


def fastpath_lines(fp: Record) -> list[str]:
    s, r = fp["summary"], fp["ratios"]
    names = {"baseline": "baseline (drop in raw)", MODULE: "(a) NAT, module",
             XDP: "(a) + XDP, native", "baseline_nf": "baseline, stock modules",
             NF: "(b) nf SYNPROXY"}
    gen = fp.get("generator", "trafgen")
    lines = ["", "XDP piece, on a pair of virtio NICs, flood from "
             + ("the host (hostflood)" if gen == "host" else "trafgen in the client")
             + " (bench/README.md, \"The XDP piece\"):",
             "", "| | " + " | ".join(names[n] for n in FASTPATH_PASSES) + " |",
             "|---|" + "---:|" * len(FASTPATH_PASSES)]
    for key, label in (("synack_per_s", "SYN/ACKs/s at saturation (one vCPU)"),
                       ("cpu_s_per_msyn", "CPU s per million SYNs on the balancer"),
                       ("pps", "flat-out flood reached, pps"),
                       ("answered_pct", "flood SYNs answered, %")):
        cells = ["-" if n.startswith("baseline") and key in ("synack_per_s", "answered_pct")
                 else _cell(s, f"{n}:{key}") for n in FASTPATH_PASSES]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "(a) + XDP over the module's (a): SYN/ACKs/s"
              f" **{r['xdp/module:synack_per_s']:.2f}x**, CPU per SYN"
              f" **{r['xdp/module:cpu_s_per_msyn']:.2f}x**; over (b): SYN/ACKs/s"
              f" **{r['xdp/nf:synack_per_s']:.2f}x**, CPU per SYN"
              f" **{r['xdp/nf:cpu_s_per_msyn']:.2f}x** (geometric means of"
              f" {s['legit_ok_pct']['n']} rounds). The program itself:"
              f" {_cell(s, 'prog_ns_per_syn')} ns per SYN (kernel BPF statistics). Legit"
              f" connections during a flat-out flood through XDP: {_cell(s, 'legit_ok_pct')}% ok"
              f" at {_cell(s, 'legit_flood_pps')} pps.",
              "", "| target | goal | measured | |", "|---|---|---:|---|"]
    for t in fastpath_targets(fp):
        lines.append(f"| {t['target']} | {t['goal']} | {_fmt(t['measured'])}{t['unit']} | "
                     f"{'met' if t['met'] else '**missed**'} |")
    return lines


def port_search_line(ps: Record) -> str:
    s = ps["summary"]
    line = (f"Port search: new connections/s through a FULLNAT service (no SYN proxy, "
            f"{ps['laddrs']} laddrs x {ps['window']} local ports) with "
            f"{100 * ps['taken_share']:.0f}% of its ports held, over the same with none "
            f"held, alternating: **{ps['ratio']:.2f}** (geometric mean of "
            f"{s['ratio']['n']} rounds; {_cell(s, 'full_conn_per_s')} vs "
            f"{_cell(s, 'free_conn_per_s')} conn/s; ports taken "
            f"{_fmt(s['taken_pct']['median'])}% at the start, "
            f"{_fmt(s['taken_after_pct']['median'])}% at the end; "
            f"`fullnat_lport_give_up` {_cell(s, 'give_up_per_kconn')} per 1000 connections; "
            f"`fullnat_lport_tries` {ps['tries'] if ps['tries'] is not None else 'absent'}).")
    if ps["expired_rounds"]:
        line += (f" In {ps['expired_rounds']} round(s) the measurement outlasted the held "
                 "connections' SYN_RECV timeout.")
    return line


def targets(summary: dict[str, dict[str, dict[str, float]]], mem: dict[str, int],
            rat: dict[str, float]) -> list[Record]:
    """The issue's targets, for each of our two forwarding methods (those a
    partial run measured)."""
    rows: list[Record] = []

    def add(what: str, value: float, goal: str, ok: bool, unit: str = "") -> None:
        rows.append({"target": what, "measured": value, "goal": goal, "met": ok, "unit": unit})

    for ours in OURS:
        if ours not in summary or f"{ours}/{NF}:synack_per_s" not in rat:
            continue
        s, tag = summary[ours], SHORT[ours]
        r = rat[f"{ours}/{NF}:synack_per_s"]
        add(f"{tag}: SYN/ACKs/s at saturation vs (b)", r, ">= 1.5x", r >= 1.5, "x")
        ok = s["legit_ok_pct"]["median"]
        add(f"{tag}: legit success during a flood >= (c)'s saturating rate", ok, ">= 99%",
            ok >= 99, "%")
        p = s["p99_vs_noflood"]["median"]
        add(f"{tag}: p99 connect under flood vs no flood", p, "< 10x", p < 10, "x")
        t = rat[f"{ours}/{STOCK}:mb_per_s"]
        add(f"{tag}: transfer throughput vs stock NAT (c)", t, ">= 0.9x", t >= 0.9, "x")
        c = rat[f"{ours}/{STOCK}:conn_per_s"]
        add(f"{tag}: new connections/s vs stock NAT (c)", c, ">= 0.7x", c >= 0.7, "x")
    if "patched" in mem and "stock" in mem:
        extra = mem["patched"] - mem["stock"]
        add("memory per connection vs stock (struct ip_vs_conn)", extra, "<= +128 B",
            extra <= 128, "B")
    return rows


def _fmt(v: float) -> str:
    if math.isinf(v):
        return "inf"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _cell(s: dict[str, dict[str, float]], key: str) -> str:
    if key not in s:
        return "-"
    d = s[key]
    return f"{_fmt(d['median'])} ({_fmt(d['min'])}..{_fmt(d['max'])})"


ROWS = (
    ("synack_per_s", "SYN/ACKs/s at saturation (one vCPU)"),
    ("flood_pps", "flat-out flood reached, pps"),
    ("cpu_s_per_msyn", "CPU s per million SYNs on the balancer (its vCPU)"),
    ("baseline_cpu_s_per_msyn", "the same for the baseline (received, dropped in raw)"),
    ("guest_cpu_s_per_msyn", "CPU s per million SYNs, whole guest (generator included)"),
    ("answered_pct", "flood SYNs answered, %"),
    ("legit_ok_pct", "legit connections ok under flood, %"),
    ("legit_flood_pps", "flood rate during those, pps"),
    ("flood_p50_ms", "connect p50 under flood, ms"),
    ("flood_p99_ms", "connect p99 under flood, ms"),
    ("noflood_p99_ms", "connect p99 without flood, ms"),
    ("flood_req_p99_ms", "request p99 under flood, ms"),
    ("noflood_req_p99_ms", "request p99 without flood, ms"),
    ("conn_per_s", "new connections/s, no flood"),
    ("mb_per_s", "50 MB download, MB/s"),
)


def markdown(res: Record) -> str:
    summ, host = res["summary"], res["host"]
    lines = [
        f"Latest run: {res['run']['started'][:10]}, `make bench` on {host['description']}; "
        f"{res['run']['params']['rounds']} interleaved rounds, median (min..max); "
        f"the guest's part took {res['run']['seconds'] / 60:.0f} min, host load average "
        f"{host['loadavg'][2]:.1f} (15 min) when it ended.",
    ]
    if any(n in summ for n in SHOWN):
        lines += _contender_tables(res)
    if res.get("port_search"):
        lines += ["", port_search_line(res["port_search"])]
    if res.get("fastpath"):
        lines += fastpath_lines(res["fastpath"])
    return "\n".join(lines) + "\n"


def _contender_tables(res: Record) -> list[str]:
    summ, rat = res["summary"], res["ratios"]
    cols = [n for n in SHOWN if n in summ]
    lines = [
        "",
        "| | " + " | ".join(SHORT[c] for c in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for key, label in ROWS:
        lines.append(f"| {label} | " + " | ".join(_cell(summ[c], key) for c in cols) + " |")
    mem = res["run"]["conn_object_size"]
    lines.append("| bytes per connection (ip_vs_conn) | "
                 + " | ".join(str(mem.get("patched" if c in (*OURS, CONTROL) else "stock", "-"))
                              for c in cols) + " |")
    lines += ["", "| ratio (geometric mean of rounds) | (a) NAT / (b) | (a) NAT / (c) "
              "| (a) FULLNAT / (b) | (a) FULLNAT / (c) |", "|---|---:|---:|---:|---:|"]
    for m, label in RATIO_METRICS.items():
        vals = [rat.get(f"{o}/{t}:{m}") for o in OURS for t in (NF, STOCK)]
        lines.append(f"| {label} | " + " | ".join("-" if v is None else f"{v:.2f}"
                                                for v in vals) + " |")
    lines += ["", "| target | goal | measured | |", "|---|---|---:|---|"]
    for t in res["targets"]:
        lines.append(f"| {t['target']} | {t['goal']} | {_fmt(t['measured'])}{t['unit']} | "
                     f"{'met' if t['met'] else '**missed**'} |")
    return lines


def host_description(guest_kernel: str = "?") -> Record:
    model = "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        m = re.search(r"^Model name:\s*(.+)$", out, re.M)
        model = m.group(1).strip() if m else model
    except OSError:
        pass
    n = os.cpu_count() or 0
    desc = (f"a 2-vCPU QEMU TCG guest (Debian kernel {guest_kernel}, software emulation) "
            f"on a {n}-core {model} host")
    return {"cpus": n, "cpu_model": model, "platform": platform.platform(),
            "loadavg": os.getloadavg(), "description": desc}


def analyse(raw: Record) -> Record:
    per_round = derive(raw)
    summ = summarize(per_round)
    rat = ratios(per_round)
    return {"summary": summ, "ratios": rat,
            "targets": targets(summ, raw["conn_object_size"], rat), "per_round": per_round,
            "port_search": port_search(raw), "fastpath": fastpath(raw)}


def plot(res: Record, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = res["summary"]
    panels = [("synack_per_s", "SYN/ACKs/s at saturation"),
              ("cpu_s_per_msyn", "CPU s per million SYNs, balancer"),
              ("flood_p99_ms", "connect p99 under flood, ms"),
              ("conn_per_s", "new connections/s"),
              ("mb_per_s", "50 MB download, MB/s")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
    for ax, (key, title) in zip(axes, panels, strict=True):
        names = [n for n in SHOWN if key in summ.get(n, {})]
        med = [summ[n][key]["median"] for n in names]
        lo = [m - summ[n][key]["min"] for n, m in zip(names, med, strict=True)]
        hi = [summ[n][key]["max"] - m for n, m in zip(names, med, strict=True)]
        colors = ["tab:blue" if n in OURS else "tab:gray" if n == CONTROL else "tab:orange"
                  for n in names]
        ax.bar(range(len(names)), med, yerr=[lo, hi], capsize=4, color=colors)
        ax.set_xticks(range(len(names)), [SHORT[n] for n in names], rotation=30, ha="right",
                      fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"ipvs-synproxy benchmarks, {res['run']['started'][:10]} "
                 f"(median, min..max over {res['run']['params']['rounds']} rounds)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def update_readme(readme: Path, table: str, png: str) -> None:
    text = readme.read_text()
    block = f"{BEGIN}\n{table}\n![benchmark plot]({png})\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n## Benchmarks\n\n" + block + "\n"
    readme.write_text(text)


def compare(a: Record, b: Record, tolerance: float = 0.2) -> tuple[bool, list[str]]:
    """Do two results agree on every ratio within ``tolerance``? A ratio that
    only one of them has is a disagreement too (a contender went missing); the
    port search's ratio is compared when both have it (results from before it
    existed have none)."""
    ok, lines = True, []
    ra, rb = dict(a["ratios"]), dict(b["ratios"])
    pa, pb = a.get("port_search"), b.get("port_search")
    if pa and pb:
        ra["port-search:conn_per_s"], rb["port-search:conn_per_s"] = pa["ratio"], pb["ratio"]
    elif pa or pb:
        lines.append("SKIP port-search:conn_per_s: only in one of the runs")
    fa, fb = a.get("fastpath"), b.get("fastpath")
    if fa and fb:
        ra.update({f"xdp-piece:{k}": v for k, v in fa["ratios"].items()})
        rb.update({f"xdp-piece:{k}": v for k, v in fb["ratios"].items()})
    elif fa or fb:
        lines.append("SKIP xdp-piece: only in one of the runs")
    for key in sorted(set(ra) | set(rb)):
        x, y = ra.get(key), rb.get(key)
        if x is None or y is None:
            ok = False
            lines.append(f"MISS {key}: {x} vs {y}")
            continue
        rel = abs(x / y - 1) if y else (0.0 if x == y else math.inf)
        good = rel <= tolerance
        ok &= good
        lines.append(f"{'ok  ' if good else 'DIFF'} {key}: {x:.2f} vs {y:.2f} "
                     f"({100 * rel:.0f}%)")
    return ok, lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.report", description=__doc__.splitlines()[0])
    p.add_argument("raw", type=Path, nargs="?",
                   help="bench.run's raw records (make bench: build/bench/run.json)")
    p.add_argument("--results", type=Path, default=Path("bench/results"),
                   help="where bench-<start time>.json and bench.png go (default: %(default)s)")
    p.add_argument("--readme", type=Path,
                   help="a README whose bench:begin/bench:end table to replace")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"),
                   help="two results files: does every ratio agree within 20%%?")
    args = p.parse_args(argv)
    if args.compare:
        a, b = (json.loads(f.read_text()) for f in args.compare)
        ok, lines = compare(a, b)
        print("\n".join(lines))
        print("every ratio within 20%" if ok else "some ratios differ by more than 20%")
        return 0 if ok else 1
    if args.raw is None:
        p.error("a raw run file is needed")
    raw = json.loads(args.raw.read_text())
    res: Record = {"run": {k: v for k, v in raw.items() if k != "records"},
                   "host": host_description(raw.get("guest", {}).get("kernel", "?")),
                   **analyse(raw), "records": raw["records"]}
    args.results.mkdir(parents=True, exist_ok=True)
    stamp = raw["started"].replace("-", "").replace(":", "")
    out = args.results / f"bench-{stamp}.json"
    # Readable figures; the raw records (thousands of samples) one line each.
    head = json.dumps({**res, "records": None}, indent=1)
    records = ",\n  ".join(json.dumps(r, separators=(",", ":")) for r in res["records"])
    out.write_text(head.replace('"records": null', f'"records": [\n  {records}\n ]') + "\n")
    png = args.results / "bench.png"
    partial = raw["params"].get("only") is not None
    if res["summary"]:
        plot(res, png)
    table = markdown(res)
    if args.readme and partial:
        print(f"a partial run (--only {raw['params']['only']}): {args.readme} left alone")
    elif args.readme:
        update_readme(args.readme, table, os.path.relpath(png, args.readme.parent))
    print(table)
    print(f"results: {out}" + (f", plot: {png}" if res["summary"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
