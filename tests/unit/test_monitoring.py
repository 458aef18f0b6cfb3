"""monitoring/: the alert rules under promtool, the Grafana dashboard's shape,
and every series either names held to the exporter's contract
(``ipvs_synproxy.exporter.series``). The same names are checked against a
real scrape in the guest (tests/vm)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from ipvs_synproxy.exporter import series
from tests import monitoring_queries as mq

# ``make deps`` takes promtool out of Debian's prometheus package
# (ipvs_synproxy_testbed/deps.py) into build/tools/.
PROMTOOL_BUILT = mq.ROOT / "build" / "tools" / "promtool"
SERVED = set(series.BY_NAME)


def promtool() -> str:
    """promtool's path; a missing one fails under CI (``make test`` installs
    it with ``make deps``) and skips elsewhere."""
    if PROMTOOL_BUILT.is_file() and os.access(PROMTOOL_BUILT, os.X_OK):
        return str(PROMTOOL_BUILT)
    found = shutil.which("promtool")
    if found:
        return found
    message = f"promtool is neither at {PROMTOOL_BUILT} nor on PATH: run make deps"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, check=False,
                          cwd=mq.ROOT, timeout=120)


# -- the rules under promtool

def test_promtool_checks_the_rules() -> None:
    res = run_promtool("check", "rules", str(mq.RULES))
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    tests = sorted(mq.RULE_TESTS.glob("*.test.yml"))
    assert tests, f"no rule tests in {mq.RULE_TESTS}"
    res = run_promtool("test", "rules", *map(str, tests))
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    firing: set[str] = set()
    silent: set[str] = set()
    for path in mq.RULE_TESTS.glob("*.test.yml"):
        for group in yaml.safe_load(path.read_text())["tests"]:
            for case in group.get("alert_rule_test", []):
                (firing if case.get("exp_alerts") else silent).add(case["alertname"])
    alerts = set(mq.alert_names())
    assert alerts - firing == set(), "never tested firing"
    assert alerts - silent == set(), "never tested not firing"


# -- the rules' contents

def _rules() -> list[dict[str, Any]]:
    return [rule for group in mq.load_rules()["groups"] for rule in group["rules"]]


def test_flood_thresholds_are_the_exporters() -> None:
    """The 1000 SYNs/s and the 0.5 ratio of the under-flood rule are
    FLOOD_SYN_RATE and FLOOD_VALID_ACK_RATIO."""
    (rule,) = [r for r in _rules() if r.get("record") ==
               "instance_vip:ipvs_synproxy_under_flood:bool"]
    expr = rule["expr"]
    syn = re.findall(r"instance_vip:ipvs_synproxy_syns_received:rate1m\s*>=?\s*bool\s*"
                     r"([0-9.e+]+)", expr)
    ratio = re.findall(r"instance_vip:ipvs_synproxy_valid_ack_ratio:ratio1m\s*<\s*bool\s*"
                       r"([0-9.e+]+)", expr)
    assert [float(x) for x in syn] == [series.FLOOD_SYN_RATE]
    assert [float(x) for x in ratio] == [series.FLOOD_VALID_ACK_RATIO]


# Alerts about a whole balancer; every other alert is about one VIP.
PER_BALANCER = {"IpvsSynproxyLportExhausted", "IpvsSynproxySyncDaemonDown",
                "IpvsSynproxyExporterDown"}


def test_every_alert_has_a_severity_and_names_what_it_is_about() -> None:
    alerts = [r for r in _rules() if "alert" in r]
    assert {a["alert"] for a in alerts} >= PER_BALANCER | {
        "IpvsSynproxyFloodStarted", "IpvsSynproxyFloodStopped",
        "IpvsSynproxyCookieInvalidRatioHigh", "IpvsSynproxyLportExhaustionNear",
        "IpvsSynproxyRealServerDown", "IpvsSynproxyServiceWithoutRealServer"}
    for alert in alerts:
        assert alert["labels"]["severity"] in ("info", "warning", "critical"), alert["alert"]
        notes = alert["annotations"]
        where = "$labels.instance" if alert["alert"] in PER_BALANCER else "$labels.vip"
        assert where in notes["summary"] and where in notes["description"], alert["alert"]
        assert "$labels.instance" in notes["summary"], alert["alert"]


def test_rule_names_are_served_or_recorded() -> None:
    assert mq.unknown_names(mq.rule_exprs(), SERVED | mq.PROMETHEUS_OWN) == set()


def test_recording_rules_follow_the_naming_convention() -> None:
    for name in mq.recording_rule_names():
        level, metric, ops = name.split(":")
        assert level and ops and metric.startswith("ipvs_synproxy_"), name


def test_readme_explains_every_alert_and_the_flood_thresholds() -> None:
    readme = (mq.MONITORING / "README.md").read_text()
    for alert in mq.alert_names():
        assert alert in readme, alert
    assert f"{series.FLOOD_SYN_RATE:g}" in readme
    assert f"{series.FLOOD_VALID_ACK_RATIO:g}" in readme


# -- the dashboard

@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return mq.load_dashboard()


def test_dashboard_is_provisioning_ready(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] == "ipvs-synproxy"
    assert dashboard["id"] is None
    assert "__inputs" not in dashboard and "__requires" not in dashboard
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"instance", "vip"} <= set(variables)
    for name in ("instance", "vip"):
        assert variables[name]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    # No data source is named by uid anywhere (only the variable).
    text = mq.DASHBOARD.read_text()
    assert set(re.findall(r'"uid":\s*"([^"]*)"', text)) <= {
        "ipvs-synproxy", "${datasource}", "-- Grafana --"}


def test_panel_ids_are_unique(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in mq.all_panels(dashboard)]
    assert len(ids) == len(set(ids))
    assert all(isinstance(i, int) for i in ids)


def test_every_panel_queries_the_chosen_datasource(dashboard: dict[str, Any]) -> None:
    panels = [p for p in mq.all_panels(dashboard) if p["type"] != "row"]
    assert panels
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, \
            panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target.get("datasource", panel["datasource"]) == panel["datasource"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{panel['title']}: no unit"


def test_panels_lie_on_the_grid_without_overlapping(dashboard: dict[str, Any]) -> None:
    taken: set[tuple[int, int]] = set()
    for panel in mq.all_panels(dashboard):
        pos = panel["gridPos"]
        assert set(pos) >= {"h", "w", "x", "y"}, panel["title"]
        assert pos["h"] > 0 and pos["w"] > 0 and pos["x"] >= 0 and pos["y"] >= 0
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                 for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


def test_dashboard_has_the_operators_panels(dashboard: dict[str, Any]) -> None:
    exprs = "\n".join(mq.dashboard_queries())
    for name in ("ipvs_synproxy_syns_received_total", "ipvs_synproxy_cookies_sent_total",
                 "ipvs_synproxy_cookie_acks_total", "ipvs_synproxy_connections_proxied_total",
                 "instance_vip:ipvs_synproxy_under_flood:bool", "ipvs_synproxy_drops_total",
                 "ipvs_synproxy_server_handshake_failures_total",
                 "ipvs_synproxy_real_server_weight", "ipvs_synproxy_fullnat_lports_used",
                 "ipvs_synproxy_fullnat_lports_free", "ipvs_synproxy_sync_daemon_running",
                 "ipvs_synproxy_cookie_key_epoch", "ipvs_synproxy_service_bytes_total"):
        assert name in exprs, name
    # SYNs, cookies, valid ACKs and proxied connections on one panel.
    flood = [p for p in mq.all_panels(dashboard) if len(p.get("targets", [])) == 4
             and "ipvs_synproxy_syns_received_total" in p["targets"][0]["expr"]]
    assert len(flood) == 1 and flood[0].get("repeat") == "vip"


def test_every_dashboard_query_names_only_served_or_recorded_series() -> None:
    queries = mq.dashboard_queries() + mq.variable_queries()
    assert len(queries) > 20
    for query in queries:
        assert mq.metric_names(query), f"names no series: {query}"
    assert mq.unknown_names(queries, SERVED) == set()


def test_every_served_series_kind_matches_its_use() -> None:
    """rate() only over counters; gauges read as they are."""
    for query in mq.dashboard_queries() + mq.rule_exprs():
        for name in re.findall(r"\brate\((\w+)", query):
            assert series.BY_NAME[name].kind == "counter", name


# -- the name extractor itself

@pytest.mark.parametrize(("expr", "names"), [
    ('sum by (vip, port) (rate(ipvs_synproxy_syns_received_total{vip=~"$vip"}[$__rate_interval]))',
     {"ipvs_synproxy_syns_received_total"}),
    ('sum(rate(a_total{x="{not_a_name}"}[5m:30s] offset 1h30m)) without (instance, job) / 1e3',
     {"a_total"}),
    ("instance_vip:x:rate1m and on (instance, vip) instance_vip:y:bool == bool 1",
     {"instance_vip:x:rate1m", "instance_vip:y:bool"}),
    ("a * on (vip) group_left (scheduler, syn_proxy) b unless ignoring(x) c or vector(0)",
     {"a", "b", "c"}),
    ('label_replace(up{job="ipvs-synproxy"}, "vip", "$1", "instance", "(.*):.*")',
     {"up"}),
    ("histogram_quantile(0.9, sum by (le) (rate(x_bucket[${__range}]))) > Inf",
     {"x_bucket"}),
    ('{__name__="ipvs_synproxy_up", instance="a"} @ start() # a comment: not_a_name',
     {"ipvs_synproxy_up"}),
    ("topk(5, max_over_time(instance_vip:u:bool[15m])) > 0x1F AND NaN",
     {"instance_vip:u:bool"}),
    ('count(sum by (laddr) (used)) or absent(free{a=\'b\\\'c\'})', {"used", "free"}),
    ("rate(rate_total[1m])", {"rate_total"}),
])
def test_metric_names_finds_series_and_only_series(expr: str, names: set[str]) -> None:
    assert mq.metric_names(expr) == names


def test_unknown_names_reports_what_nothing_serves() -> None:
    exprs = ["rate(ipvs_synproxy_syns_received[1m])", "instance_vip:nope:rate1m",
             "instance_vip:ipvs_synproxy_under_flood:bool", "ipvs_synproxy_up"]
    assert mq.unknown_names(exprs, SERVED) == {"ipvs_synproxy_syns_received",
                                                "instance_vip:nope:rate1m"}


def test_dashboard_queries_reach_into_collapsed_rows(tmp_path: Path) -> None:
    board = {"panels": [
        {"type": "timeseries", "id": 1, "targets": [{"expr": "a"}]},
        {"type": "row", "id": 2, "collapsed": True,
         "panels": [{"type": "timeseries", "id": 3, "targets": [{"expr": "b"}, {"refId": "X"}]}]},
    ], "templating": {"list": [
        {"type": "query", "name": "i", "query": {"query": "label_values(c{x=\"1\"}, vip)"}},
        {"type": "query", "name": "j", "query": "label_values(d, vip)"},
        {"type": "datasource", "name": "datasource", "query": "prometheus"}]}}
    path = tmp_path / "d.json"
    path.write_text(json.dumps(board))
    assert mq.dashboard_queries(path) == ["a", "b"]
    assert mq.variable_queries(path) == ['c{x="1"}', "d"]
