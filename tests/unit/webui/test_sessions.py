"""Server-side sessions (issue 23): logout, password change and user removal end them;
an idle timeout and an absolute lifetime; the cookie alone proves nothing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.security import generate_password_hash

from tests.unit.webui.support import FAST, RID1, SID, Clock, Kernel, csrf, login, weight
from webui import settings as settings_mod
from webui.sessions import SessionStore
from webui.settings import SettingsError, User

COOKIE = "ipvs_console"


def _steal(client: FlaskClient, app: Flask) -> FlaskClient:
    """Another client holding a copy of ``client``'s session cookie."""
    cookie = client.get_cookie(COOKIE)
    assert cookie is not None
    thief = app.test_client()
    thief.set_cookie(COOKIE, cookie.value)
    return thief


def _change_weight(c: FlaskClient, token: str, value: int) -> int:
    return c.put(f"/api/services/{SID}/real-servers/{RID1}/weight", json={"weight": value},
                 headers={"X-CSRF-Token": token}).status_code


def test_an_old_cookie_after_logout_is_refused(app: Flask, admin: FlaskClient,
                                               kernel: Kernel) -> None:
    token = csrf(admin)
    copy = _steal(admin, app)
    assert copy.get("/api/services").status_code == 200  # the copy works while logged in
    admin.post("/logout", data={"csrf_token": token})
    assert copy.get("/api/services").status_code == 401
    assert _change_weight(copy, token, 9) == 401 and weight(kernel) == 5
    assert copy.get("/").status_code == 302


def test_logout_ends_only_that_session(app: Flask, admin: FlaskClient) -> None:
    other = app.test_client()
    login(other)
    admin.post("/logout", data={"csrf_token": csrf(admin)})
    assert other.get("/").status_code == 200


def test_a_password_change_ends_the_users_sessions(app: Flask, admin: FlaskClient) -> None:
    users = app.config["CONSOLE_USERS"]
    users["alice"] = dataclasses.replace(
        users["alice"], password_hash=generate_password_hash("a-new-password", FAST))
    assert admin.get("/api/services").status_code == 401
    assert login(admin, "alice", "a-new-password").status_code == 302
    assert admin.get("/api/services").status_code == 200


def test_a_role_change_ends_the_users_sessions(app: Flask, admin: FlaskClient) -> None:
    users = app.config["CONSOLE_USERS"]
    users["alice"] = dataclasses.replace(users["alice"], role="readonly")
    assert admin.get("/api/services").status_code == 401


def test_a_removed_and_readded_user_does_not_get_the_old_session_back(
        app: Flask, admin: FlaskClient) -> None:
    users = app.config["CONSOLE_USERS"]
    alice = users.pop("alice")
    assert admin.get("/api/services").status_code == 401
    users["alice"] = alice
    assert admin.get("/api/services").status_code == 401


def test_session_ends_after_the_idle_time(admin: FlaskClient, clock: Clock) -> None:
    clock.t += 3599
    assert admin.get("/api/services").status_code == 200
    clock.t += 3599  # counted from the last request
    assert admin.get("/api/services").status_code == 200
    clock.t += 3600
    assert admin.get("/api/services").status_code == 401


def test_session_ends_after_the_absolute_lifetime_however_active(
        admin: FlaskClient, clock: Clock) -> None:
    for _ in range(15):  # a request every 30 minutes for 7.5 hours
        clock.t += 1800
        assert admin.get("/api/services").status_code == 200
    clock.t += 1800
    assert admin.get("/api/services").status_code == 401


def test_the_cookie_is_not_refreshed_on_each_request(admin: FlaskClient) -> None:
    admin.get("/api/whoami")  # makes sure the CSRF token exists
    r = admin.get("/api/services")
    assert "Set-Cookie" not in r.headers


def test_sessions_per_user_are_bounded() -> None:
    store = SessionStore(per_user=3)
    alice = User("alice", "admin", "pbkdf2:sha256:1000$s$h")
    sids = [store.create(alice) for _ in range(10)]
    users = {"alice": alice}
    assert len(store) == 3
    assert store.check(sids[0], users) is None and store.check(sids[-1], users) is alice


def test_end_user_ends_every_session_of_that_user() -> None:
    store = SessionStore()
    alice, bob = User("alice", "admin", "h:1"), User("bob", "admin", "h:2")
    a1, a2, b = store.create(alice), store.create(alice), store.create(bob)
    assert store.end_user("alice") == 2
    users = {"alice": alice, "bob": bob}
    assert store.check(a1, users) is None and store.check(a2, users) is None
    assert store.check(b, users) is bob


def test_session_lifetimes_come_from_the_settings(tmp_path: Path) -> None:
    h = generate_password_hash("x" * 10, FAST)
    f = tmp_path / "console.yaml"
    f.write_text(f"secret_key_file: key\naudit_log: audit.log\nsession_idle_minutes: 15\n"
                 f"session_lifetime_hours: 2\n"
                 f"users: [{{name: a, role: admin, password_hash: '{h}'}}]\n")
    st = settings_mod.load(str(f))
    assert (st.session_idle, st.session_lifetime) == (900, 7200)
    f.write_text(f.read_text().replace("session_idle_minutes: 15", "session_idle_minutes: 0"))
    with pytest.raises(SettingsError, match="session_idle_minutes"):
        settings_mod.load(str(f))
