"""A ``vm exec`` in the background whose output the test reads as it comes."""

from __future__ import annotations

import subprocess
import sys
import threading

from ipvs_synproxy.build import paths


class GuestRun:
    """``ipvs-synproxy vm exec ARGS…`` started now; :meth:`output` is what it has
    printed so far (stdout and stderr together)."""

    def __init__(self, *args: str) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ipvs_synproxy.cli", "vm", "exec", *args],
            cwd=paths.project_root(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)
