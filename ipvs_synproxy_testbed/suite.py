"""``make vm-test``: the whole guest suite on every supported kernel series.

One guest per series (``vm exec --kernel S --topology -- python -m pytest
tests/vm``), each with its own JUnit report ``vm-<S>.xml`` and log
``vm-<S>.log`` in the results directory, each report judged like
:mod:`ipvs_synproxy_testbed.junit` judges one (a run passes only when tests
ran and none failed or skipped). With ``--dkms``, the DKMS install test of
each series (``tests/testbed/test_dkms.py``, a guest of its own that compiles
the modules) joins the same queue, report ``dkms-<S>.xml``.

Two guests run at a time by default (``--jobs``), the suites first: a TCG
guest running the suite leaves part of a core idle, so two finish well before
the time of two; a DKMS guest takes the slot of whichever suite ends first.
The DKMS guests (one vCPU each, the modules compiled on the host) run side by
side: measured, two of them took 5.4 min together, one after the other 10.2.
``--serial`` runs one after another.

Usage: ``python -m ipvs_synproxy_testbed.suite [--serial | --jobs N] [--dkms]
[--kernel S]... [--timeout SECONDS] [--results DIR] [-- PYTEST-ARGS...]``
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

SUITE = "guest tests"
DKMS = "DKMS install"
DKMS_TEST = ("tests/testbed/test_dkms.py::"
             "test_a_dkms_install_in_the_guest_loads_our_modules_and_serves")


@dataclass
class Run:
    series: str
    report: Path
    log: Path
    kind: str = SUITE
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    seconds: float = 0.0
    returncode: int | None = None


def command(run: Run, timeout: float, pytest_args: list[str]) -> list[str]:
    if run.kind == DKMS:
        # the test boots its own guest (vm exec) from the host; its exported
        # tree goes beside the report, not into pytest's shared temp directory
        return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                f"--basetemp={run.report.with_suffix('.tmp')}",
                f"{DKMS_TEST}[{run.series}]", f"--junitxml={run.report}"]
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
    print(f"{run.kind} on {run.series}: started (log {run.log})", flush=True)


def finished(run: Run) -> bool:
    assert run.proc is not None
    if run.proc.poll() is None:
        return False
    run.returncode = run.proc.returncode
    run.seconds = time.monotonic() - run.started
    return True


def run_queue(runs: list[Run], jobs: int, timeout: float, pytest_args: list[str]) -> None:
    """Run ``runs`` in order, at most ``jobs`` at a time."""
    pending, running = list(runs), list[Run]()
    while pending or running:
        while len(running) < jobs and pending:
            running.append(pending.pop(0))
            start(running[-1], timeout, pytest_args)
        time.sleep(1)
        running = [r for r in running if not finished(r)]


def judge(run: Run) -> bool:
    """Print the run's verdict; True when it passed."""
    try:
        s = junit.summarize(run.report.read_text())
    except (OSError, ET.ParseError) as exc:
        tail = run.log.read_text(errors="replace").splitlines()[-40:]
        print(f"{run.kind} on {run.series}: no usable report ({exc}); "
              f"the end of {run.log}:", *tail, sep="\n", file=sys.stderr)
        return False
    for name in s.failed:
        print(f"{run.kind} on {run.series}: FAILED {name}", file=sys.stderr)
        print(f"    {s.reasons.get(name, '')}", file=sys.stderr)
    for name in s.skipped:
        print(f"{run.kind} on {run.series}: SKIPPED (not allowed) {name}", file=sys.stderr)
    if not s.ok and s.failed:
        print(f"{run.kind} on {run.series}: details in {run.log}", file=sys.stderr)
    if run.kind == SUITE:
        modules = sorted(s.module_times.items(), key=lambda kv: -kv[1])
        print(f"{run.kind} on {run.series}, seconds per module: "
              + ", ".join(f"{m.rsplit('.', 1)[-1]} {t:.0f}" for m, t in modules))
        slowest = sorted(s.times.items(), key=lambda kv: -kv[1])[:8]
        print(f"{run.kind} on {run.series}, slowest: "
              + ", ".join(f"{n.rsplit('::', 1)[-1]} {t:.0f}" for n, t in slowest))
    print(f"{run.kind} on Linux {run.series}: {s.passed} passed, {len(s.failed)} failed, "
          f"{len(s.skipped)} skipped in {run.seconds:.0f} s (exit {run.returncode})")
    return s.ok and run.returncode == 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ipvs_synproxy_testbed.suite",
                                 description="Run the guest suite on every "
                                             "supported kernel series.")
    ap.add_argument("--kernel", action="append", metavar="SERIES",
                    help="a series to run on (repeatable; default: every supported "
                         "series apt serves)")
    ap.add_argument("--serial", action="store_true", help="one guest after another")
    ap.add_argument("--jobs", type=int, default=2, metavar="N",
                    help="guests at a time (default 2: the host's cores)")
    ap.add_argument("--dkms", action="store_true",
                    help="also run each series' DKMS install test in the queue")
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
    if args.dkms:
        # after the suites; newest series first (its suite used to end first)
        runs += [Run(s, (args.results / f"dkms-{s}.xml").resolve(),
                     args.results / f"dkms-{s}.log", DKMS) for s in reversed(series)]
    # Build every series' modules first, one at a time: two builds at once would
    # only compete for the same two cores, and a build error is clearer alone.
    for run in runs:
        kmod.build(series=run.series)
        kmod.build_toa(series=run.series)
    began = time.monotonic()
    jobs = 1 if args.serial else max(1, args.jobs)
    run_queue(runs, jobs, args.timeout, extra)
    results = [judge(run) for run in runs]
    print(f"guest tests: {len(series)} kernel series, {len(runs)} guest runs in "
          f"{time.monotonic() - began:.0f} s ({jobs} at a time)")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
