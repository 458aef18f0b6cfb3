"""The PromQL that ``monitoring/`` runs, and the series names it needs.

Shared by the host's unit tests (tests/unit/test_monitoring.py: names against
``ipvs_synproxy.exporter.series``) and the guest's (names against a real
scrape of the exporter). Plain functions over the files, no Prometheus:

- :func:`dashboard_queries`: every panel target's ``expr`` of the Grafana
  dashboard, panels inside rows included;
- :func:`variable_queries`: the series selectors of its template variables;
- :func:`rule_exprs` and :func:`recording_rule_names`: the rules file;
- :func:`metric_names`: the metric names one PromQL expression reads;
- :func:`unknown_names`: the names of expressions that are neither served
  nor recorded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "monitoring"
DASHBOARD = MONITORING / "grafana" / "ipvs-synproxy.json"
RULES = MONITORING / "prometheus" / "ipvs-synproxy.rules.yml"
RULE_TESTS = MONITORING / "prometheus" / "tests"

# Series that Prometheus itself adds to every scrape (the rules read ``up``).
PROMETHEUS_OWN = frozenset({"up"})

# PromQL words that look like names but are not series.
KEYWORDS = frozenset({
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "offset", "bool", "inf", "nan", "atan2",
})


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def load_rules(path: Path = RULES) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return data


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows and the panels a (collapsed) row holds included."""
    todo: list[dict[str, Any]] = list(dashboard.get("panels", []))
    while todo:
        panel = todo.pop(0)
        yield panel
        todo.extend(panel.get("panels", []))


def dashboard_queries(path: Path = DASHBOARD) -> list[str]:
    """Every target ``expr`` of every panel, in panel order."""
    return [target["expr"] for panel in all_panels(load_dashboard(path))
            for target in panel.get("targets", []) if target.get("expr")]


_LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*\w+\s*\)\s*$", re.S)


def variable_queries(path: Path = DASHBOARD) -> list[str]:
    """The PromQL of each query variable: ``label_values(SELECTOR, label)``
    gives SELECTOR; ``query_result(EXPR)`` gives EXPR."""
    out = []
    for var in load_dashboard(path).get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        match = _LABEL_VALUES.match(text)
        if match:
            out.append(match.group(1))
        elif text.startswith("query_result(") and text.endswith(")"):
            out.append(text[len("query_result("):-1])
        elif text and not text.startswith(("label_names(", "metrics(")):
            out.append(text)
    return out


def _rules(path: Path) -> Iterator[dict[str, Any]]:
    for group in load_rules(path).get("groups", []):
        yield from group.get("rules", [])


def rule_exprs(path: Path = RULES) -> list[str]:
    """The ``expr`` of every recording and alerting rule."""
    return [str(rule["expr"]) for rule in _rules(path)]


def recording_rule_names(path: Path = RULES) -> set[str]:
    return {str(rule["record"]) for rule in _rules(path) if "record" in rule}


def alert_names(path: Path = RULES) -> list[str]:
    return [str(rule["alert"]) for rule in _rules(path) if "alert" in rule]


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', re.S)
_NAME_MATCHER = re.compile(r"__name__\s*=\s*(?:\"((?:[^\"\\]|\\.)*)\"|'((?:[^'\\]|\\.)*)')")
_COMMENT = re.compile(r"#[^\n]*")
# Grafana's variables: $__rate_interval, $vip, ${vip}, ${vip:regex}, [[vip]]
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[[^\]]*\]\]")
_RANGE = re.compile(r"\[[^\]]*\]")  # [5m], [1h:30s] and the like
_MATCHERS = re.compile(r"\{[^}]*\}")
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", re.I)
_NUMBER = re.compile(
    r"(?<![\w:.])(?:0[xX][0-9a-fA-F]+|(?:\d+(?:ms|[smhdwy]))+"
    r"|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)(?![\w:])")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """The metric names ``expr`` reads: recorded or served series.

    Strings and comments, Grafana variables, ranges and durations, label
    matchers (a ``__name__="x"`` matcher still counts as ``x``), the label
    lists of ``by``/``without``/``on``/``ignoring``/``group_left``/
    ``group_right``, numbers, functions (a name before ``(``) and keywords
    are left out. A lexer, not a parser: enough for the queries of this
    tree, whose tests hold it to tricky cases.
    """
    names = {a or b for a, b in _NAME_MATCHER.findall(expr)}
    text = _STRING.sub(" ", expr)
    text = _COMMENT.sub(" ", text)
    text = _VARIABLE.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _MATCHERS.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    for match in _IDENT.finditer(text):
        word = match.group(0)
        if word.lower() in KEYWORDS:
            continue
        if re.match(r"\s*\(", text[match.end():]):
            continue  # a function or an aggregation
        names.add(word)
    return names


def unknown_names(exprs: Iterable[str], served: set[str], rules: Path = RULES) -> set[str]:
    """The names ``exprs`` read that are neither in ``served`` nor recorded by
    a rule of ``rules``. ``served`` holds sample names as exposed (counters
    with ``_total``); add :data:`PROMETHEUS_OWN` for the rules' ``up``."""
    known = served | recording_rule_names(rules)
    return {name for expr in exprs for name in metric_names(expr)} - known


def scraped_names(text: str) -> set[str]:
    """The sample names of an exporter's scrape (the text format), counters
    with their ``_total``, without prometheus-client's ``_created`` twins."""
    from prometheus_client.parser import text_string_to_metric_families

    return {sample.name for family in text_string_to_metric_families(text)
            for sample in family.samples if not sample.name.endswith("_created")}
