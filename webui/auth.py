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
import threading
import time
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

from webui.settings import User

bp = Blueprint("auth", __name__)

PUBLIC_ENDPOINTS = frozenset({"auth.login", "metrics.metrics"})
PUBLIC_STATIC = frozenset({"style.css"})  # the login page's look; no data in it
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Compared against when the user does not exist, so a wrong name costs as much
# time as a wrong password.
_DUMMY_HASH = generate_password_hash(secrets.token_hex(16))

F = TypeVar("F", bound=Callable[..., Any])


class LoginThrottle:
    """At most ``limit`` failed logins per client address per ``window`` seconds;
    further attempts get 429 without a password check until the window passes."""

    def __init__(self, limit: int = 5, window: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window, self.clock = limit, window, clock
        self.lock = threading.Lock()
        self.failures: dict[str, list[float]] = {}

    def _recent(self, who: str) -> list[float]:
        now = self.clock()
        recent = [t for t in self.failures.get(who, []) if now - t < self.window]
        if recent:
            self.failures[who] = recent
        else:
            self.failures.pop(who, None)
        return recent

    def blocked(self, who: str) -> bool:
        with self.lock:
            return len(self._recent(who)) >= self.limit

    def failed(self, who: str) -> None:
        with self.lock:
            self.failures[who] = [*self._recent(who), self.clock()]

    def succeeded(self, who: str) -> None:
        with self.lock:
            self.failures.pop(who, None)


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


def check_password(name: str, password: str) -> User | None:
    user = _users().get(name)
    if user is None or not user.password_hash:
        check_password_hash(_DUMMY_HASH, password)
        return None
    return user if check_password_hash(user.password_hash, password) else None


def _token_user(header: str) -> User | None:
    scheme, _, cred = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    name, sep, token = cred.strip().partition(":")
    user = _users().get(name) if sep else None
    if user is None or not user.token_hash:
        check_password_hash(_DUMMY_HASH, token)
        return None
    return user if check_password_hash(user.token_hash, token) else None


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
        user = _token_user(header)
        if user is None:
            resp = api_error(401, "invalid API token") if is_api() else ("invalid API "
                                                                         "token", 401)
            return resp
        g.user, g.via_token = user, True
        return None
    name = session.get("user")
    user = _users().get(name) if isinstance(name, str) else None
    if user is None:
        session.pop("user", None)
        if is_api():
            return api_error(401, "login required (session or Authorization: Bearer "
                                  "NAME:TOKEN)")
        return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))
    g.user = user
    if request.method in UNSAFE_METHODS and not csrf_ok():
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
            if is_api():
                return api_error(403, "this action needs the admin role")
            abort(403, "this action needs the admin role")
        return view(*args, **kwargs)

    return cast(F, wrapper)


def _safe_next(target: str | None) -> str:
    """Only local paths: never redirect a login to another site."""
    if not target:
        return url_for("pages.overview")
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or \
            target.startswith("//") or "\\" in target:
        return url_for("pages.overview")
    return target


@bp.route("/login", methods=["GET", "POST"])
def login() -> ResponseReturnValue:
    error = None
    status = 200
    if request.method == "POST":
        if not csrf_ok():
            abort(400, "CSRF token missing or wrong: reload the login page")
        throttle = cast(LoginThrottle, current_app.extensions["ipvs_login_throttle"])
        who = request.remote_addr or "?"
        if throttle.blocked(who):
            return render_template("login.html", error="Too many failed logins: wait a few "
                                   "minutes.", next=request.args.get("next", "")), 429
        name = request.form.get("username", "")
        user = check_password(name, request.form.get("password", ""))
        if user is not None:
            throttle.succeeded(who)
            session.clear()  # a new session: nothing carried over from before login
            session.permanent = True
            session["user"] = user.name
            csrf_token()
            current_app.logger.info("login: %s from %s", user.name, request.remote_addr)
            return redirect(_safe_next(request.args.get("next")))
        current_app.logger.warning("failed login for %r from %s", name[:64],
                                   request.remote_addr)
        throttle.failed(who)
        error, status = "Wrong user name or password.", 401
    return render_template("login.html", error=error,
                           next=request.args.get("next", "")), status


@bp.route("/logout", methods=["POST"])
def logout() -> ResponseReturnValue:
    session.clear()
    return redirect(url_for("auth.login"))
