"""Changes made through the console: run one, audit-log it (success or failure)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from flask import current_app, g, request

from webui.audit import AuditLog
from webui.service import ConsoleError, ConsoleService


def console() -> ConsoleService:
    return cast(ConsoleService, current_app.extensions["ipvs_console"])


def perform(action: str, target: str, params: dict[str, Any],
            fn: Callable[[ConsoleService], dict[str, Any]]) -> dict[str, Any]:
    """Run ``fn`` against the service layer and write the audit entry."""
    audit = cast(AuditLog, current_app.extensions["ipvs_audit"])
    who = dict(user=g.user.name, role=g.user.role, remote=request.remote_addr,
               action=action, target=target, params=params)
    try:
        result = fn(console())
    except ConsoleError as exc:
        audit.record(**who, result=f"refused ({exc.status}): {exc.message}")
        raise
    except Exception as exc:
        audit.record(**who, result=f"failed: {exc}")
        raise
    audit.record(**who, result="ok")
    return result
