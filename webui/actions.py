"""Changes made through the console: run one, audit-log it (success or failure);
and the audit entry of every refused attempt (:func:`audit_refusal`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from flask import Response, current_app, g, request
from werkzeug.datastructures import ImmutableMultiDict
from werkzeug.exceptions import HTTPException

from webui.audit import AuditLog
from webui.service import ConsoleError, ConsoleService


def console() -> ConsoleService:
    return cast(ConsoleService, current_app.extensions["ipvs_console"])


def perform(action: str, target: str, params: dict[str, Any],
            fn: Callable[[ConsoleService], dict[str, Any]]) -> dict[str, Any]:
    """Run ``fn`` against the service layer and write the audit entry."""
    audit = cast(AuditLog, current_app.extensions["ipvs_audit"])
    g.audited = True
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


UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def audit_refusal(resp: Response) -> Response:
    """``after_request``: write an audit entry for a refused change (any 4xx on an
    unsafe method that :func:`perform` has not logged), refused credentials (401
    with an Authorization header) and throttled attempts (429); and for logins."""
    status = resp.status_code
    if g.get("audited"):
        return resp
    login = request.endpoint == "auth.login" and request.method == "POST"
    credentials = "Authorization" in request.headers
    if not ((400 <= status < 500 and request.method in UNSAFE_METHODS) or status == 429
            or (status == 401 and credentials) or (login and status < 400)):
        return resp
    user = g.get("user")
    name = user.name if user is not None else str(g.get("attempted_user") or "-")[:64]
    if login:
        action = "login"
    elif request.endpoint == "auth.logout":
        action = "logout"
    else:
        action = f"{request.method} {request.endpoint or '-'}"
    reason = g.get("refusal") or resp.status
    try:
        form = request.form
    except HTTPException:  # the body is why it was refused (413): it is not read again
        form = ImmutableMultiDict()
    params = {k: v[:64] for k, v in form.items() if k not in ("password", "csrf_token")}
    audit = cast(AuditLog, current_app.extensions["ipvs_audit"])
    audit.record(user=name, role=user.role if user is not None else "-",
                 remote=request.remote_addr, action=action, target=request.path,
                 params=params, result="ok" if status < 400 else
                 f"refused ({status}): {reason}")
    return resp
