"""The application factory: settings in, a configured Flask app out."""

from __future__ import annotations

import datetime
from typing import Any

from flask import Flask, Response, abort, g, jsonify, render_template, request
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from ipvs_synproxy.kernel import stats
from webui import api, auth, metrics, pages
from webui.actions import audit_refusal
from webui.audit import AuditLog
from webui.service import ConsoleError, ConsoleService, FloodThreshold
from webui.sessions import SessionStore
from webui.settings import Settings, check_users, host_name, trusted_hosts
from webui.throttle import Throttle

# Sent on every HTTPS response: a year, no includeSubDomains (the names around us are
# not ours to pin).
HSTS = "max-age=31536000"
# No inline script or style anywhere: the CSP allows only this origin's files.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


def build(settings: Settings, service: ConsoleService | None = None) -> Flask:
    check_users(settings.users)  # never run without credentials
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=settings.secret_key,
        SESSION_COOKIE_NAME="ipvs_console",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_SECURE=settings.session_cookie_secure,
        # The cookie's own expiry does not slide; the server-side session (webui/sessions.py)
        # ends after the idle time or the absolute lifetime, whichever comes first.
        PERMANENT_SESSION_LIFETIME=datetime.timedelta(seconds=settings.session_lifetime),
        SESSION_REFRESH_EACH_REQUEST=False,
        MAX_CONTENT_LENGTH=64 * 1024,
        CONSOLE_USERS=dict(settings.users),
        CONSOLE_NETNS=settings.netns,
        AUDIT_LOG=settings.audit_log,
    )
    app.config.update(settings.extra)
    app.extensions["ipvs_console"] = service or ConsoleService.for_netns(
        settings.netns, allow_loopback=settings.allow_loopback_real_servers,
        flood=FloodThreshold(syn_rate=settings.flood_syn_rate,
                             valid_ack_ratio=settings.flood_valid_ack_ratio))
    app.extensions["ipvs_audit"] = AuditLog(settings.audit_log, settings.audit_log_gid)
    app.extensions["ipvs_sessions"] = SessionStore(idle=settings.session_idle,
                                                   lifetime=settings.session_lifetime)
    app.extensions["ipvs_throttle"] = Throttle(
        protected=lambda name: name in app.config["CONSOLE_USERS"])
    app.extensions["ipvs_metrics"] = metrics.make_registry(app.extensions["ipvs_console"])

    hosts = trusted_hosts(settings)

    @app.before_request
    def _trusted_host() -> None:
        # Before anything else, /metrics and the login page included: a page reached
        # through a DNS name that is not ours (DNS rebinding) gets nothing.
        if host_name(request.host) not in hosts:
            abort(400, "this console does not answer to that host name (trusted_hosts)")

    app.before_request(auth.load_user)
    app.register_blueprint(auth.bp)
    app.register_blueprint(pages.bp)
    app.register_blueprint(api.bp, url_prefix="/api")
    app.register_blueprint(metrics.bp)
    app.jinja_env.globals["csrf_token"] = auth.csrf_token
    app.jinja_env.autoescape = True
    app.jinja_env.filters["human"] = stats.human

    app.after_request(audit_refusal)

    @app.after_request
    def _headers(resp: Response) -> Response:
        resp.headers.setdefault("Content-Security-Policy", CSP)
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["X-Frame-Options"] = "DENY"
        resp.headers["Referrer-Policy"] = "same-origin"
        if request.is_secure:  # served over TLS (ours, or a trusted proxy's)
            resp.headers["Strict-Transport-Security"] = HSTS
        if request.endpoint != "static":
            resp.headers.setdefault("Cache-Control", "no-store")
        return resp

    @app.errorhandler(ConsoleError)
    def _console_error(exc: ConsoleError) -> ResponseReturnValue:
        g.refusal = exc.message
        return _error(exc.status, exc.message, exc.field)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> ResponseReturnValue:
        g.refusal = exc.description or exc.name
        resp = app.make_response(_error(exc.code or 500, exc.description or exc.name, None))
        if exc.response is None:  # keep the headers werkzeug meant to send (405: Allow)
            for name, value in exc.get_headers():
                if name.lower() != "content-type":
                    resp.headers[name] = value
        return resp

    if settings.trusted_proxies:
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=settings.trusted_proxies, x_proto=settings.trusted_proxies,
            x_host=settings.trusted_proxies)
    return app


def _error(status: int, message: str, field: str | None) -> ResponseReturnValue:
    if auth.is_api():
        body: dict[str, Any] = {"error": message, "status": status}
        if field:
            body["field"] = field
        return jsonify(body), status
    return render_template("error.html", status=status, message=message), status
