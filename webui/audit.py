"""The audit log: one JSON line per change attempted through the console, and per
refused attempt (bad credentials, throttled, missing CSRF token, wrong role, bad
input) — who (user, role, address), what (action, target, parameters, result),
when (UTC).

The file is private: mode 0600, or 0640 with a group (``audit_log_group``) for
whoever reads it; it is reopened when logrotate moves it (``WatchedFileHandler``),
and a file made then gets the same mode.
"""

from __future__ import annotations

import datetime
import json
import logging
import logging.handlers
import os
from pathlib import Path
from typing import Any


class _PrivateFileHandler(logging.handlers.WatchedFileHandler):
    """A WatchedFileHandler whose file (also a new one after rotation) has
    ``mode`` and, if given, group ``gid``."""

    def __init__(self, path: str, mode: int, gid: int | None) -> None:
        self.file_mode, self.gid = mode, gid
        super().__init__(path, encoding="utf-8")

    def _open(self) -> Any:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, self.file_mode)
        try:
            if self.gid is not None:
                os.fchown(fd, -1, self.gid)
            os.fchmod(fd, self.file_mode)
        except OSError:
            os.close(fd)
            raise
        return os.fdopen(fd, "a", encoding="utf-8")


class AuditLog:
    """Writes to ``path`` through a private logger (not the global logging tree,
    so two apps in one process never share handlers)."""

    def __init__(self, path: str, gid: int | None = None) -> None:
        self.path = path
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.logger = logging.Logger(f"ipvs_synproxy.webui.audit:{path}", logging.INFO)
        handler = _PrivateFileHandler(path, 0o600 if gid is None else 0o640, gid)
        handler.setFormatter(logging.Formatter("%(message)s"))
        self.logger.addHandler(handler)
        self.logger.propagate = False

    def record(self, *, user: str, role: str, remote: str | None, action: str,
               target: str, params: dict[str, Any], result: str) -> dict[str, Any]:
        entry = {
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
            "user": user, "role": role, "remote": remote, "action": action,
            "target": target, "params": params, "result": result,
        }
        self.logger.info(json.dumps(entry, sort_keys=True, default=str))
        return entry

    def close(self) -> None:
        for h in list(self.logger.handlers):
            h.close()
            self.logger.removeHandler(h)
