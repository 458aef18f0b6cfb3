"""``make vm-test``: the whole guest suite on every supported kernel series.

One guest per series (``vm exec --kernel S --topology -- python -m pytest
tests/vm``), each with its own JUnit report ``vm-<S>.xml`` and log
``vm-<S>.log`` in the results directory, each report judged like
:mod:`ipvs_synproxy_testbed.junit` judges one (a run passes only when tests
ran and none failed or skipped). The guests run at the same time by default:
a TCG guest keeps about one of the host's cores busy, so two of them finish
in little more than the time of one. ``--serial`` runs them one after another.

Usage: ``python -m ipvs_synproxy_testbed.suite [--serial] [--kernel S]...
[--timeout SECONDS] [--results DIR] [-- PYTEST-ARGS...]``
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from ipvs_synproxy.build import kmod, paths
from ipvs_synproxy_testbed import junit


@dataclass
class Run:
    series: str
    report: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    seconds: float = 0.0
    returncode: int | None = None


def command(run: Run, timeout: float, pytest_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "ipvs_synproxy.cli", "vm", "exec", "--kernel", run.series,
            "--topology", "--timeout", str(timeout), "--",
            "python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/vm",
            f"--junitxml={run.report}", *pytest_args]


def start(run: Run, timeout: float, pytest_args: list[str]) -> None:
    run.report.unlink(missing_ok=True)
    with open(run.log, "wb") as log:
        run.proc = subprocess.Popen(command(run, timeout, pytest_args), stdout=log,
                                    stderr=subprocess.STDOUT, cwd=paths.project_root())
    run.started = time.monotonic()


def wait(run: Run) -> None:
    assert run.proc is not None
    run.returncode = run.proc.wait()
    run.seconds = time.monotonic() - run.started


def judge(run: Run) -> bool:
    """Print the run's verdict; True when it passed."""
    try:
        s = junit.summarize(run.report.read_text())
    except (OSError, ET.ParseError) as exc:
        tail = run.log.read_text(errors="replace").splitlines()[-40:]
        print(f"guest tests on {run.series}: no usable report ({exc}); "
              f"the end of {run.log}:", *tail, sep="\n", file=sys.stderr)
        return False
    for name in s.failed:
        print(f"guest tests on {run.series}: FAILED {name}", file=sys.stderr)
    for name in s.skipped:
        print(f"guest tests on {run.series}: SKIPPED (not allowed) {name}", file=sys.stderr)
    if not s.ok and s.failed:
        print(f"guest tests on {run.series}: details in {run.log}", file=sys.stderr)
    print(f"guest tests on Linux {run.series}: {s.passed} passed, {len(s.failed)} failed, "
          f"{len(s.skipped)} skipped in {run.seconds:.0f} s (vm exec exit {run.returncode})")
    return s.ok and run.returncode == 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ipvs_synproxy_testbed.suite",
                                 description="Run the guest suite on every "
                                             "supported kernel series.")
    ap.add_argument("--kernel", action="append", metavar="SERIES",
                    help="a series to run on (repeatable; default: every supported "
                         "series apt serves)")
    ap.add_argument("--serial", action="store_true", help="one guest after another")
    ap.add_argument("--timeout", type=float, default=2700.0,
                    help="per guest, in seconds (default 2700)")
    ap.add_argument("--results", type=Path, default=paths.project_root() / "build" /
                    "test-results", help="directory for the reports and logs")
    ap.add_argument("pytest_args", nargs=argparse.REMAINDER, metavar="-- PYTEST-ARGS")
    args = ap.parse_args(argv)
    extra = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
    try:
        series = [kmod.check_series(s) for s in args.kernel] if args.kernel \
            else kmod.served_series()
    except kmod.KmodError as exc:
        print(f"ipvs-synproxy: {exc}", file=sys.stderr)
        return 2
    if not series:
        print("ipvs-synproxy: apt serves no supported kernel series", file=sys.stderr)
        return 1
    args.results.mkdir(parents=True, exist_ok=True)
    runs = [Run(s, (args.results / f"vm-{s}.xml").resolve(), args.results / f"vm-{s}.log")
            for s in series]
    # Build every series' modules first, one at a time: two builds at once would
    # only compete for the same two cores, and a build error is clearer alone.
    for run in runs:
        kmod.build(series=run.series)
        kmod.build_toa(series=run.series)
    began = time.monotonic()
    if args.serial:
        for run in runs:
            start(run, args.timeout, extra)
            wait(run)
    else:
        for run in runs:
            start(run, args.timeout, extra)
        for run in runs:
            wait(run)
    results = [judge(run) for run in runs]
    print(f"guest tests: {len(runs)} kernel series in {time.monotonic() - began:.0f} s "
          f"({'one after another' if args.serial else 'at the same time'})")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
