"""Judge a guest test run by its JUnit report, not by an exit status alone.

A run passes only when at least one test executed, none failed or errored and
none was skipped: a guest test that silently skips is a test that cannot fail.
Usage: ``python -m ipvs_synproxy_testbed.junit REPORT.xml``
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Summary:
    passed: int = 0
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    # seconds per test and per test module: where a run's time goes
    times: dict[str, float] = field(default_factory=dict)
    module_times: dict[str, float] = field(default_factory=dict)
    # a failed test's own message: CI keeps only the console, not the guest's log
    reasons: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.passed > 0 and not self.failed and not self.skipped


def reason(element: ET.Element, limit: int = 1500) -> str:
    """The message of a <failure> or <error>, cut to ``limit`` characters."""
    lines = (element.text or "").strip().splitlines()
    text = element.get("message") or (lines[-1] if lines else "")
    return text if len(text) <= limit else text[:limit] + " [...]"


def summarize(xml_text: str) -> Summary:
    s = Summary()
    for case in ET.fromstring(xml_text).iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        seconds = float(case.get("time") or 0.0)
        s.times[name] = seconds
        module = case.get("classname", "")
        s.module_times[module] = s.module_times.get(module, 0.0) + seconds
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        if bad is not None:
            s.failed.append(name)
            s.reasons[name] = reason(bad)
        elif case.find("skipped") is not None:
            s.skipped.append(name)
        else:
            s.passed += 1
    return s


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    path = Path(argv[1])
    try:
        s = summarize(path.read_text())
    except (OSError, ET.ParseError) as exc:
        print(f"guest tests: no usable report at {path}: {exc}", file=sys.stderr)
        return 1
    for name in s.failed:
        print(f"guest tests: FAILED {name}", file=sys.stderr)
    for name in s.skipped:
        print(f"guest tests: SKIPPED (not allowed) {name}", file=sys.stderr)
    if s.passed == 0:
        print("guest tests: no test executed", file=sys.stderr)
    print(f"guest: {s.passed} passed, {len(s.failed)} failed, {len(s.skipped)} skipped")
    return 0 if s.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
