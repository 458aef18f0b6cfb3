"""Login, sessions, API tokens, roles and CSRF protection.

* Everything but ``/metrics``, ``/login`` and its stylesheet needs a user: pages
  redirect to the login form, the API answers 401.
* A browser logs in with a password (werkzeug hash from the settings) and gets a
  signed session cookie (HttpOnly, SameSite=Strict). Scripts send
  ``Authorization: Bearer NAME:TOKEN`` (the token's hash is in the settings).
* Every state-changing request that rides on the session cookie carries the
  session's CSRF token (form field ``csrf_token`` or header ``X-CSRF-Token``);
  a missing or wrong one is a 400 and nothing happens. Token-authenticated
  requests need none: a browser never adds that header by itself.
* ``readonly`` users get 403 on every change.
"""

from __future__ import annotations

import functools
import hmac
import secrets
from collections.abc import Callable
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    abort,
    current_app,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask.typing import ResponseReturnValue
from werkzeug.security import check_password_hash, generate_password_hash

from webui.sessions import SessionStore
from webui.settings import NAME_RE, User
from webui.throttle import Throttle, Throttled

bp = Blueprint("auth", __name__)

PUBLIC_ENDPOINTS = frozenset({"auth.login", "metrics.metrics"})
PUBLIC_STATIC = frozenset({"style.css"})  # the login page's look; no data in it
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Compared against when the user does not exist, so a wrong name costs as much
# time as a wrong password.
_DUMMY_HASH = generate_password_hash(secrets.token_hex(16))
# Credentials that no configured user can have are refused before any hashing.
PASSWORD_MAX = 1024
TOKEN_MIN, TOKEN_MAX = 8, 512

F = TypeVar("F", bound=Callable[..., Any])


def _users() -> dict[str, User]:
    return cast(dict[str, User], current_app.config["CONSOLE_USERS"])


def csrf_token() -> str:
    """The session's CSRF token (made on first use)."""
    token = session.get("csrf")
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        session["csrf"] = token
    return token


def csrf_ok() -> bool:
    expected = session.get("csrf")
    sent = request.form.get("csrf_token") or request.headers.get("X-CSRF-Token")
    return isinstance(expected, str) and isinstance(sent, str) and \
        hmac.compare_digest(expected.encode(), sent.encode())


def well_formed(kind: str, name: str, secret: str) -> bool:
    """The cheap pre-check before any hash: a possible user name and a secret of a
    possible length (tokens: printable ASCII without spaces)."""
    if not NAME_RE.fullmatch(name):
        return False
    if kind == "token":
        return TOKEN_MIN <= len(secret) <= TOKEN_MAX and secret.isascii() and \
            secret.isprintable() and " " not in secret
    return 0 < len(secret) <= PASSWORD_MAX


def sessions() -> SessionStore:
    return cast(SessionStore, current_app.extensions["ipvs_sessions"])


def throttle() -> Throttle:
    return cast(Throttle, current_app.extensions["ipvs_throttle"])


def verify(kind: str, name: str, secret: str) -> User | None:
    """Check a password (``kind`` "password") or API token ("token") through the
    throttle; :class:`Throttled` when this account or address must wait."""
    ok_form = well_formed(kind, name, secret)
    g.attempted_user = name
    with throttle().attempt(kind, name if ok_form else "?", request.remote_addr) as att:
        if not ok_form:
            return None
        user = _users().get(name)
        stored = None if user is None else (
            user.password_hash if kind == "password" else user.token_hash)
        if user is None or not stored:
            check_password_hash(_DUMMY_HASH, secret)
            return None
        return user if att.ok(check_password_hash(stored, secret)) else None


def _token_user(header: str) -> User | None:
    scheme, _, cred = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    name, sep, token = cred.strip().partition(":")
    return verify("token", name, token) if sep else None


def _too_many(exc: Throttled) -> ResponseReturnValue:
    message = f"too many failed attempts: retry in {exc.retry_after} s"
    g.refusal = message
    resp = api_error(429, message) if is_api() else (message, 429)
    out = current_app.make_response(resp)
    out.headers["Retry-After"] = str(exc.retry_after)
    return out


def is_api() -> bool:
    return request.path.startswith("/api/") or request.path == "/api"


def api_error(status: int, message: str, **extra: Any) -> ResponseReturnValue:
    return jsonify({"error": message, "status": status, **extra}), status


def load_user() -> ResponseReturnValue | None:
    """``before_request``: authenticate, then check CSRF on unsafe methods."""
    g.user = None
    g.via_token = False
    if request.endpoint in PUBLIC_ENDPOINTS or (
            request.endpoint == "static" and request.view_args is not None
            and request.view_args.get("filename") in PUBLIC_STATIC):
        return None
    header = request.headers.get("Authorization")
    if header:
        try:
            user = _token_user(header)
        except Throttled as exc:
            return _too_many(exc)
        if user is None:
            g.refusal = "invalid API token"
            resp = api_error(401, "invalid API token") if is_api() else ("invalid API "
                                                                         "token", 401)
            return resp
        g.user, g.via_token = user, True
        return None
    user = sessions().check(session.get("sid"), _users())
    if user is None:
        session.pop("sid", None)
        if is_api():
            return api_error(401, "login required (session or Authorization: Bearer "
                                  "NAME:TOKEN)")
        return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))
    g.user = user
    if request.method in UNSAFE_METHODS and not csrf_ok():
        g.refusal = "CSRF token missing or wrong"
        if is_api():
            return api_error(400, "CSRF token missing or wrong (send X-CSRF-Token)")
        abort(400, "CSRF token missing or wrong: reload the page and try again")
    return None


def admin_required(view: F) -> F:
    """403 for readonly users."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        user: User | None = g.get("user")
        if user is None or not user.is_admin:
            g.refusal = "this action needs the admin role"
            if is_api():
                return api_error(403, "this action needs the admin role")
            abort(403, "this action needs the admin role")
        return view(*args, **kwargs)

    return cast(F, wrapper)


def _safe_next(target: str | None) -> str:
    """Only local paths: never redirect a login to another site."""
    home = url_for("pages.overview")
    # Printable ASCII only: no CR/LF (header injection), no spaces, nothing a browser
    # might normalise into another host.
    if not target or not all("!" <= c <= "~" for c in target):
        return home
    try:
        parts = urlsplit(target)
    except ValueError:  # "//[x": not even a URL
        return home
    if parts.scheme or parts.netloc or not target.startswith("/") or \
            target.startswith("//") or "\\" in target:
        return home
    return target


@bp.route("/login", methods=["GET", "POST"])
def login() -> ResponseReturnValue:
    error = None
    status = 200
    if request.method == "POST":
        if not csrf_ok():
            abort(400, "CSRF token missing or wrong: reload the login page")
        name = request.form.get("username", "")
        try:
            user = verify("password", name, request.form.get("password", ""))
        except Throttled as exc:
            current_app.logger.warning("throttled login for %r from %s", name[:64],
                                       request.remote_addr)
            resp = current_app.make_response((render_template(
                "login.html", error=f"Too many failed logins: try again in "
                f"{exc.retry_after} s.", next=request.args.get("next", "")), 429))
            resp.headers["Retry-After"] = str(exc.retry_after)
            g.refusal = f"throttled: retry in {exc.retry_after} s"
            return resp
        if user is not None:
            session.clear()  # a new session: nothing carried over from before login
            session.permanent = True
            session["sid"] = sessions().create(user)
            csrf_token()
            current_app.logger.info("login: %s from %s", user.name, request.remote_addr)
            return redirect(_safe_next(request.args.get("next")))
        current_app.logger.warning("failed login for %r from %s", name[:64],
                                   request.remote_addr)
        error, status = "Wrong user name or password.", 401
        g.refusal = "wrong user name or password"
    return render_template("login.html", error=error,
                           next=request.args.get("next", "")), status


@bp.route("/logout", methods=["POST"])
def logout() -> ResponseReturnValue:
    sessions().end(session.get("sid"))
    session.clear()
    return redirect(url_for("auth.login"))
