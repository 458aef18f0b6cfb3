"""bench.report: figures, ratios, targets and the README block from raw records."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from bench import report
from bench.contenders import BASELINE, CONTROL, NF, OURS, STOCK


def _conns(ms: float, n: int = 100, failed: int = 0) -> dict[str, Any]:
    ok = [i >= failed for i in range(n)]
    return {"n": n, "ok": n - failed, "connect_s": [ms / 1e3] * n,
            "total_s": [2 * ms / 1e3] * n, "ok_flags": ok, "errors": []}


def _flood(pps: float, cpu_per_syn: float, answered: float = 1.0,
           lb_per_syn: float | None = None) -> dict[str, Any]:
    """lb_per_syn: softirq seconds per SYN on lb's vCPU (default: 1/pps, saturated)."""
    sent = int(pps * 4)
    lb = 1 / pps if lb_per_syn is None else lb_per_syn
    return {"sent": sent, "seconds": 4.0, "pps": pps, "replies": int(sent * answered),
            "cpu_busy_s": cpu_per_syn * sent, "lb_softirq_s": lb * sent, "kernel_synacks": 0}


def _rec(name: str, rnd: int, block: str, pps: float | None, conn_s: float = 300,
         mb_s: float = 100, flood_ms: float = 1.0) -> dict[str, Any]:
    r: dict[str, Any] = {"contender": name, "round": rnd, "block": block}
    if pps is not None:
        # cost per SYN in the CPU figure mirrors the rate
        r["flood"] = _flood(pps, 1 / pps)
    if name != BASELINE:
        r["connect_noflood"] = _conns(1.0)
        r["conn_rate"] = {"per_s": conn_s}
        r["throughput"] = {"mb_per_s": mb_s}
        if pps is not None:
            r["baseline_flood"] = _flood(40000, 1 / 40000)
            r["connect_flood"] = {**_conns(flood_ms), "flood_pps": pps}
    return r


def raw_run(scale: float = 1.0, patched_conn_size: int = 464) -> dict[str, Any]:
    """A synthetic run; patched_conn_size is the patched modules' ip_vs_conn
    object size (464 was the series before the handshake state moved out)."""
    recs = []
    for rnd in range(3):
        for block, names in (("patched", (CONTROL, *OURS)), ("stock", (NF, STOCK))):
            recs.append(_rec(BASELINE, rnd, block, 40000))
            for n in names:
                pps = {CONTROL: None, NF: 20000, STOCK: 10000}.get(n, 30000 * scale)
                recs.append(_rec(n, rnd, block, pps, conn_s=300 if n in OURS else 280))
    return {"started": "2026-11-22T03:00:00Z", "seconds": 600.0,
            "params": {"connect_timeout": 5.0, "rounds": 3},
            "conn_object_size": {"patched": patched_conn_size, "stock": 288},
            "records": recs}


def test_percentile_is_nearest_rank() -> None:
    vals = list(range(1, 101))
    assert report.percentile(vals, 50) == 50
    assert report.percentile(vals, 99) == 99
    assert report.percentile([3.0], 99) == 3.0


def test_per_syn_cost_is_the_balancer_vcpus_softirq_time() -> None:
    res = report.analyse(raw_run())
    s = res["summary"]
    # lb's vCPU saturated at 30000 pps: 33.3 us per SYN -> 30000 SYN/ACKs/s
    assert s[OURS[0]]["cpu_s_per_msyn"]["median"] == pytest.approx(33.333, rel=1e-3)
    assert s[OURS[0]]["synack_per_s"]["median"] == pytest.approx(30000, rel=1e-3)
    assert s[NF]["synack_per_s"]["median"] == pytest.approx(20000, rel=1e-3)
    assert s[OURS[0]]["baseline_cpu_s_per_msyn"]["median"] == pytest.approx(25.0, rel=1e-3)
    # the whole guest's busy time per SYN, nothing subtracted
    assert s[OURS[0]]["guest_cpu_s_per_msyn"]["median"] == pytest.approx(33.333, rel=1e-3)
    assert res["ratios"][f"{OURS[0]}/{NF}:synack_per_s"] == pytest.approx(1.5, rel=1e-3)
    assert "synack_per_s" not in s[CONTROL]


def test_a_balancer_faster_than_the_generator_is_rated_by_its_own_time() -> None:
    raw = raw_run()
    for r in raw["records"]:
        if r["contender"] == OURS[0]:
            # the generator's 30000 pps kept lb's vCPU busy half the time
            r["flood"] = _flood(30000, 1 / 30000, lb_per_syn=0.5 / 30000)
    s = report.analyse(raw)["summary"]
    assert s[OURS[0]]["synack_per_s"]["median"] == pytest.approx(60000, rel=1e-3)
    assert s[OURS[0]]["answered_pct"]["median"] == pytest.approx(100)


def test_failed_connections_count_as_the_timeout() -> None:
    stats = report._conn_stats(_conns(1.0, n=100, failed=2), timeout=5.0)
    assert stats["ok_pct"] == 98
    assert stats["p50_ms"] == pytest.approx(1.0)
    assert stats["p99_ms"] == pytest.approx(5000.0)


@pytest.mark.parametrize(("patched", "extra", "met"), [(464, 176, False), (384, 96, True)])
def test_targets_name_what_is_missed(patched: int, extra: int, met: bool) -> None:
    res = report.analyse(raw_run(patched_conn_size=patched))
    by_name = {t["target"]: t for t in res["targets"]}
    mem = by_name["memory per connection vs stock (struct ip_vs_conn)"]
    assert mem["measured"] == extra and mem["met"] == met
    assert all(t["met"] for t in res["targets"] if t is not mem)


def test_flood_ratios_come_from_the_floods_themselves_not_their_baseline() -> None:
    raw = raw_run()
    for r in raw["records"]:
        if r["contender"] == NF:
            r["flood"] = _flood(10000, 2 / 20000)
            # a baseline piece that ran slow on its own moves nothing
            r["baseline_flood"] = _flood(20000, 2 / 40000)
    res = report.analyse(raw)
    assert res["summary"][NF]["synack_per_s"]["median"] == pytest.approx(10000, rel=1e-3)
    assert res["summary"][NF]["baseline_cpu_s_per_msyn"]["median"] == pytest.approx(50)
    # ours: 30000 SYN/ACKs per vCPU-second, 33.3 us per SYN
    assert res["ratios"][f"{OURS[0]}/{NF}:synack_per_s"] == pytest.approx(3.0, rel=1e-3)
    assert res["ratios"][f"{OURS[0]}/{NF}:cpu_s_per_msyn"] == pytest.approx(1 / 3, rel=1e-3)


def test_connection_rates_enter_ratios_relative_to_the_direct_rate() -> None:
    raw = raw_run()
    for r in raw["records"]:
        if "conn_rate" in r:
            # the stock block ran while the host was twice as fast
            fast = 2 if r["block"] == "stock" else 1
            r["conn_rate"]["per_s"] *= fast
            r["conn_ref"] = {"per_s": 400 * fast}
    res = report.analyse(raw)
    # 300/400 over 280/400, whatever the host's speed
    assert res["ratios"][f"{OURS[0]}/{STOCK}:conn_per_s"] == pytest.approx(300 / 280)
    assert res["summary"][STOCK]["conn_per_s"]["median"] == pytest.approx(560)


def test_throughput_enters_ratios_relative_to_the_direct_download() -> None:
    raw = raw_run()
    for r in raw["records"]:
        if "throughput" in r:
            slow = 0.5 if r["contender"] == OURS[0] else 1
            r["throughput"]["mb_per_s"] = (90 if r["contender"] == OURS[0] else 100) * slow
            r["xfer_ref"] = {"mb_per_s": 200 * slow}
    res = report.analyse(raw)
    # 45/100 over 100/200: 0.9, though the raw rates say 0.45
    assert res["ratios"][f"{OURS[0]}/{STOCK}:mb_per_s"] == pytest.approx(0.9)
    assert res["summary"][OURS[0]]["mb_per_s"]["median"] == pytest.approx(45)


def test_ratios_are_geometric_means_of_the_rounds_own_ratios() -> None:
    raw = raw_run()
    per_s = {OURS[0]: (300, 150, 600), STOCK: (100, 300, 200)}
    for r in raw["records"]:
        if r["contender"] in per_s:
            r["conn_rate"]["per_s"] = per_s[r["contender"]][r["round"]]
    rat = report.analyse(raw)["ratios"]
    # rounds: 3, 0.5, 3 -> 4.5 ** (1/3) (the medians of each side, 300/200, would
    # say 1.5; the median of the rounds 3, one round's figure)
    assert rat[f"{OURS[0]}/{STOCK}:conn_per_s"] == pytest.approx(4.5 ** (1 / 3))


def test_a_round_where_ours_answered_nothing_makes_the_ratio_zero() -> None:
    raw = raw_run()
    for r in raw["records"]:
        if r["contender"] == OURS[0] and r["round"] == 1:
            r["throughput"]["mb_per_s"] = 0.0
    assert report.analyse(raw)["ratios"][f"{OURS[0]}/{STOCK}:mb_per_s"] == 0.0


def test_compare_flags_ratios_that_moved_more_than_20_percent() -> None:
    a = report.analyse(raw_run())
    ok, _ = report.compare(a, copy.deepcopy(a))
    assert ok
    b = report.analyse(raw_run(scale=1.3))  # (a) faster: its ratios to (b), (c) move
    ok, lines = report.compare(a, b)
    assert not ok and any(line.startswith("DIFF") for line in lines)


def test_compare_counts_a_ratio_missing_from_either_run_as_a_difference() -> None:
    a = report.analyse(raw_run())
    b = copy.deepcopy(a)
    gone = sorted(b["ratios"])[0]
    del b["ratios"][gone]
    for x, y in ((a, b), (b, a)):
        ok, lines = report.compare(x, y)
        assert not ok and any(line.startswith(f"MISS {gone}") for line in lines)


def test_readme_block_is_replaced_between_markers(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{report.BEGIN}\nold\n{report.END}\n\n## after\n")
    report.update_readme(readme, "| new |\n", "bench/results/bench.png")
    text = readme.read_text()
    assert "old" not in text and "| new |" in text and text.endswith("## after\n")
    report.update_readme(readme, "| newer |\n", "bench/results/bench.png")
    assert readme.read_text().count(report.BEGIN) == 1


def test_markdown_has_every_contender_and_the_targets() -> None:
    raw = raw_run()
    res = {"run": {k: v for k, v in raw.items() if k != "records"},
           "host": {"description": "test host", "loadavg": (1.0, 1.0, 1.0)}, **report.analyse(raw)}
    md = report.markdown(res)
    for label in ("(a) NAT", "(a) FULLNAT", "(b) nf SYNPROXY", "(c) RS cookies", "control"):
        assert label in md
    assert "**missed**" in md and "test host" in md


def _port_search(rnd: int, full: float, free: float, held_for: float = 30.0,
                 give_up: int = 0) -> dict[str, Any]:
    return {"round": rnd, "window": 4096, "laddrs": 4, "taken_share": 0.9, "tries": 64,
            "hold_s": 60.0, "held_for_s": held_for,
            "fill": {"ports": 16384, "taken": 14746},
            "full": {"ok": int(full * 3), "per_s": full}, "free": {"ok": int(free * 3),
                                                                   "per_s": free},
            "taken_after": 15000, "free_taken_after": 300,
            "counters": {"fullnat_lport_give_up": give_up}}


def test_port_search_ratio_is_the_geometric_mean_of_the_rounds_own_ratios() -> None:
    raw = raw_run()
    raw["port_search"] = [_port_search(0, 100, 200), _port_search(1, 200, 100),
                          _port_search(2, 150, 150, give_up=9)]
    ps = report.analyse(raw)["port_search"]
    # rounds 0.5, 2, 1
    assert ps["ratio"] == pytest.approx(1.0)
    assert ps["summary"]["taken_pct"]["median"] == pytest.approx(90.0, abs=0.01)
    assert ps["summary"]["give_up_per_kconn"]["max"] == pytest.approx(20.0)
    assert ps["expired_rounds"] == 0


def test_a_run_without_the_port_search_has_none() -> None:
    assert report.analyse(raw_run())["port_search"] is None


def test_markdown_has_the_port_search_line_and_flags_expired_holds() -> None:
    raw = raw_run()
    raw["port_search"] = [_port_search(0, 90, 100), _port_search(1, 90, 100, held_for=70)]
    res = {"run": {k: v for k, v in raw.items() if k != "records"},
           "host": {"description": "test host", "loadavg": (1.0, 1.0, 1.0)}, **report.analyse(raw)}
    md = report.markdown(res)
    line = next(ln for ln in md.splitlines() if ln.startswith("Port search: "))
    assert "**0.90**" in line and "90% of its ports held" in line
    assert "In 1 round(s) the measurement outlasted" in line
    assert "| ratio (geometric mean of rounds) |" in md


def test_a_port_search_only_run_reports_without_the_contenders() -> None:
    raw = {"started": "2026-12-03T03:00:00Z", "seconds": 60.0,
           "params": {"connect_timeout": 5.0, "rounds": 2, "only": "port-search"},
           "conn_object_size": {"patched": 384}, "records": [],
           "port_search": [_port_search(0, 100, 100), _port_search(1, 95, 100)]}
    res = {"run": {k: v for k, v in raw.items() if k != "records"},
           "host": {"description": "test host", "loadavg": (1.0, 1.0, 1.0)}, **report.analyse(raw)}
    assert res["targets"] == [] and res["ratios"] == {}
    md = report.markdown(res)
    assert "Port search: " in md and "(b) nf SYNPROXY" not in md


def test_compare_checks_the_port_search_only_when_both_runs_have_it() -> None:
    old = report.analyse(raw_run())
    raw = raw_run()
    raw["port_search"] = [_port_search(0, 100, 100)]
    new = report.analyse(raw)
    ok, lines = report.compare(old, new)
    assert ok and any(line.startswith("SKIP port-search") for line in lines)
    raw["port_search"] = [_port_search(0, 50, 100)]
    ok, lines = report.compare(new, report.analyse(raw))
    assert not ok and any(line.startswith("DIFF port-search:conn_per_s") for line in lines)


class _FakePorts:
    """The kernel as the port search's fill sees it: each SYN takes a port while
    one is free; those rs1 resets free theirs when the fill waits them out."""

    def __init__(self, size: int, lost: int = 0) -> None:
        self.size, self.lost = size, lost
        self.held = self.reset = 0
        self.answer: str | None = None
        self.log: list[tuple[str, Any]] = []

    def send(self, n: int) -> int:
        if n <= 0:
            return 0
        self.log.append(("syns", n))
        made = min(max(n - self.lost, 0), self.size - self.held - self.reset)
        self.lost = 0           # some SYNs of the first burst make no connection
        if self.answer == "drop":
            self.held += made
        else:
            self.reset += made
        return n

    def sleep(self, _s: float) -> None:
        self.reset = 0


def test_port_search_fill_holds_the_share_and_goes_once_around_the_ranges(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import portsearch

    size = portsearch.WINDOW * 4
    k = _FakePorts(size, lost=20)

    def answer(verdict: str | None) -> None:
        k.answer = verdict
        k.log.append(("rs1", verdict))

    monkeypatch.setattr(portsearch, "_send_syns", k.send)
    monkeypatch.setattr(portsearch, "_rs_answer", answer)
    monkeypatch.setattr(portsearch, "_taken", lambda ipvs, svc: k.held + k.reset)
    monkeypatch.setattr(portsearch.time, "sleep", k.sleep)
    rec = portsearch.fill(None, None)  # type: ignore[arg-type]
    target = round(0.9 * size)
    assert (rec["held"], rec["taken"], rec["full"]) == (target, target, size)
    # held SYNs dropped by rs1 (topped up for the lost ones), the rest reset
    # with a little to spare, then rs1's listener answers again
    assert k.log == [("rs1", "drop"), ("syns", target), ("syns", 20),
                     ("rs1", "reject with tcp reset"), ("syns", size - target + size // 100),
                     ("rs1", None)]


# ---- the XDP piece ---------------------------------------------------------------------------

def _fp_flood(pps: float, lb_per_syn: float, answered: bool = True,
              prog_ns: int = 0) -> dict[str, Any]:
    sent = int(pps * 2)
    return {"sent": sent, "seconds": 2.0, "pps": pps, "replies": sent if answered else 0,
            "lb_softirq_s": lb_per_syn * sent, "cpu_busy_s": 2 * lb_per_syn * sent,
            "prog_ns": prog_ns * sent, "prog_runs": sent if prog_ns else 0, "chunks": 3}


def _fastpath(rnd: int, module_us: float, xdp_us: float, nf_us: float = 60.0,
              legit_ok: int = 50) -> dict[str, Any]:
    return {"round": rnd,
            "baseline": _fp_flood(15000, 15e-6, answered=False),
            "ipvs-synproxy-nat": _fp_flood(12000, module_us * 1e-6),
            "ipvs-synproxy-xdp": _fp_flood(14000, xdp_us * 1e-6, prog_ns=2000),
            "baseline_nf": _fp_flood(15000, 15e-6, answered=False),
            NF: _fp_flood(8000, nf_us * 1e-6),
            "legit_xdp": {**_conns(2.0, n=50, failed=50 - legit_ok), "flood_pps": 9000.0}}


def test_xdp_piece_ratios_are_geometric_means_of_the_rounds_own_ratios() -> None:
    raw = raw_run()
    raw["fastpath"] = [_fastpath(0, 30, 10), _fastpath(1, 40, 10)]
    fp = report.analyse(raw)["fastpath"]
    # XDP costs 1/3 and 1/4 of the module's: the geometric mean is sqrt(1/12)
    assert fp["ratios"]["xdp/module:cpu_s_per_msyn"] == pytest.approx((1 / 12) ** 0.5)
    assert fp["ratios"]["xdp/module:synack_per_s"] == pytest.approx(12 ** 0.5)
    assert fp["ratios"]["xdp/nf:synack_per_s"] == pytest.approx(6.0)
    assert fp["summary"]["prog_ns_per_syn"]["median"] == pytest.approx(2000)
    met = {t["target"]: t["met"] for t in report.fastpath_targets(fp)}
    assert all(met.values()), met


def test_xdp_piece_targets_are_missed_when_xdp_is_not_three_times_cheaper() -> None:
    raw = raw_run()
    raw["fastpath"] = [_fastpath(0, 26, 20, legit_ok=49)]
    fp = report.analyse(raw)["fastpath"]
    missed = [t["target"] for t in report.fastpath_targets(fp) if not t["met"]]
    assert len(missed) == 3, missed
    res = {"run": {k: v for k, v in raw.items() if k != "records"},
           "host": {"description": "test host", "loadavg": (1.0, 1.0, 1.0)},
           **report.analyse(raw)}
    md = report.markdown(res)
    assert "XDP piece" in md and md.count("**missed**") >= 3


def test_a_run_without_the_xdp_piece_has_none_and_compare_skips_it() -> None:
    old = report.analyse(raw_run())
    assert old["fastpath"] is None
    raw = raw_run()
    raw["fastpath"] = [_fastpath(0, 30, 10)]
    ok, lines = report.compare(old, report.analyse(raw))
    assert ok and any(line.startswith("SKIP xdp-piece") for line in lines)
