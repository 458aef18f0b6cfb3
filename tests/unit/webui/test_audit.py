"""The audit log (issue 23): every refused attempt is in it; the file is private and
follows logrotate; the session key file must be private too."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.security import generate_password_hash

from tests.unit.webui.support import (
    BEARER,
    FAST,
    RID1,
    SID,
    TOKEN,
    audit_entries,
    csrf,
    login,
)
from webui import settings as settings_mod
from webui.audit import AuditLog
from webui.settings import SettingsError

WEIGHT_URL = f"/api/services/{SID}/real-servers/{RID1}/weight"


def _last(app: Flask, logins: bool = False) -> dict[str, Any]:
    return audit_entries(app, logins)[-1]


def test_missing_csrf_token_is_audited(admin: FlaskClient, app: Flask) -> None:
    admin.put(WEIGHT_URL, json={"weight": 3})
    e = _last(app)
    assert (e["user"], e["remote"], e["target"]) == ("alice", "127.0.0.1", WEIGHT_URL)
    assert e["result"] == "refused (400): CSRF token missing or wrong"
    admin.post(f"/services/{SID}/rs/{RID1}/drain", data={"confirm": "yes"})
    assert _last(app)["result"].startswith("refused (400): CSRF token missing or wrong")


def test_readonly_token_refusal_is_audited(client: FlaskClient, app: Flask) -> None:
    client.put(WEIGHT_URL, json={"weight": 3}, headers={"Authorization": f"Bearer peek:{TOKEN}"})
    e = _last(app)
    assert (e["user"], e["role"]) == ("peek", "readonly")
    assert e["result"] == "refused (403): this action needs the admin role"


def test_unknown_field_and_bad_value_are_audited(client: FlaskClient, app: Flask) -> None:
    client.post(f"/api/services/{SID}/real-servers", json={"addr": "192.0.2.13", "colour": 1},
                headers=BEARER)
    e = _last(app)
    assert e["user"] == "bot" and e["result"] == "refused (400): unknown field 'colour'"
    client.put(WEIGHT_URL, json={"weight": "\u00b2"}, headers=BEARER)
    assert _last(app)["result"].startswith("refused (400): weight: must be an integer")


def test_bad_form_value_is_audited_with_its_parameters(admin: FlaskClient, app: Flask) -> None:
    admin.post(f"/services/{SID}/rs", data={"addr": "224.0.0.1", "csrf_token": csrf(admin)})
    e = _last(app)
    assert e["params"] == {"addr": "224.0.0.1"} and "multicast" in e["result"]


def test_failed_and_successful_logins_are_audited(client: FlaskClient, app: Flask) -> None:
    login(client, "alice", "not-her-password")
    e = _last(app, logins=True)
    assert (e["action"], e["user"], e["remote"]) == ("login", "alice", "127.0.0.1")
    assert e["result"] == "refused (401): wrong user name or password"
    assert "not-her-password" not in (Path(app.config["AUDIT_LOG"]).read_text())
    login(client)
    assert _last(app, logins=True)["result"] == "ok"


def test_bad_and_throttled_tokens_are_audited(client: FlaskClient, app: Flask) -> None:
    for i in range(6):
        client.get("/api/services", headers={"Authorization": f"Bearer bot:guess-{i:04}"})
    results = [e["result"] for e in audit_entries(app)]
    assert results[:5] == ["refused (401): invalid API token"] * 5
    assert results[5].startswith("refused (429): too many failed attempts")
    assert _last(app)["user"] == "bot"


def test_a_page_view_without_login_is_not_audited(client: FlaskClient, app: Flask) -> None:
    client.get("/")
    client.get("/api/services")
    assert audit_entries(app, logins=True) == []


# ---- the file ------------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_audit_log_is_0600(tmp_path: Path) -> None:
    log = AuditLog(str(tmp_path / "a" / "audit.log"))
    log.record(user="u", role="admin", remote=None, action="x", target="t", params={},
               result="ok")
    assert _mode(tmp_path / "a" / "audit.log") == 0o600
    log.close()


def test_an_existing_0644_audit_log_is_made_private(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    path.write_text("")
    path.chmod(0o644)
    AuditLog(str(path)).close()
    assert _mode(path) == 0o600


def test_audit_log_with_a_group_is_0640(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    gid = os.getgid()
    AuditLog(str(path), gid=gid).close()
    assert _mode(path) == 0o640 and path.stat().st_gid == gid


def test_audit_log_follows_logrotate(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(str(path))
    log.record(user="u", role="admin", remote=None, action="one", target="t", params={},
               result="ok")
    path.rename(tmp_path / "audit.log.1")  # what logrotate does
    log.record(user="u", role="admin", remote=None, action="two", target="t", params={},
               result="ok")
    assert '"two"' in path.read_text() and '"two"' not in (tmp_path / "audit.log.1").read_text()
    assert _mode(path) == 0o600
    log.close()


def test_audit_log_group_setting(tmp_path: Path) -> None:
    import grp

    h = generate_password_hash("x" * 10, FAST)
    f = tmp_path / "console.yaml"
    base = (f"secret_key_file: key\naudit_log: audit.log\n"
            f"users: [{{name: a, role: admin, password_hash: '{h}'}}]\n")
    f.write_text(base + f"audit_log_group: {grp.getgrgid(os.getgid()).gr_name}\n")
    assert settings_mod.load(str(f)).audit_log_gid == os.getgid()
    f.write_text(base + "audit_log_group: no-such-group-here\n")
    with pytest.raises(SettingsError, match="audit_log_group"):
        settings_mod.load(str(f))


# ---- the session key file ------------------------------------------------------------------


def test_a_key_file_others_can_read_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("k" * 64 + "\n")
    key.chmod(0o644)
    with pytest.raises(SettingsError, match=r"mode 0644.*chmod 600"):
        settings_mod.read_secret_key(str(key))
    key.chmod(0o640)
    with pytest.raises(SettingsError, match="mode 0640"):
        settings_mod.read_secret_key(str(key))
    assert settings_mod.read_secret_key(str(key), shared=True) == b"k" * 64
    key.chmod(0o600)
    assert settings_mod.read_secret_key(str(key)) == b"k" * 64


def test_secret_key_shared_setting(tmp_path: Path) -> None:
    h = generate_password_hash("x" * 10, FAST)
    (tmp_path / "key").write_text("k" * 64 + "\n")
    (tmp_path / "key").chmod(0o640)
    f = tmp_path / "console.yaml"
    base = (f"secret_key_file: key\naudit_log: audit.log\n"
            f"users: [{{name: a, role: admin, password_hash: '{h}'}}]\n")
    f.write_text(base)
    with pytest.raises(SettingsError, match="secret_key_shared"):
        settings_mod.load(str(f))
    f.write_text(base + "secret_key_shared: true\n")
    assert settings_mod.load(str(f)).secret_key == b"k" * 64
