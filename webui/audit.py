"""The audit log: one JSON line per change attempted through the console —
who (user, role, address), what (action, target, parameters, result), when (UTC)."""

from __future__ import annotations

import datetime
import json
import logging
from pathlib import Path
from typing import Any


class AuditLog:
    """Writes to ``path`` through a private logger (not the global logging tree,
    so two apps in one process never share handlers)."""

    def __init__(self, path: str) -> None:
        self.path = path
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.logger = logging.Logger(f"ipvs_synproxy.webui.audit:{path}", logging.INFO)
        handler = logging.FileHandler(path, encoding="utf-8")
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
