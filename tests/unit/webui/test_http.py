"""The console at the HTTP edge (issue 23): trusted Host names, the request body limit
in the server (test_listen.py), X-Forwarded-* only from configured proxies."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.security import generate_password_hash

from ipvs_synproxy.kernel.sysctl import Sysctls
from tests.unit.webui.support import BEARER, FAST, RID1, SID, Kernel, audit_entries, make_users
from webui import create_app
from webui import settings as settings_mod
from webui.service import ConsoleService
from webui.settings import Settings, SettingsError


@pytest.fixture
def make_app(tmp_path: Path, kernel: Kernel) -> Iterator[Any]:
    apps: list[Flask] = []

    def make(**kw: Any) -> Flask:
        st = Settings(users=make_users(), secret_key=b"k" * 32,
                      audit_log=str(tmp_path / "audit.log"), extra={"TESTING": True})
        a = create_app(dataclasses.replace(st, **kw),
                       ConsoleService(lambda: kernel, Sysctls(root=str(tmp_path))))
        apps.append(a)
        return a

    yield make
    for a in apps:
        a.extensions["ipvs_audit"].close()


@pytest.mark.parametrize("path", ["/login", "/metrics", "/api/services", "/static/style.css"])
def test_a_foreign_host_name_gets_400_everywhere(client: FlaskClient, path: str) -> None:
    r = client.get(path, headers={"Host": "rebind.evil.example"})
    assert r.status_code == 400 and b"trusted_hosts" in r.data


@pytest.mark.parametrize("host", ["localhost", "localhost:8080", "127.0.0.1:8080",
                                  "[::1]:8080", "LOCALHOST"])
def test_loopback_host_names_are_trusted_by_default(client: FlaskClient, host: str) -> None:
    assert client.get("/metrics", headers={"Host": host}).status_code == 200


def test_the_listen_address_is_trusted_and_configured_names_replace_the_default(
        make_app: Any) -> None:
    c = make_app(listen=("192.0.2.5", 8080)).test_client()
    assert c.get("/metrics", headers={"Host": "192.0.2.5:8080"}).status_code == 200
    c = make_app(trusted_hosts=("lb1.example.net", "[2001:db8::5]")).test_client()
    assert c.get("/metrics", headers={"Host": "lb1.example.net"}).status_code == 200
    assert c.get("/metrics", headers={"Host": "[2001:db8::5]:443"}).status_code == 200
    assert c.get("/metrics", headers={"Host": "localhost"}).status_code == 400


def test_an_unspecified_listen_address_adds_no_host_name(make_app: Any) -> None:
    c = make_app(listen=("0.0.0.0", 8080)).test_client()
    assert c.get("/metrics", headers={"Host": "0.0.0.0:8080"}).status_code == 400


def test_x_forwarded_for_is_ignored_without_trusted_proxies(client: FlaskClient,
                                                            app: Flask) -> None:
    client.post(f"/api/services/{SID}/real-servers/{RID1}/drain",
                headers={**BEARER, "X-Forwarded-For": "203.0.113.9"})
    assert audit_entries(app)[-1]["remote"] == "127.0.0.1"


def test_x_forwarded_for_is_believed_from_the_configured_proxy(make_app: Any) -> None:
    a = make_app(trusted_proxies=1)
    a.test_client().post(f"/api/services/{SID}/real-servers/{RID1}/drain",
                         headers={**BEARER, "X-Forwarded-For": "198.51.100.1, 203.0.113.9"})
    assert audit_entries(a)[-1]["remote"] == "203.0.113.9"  # the one our proxy added


def test_trusted_hosts_and_proxies_from_the_settings_file(tmp_path: Path) -> None:
    h = generate_password_hash("x" * 10, FAST)
    f = tmp_path / "console.yaml"
    base = (f"secret_key_file: key\naudit_log: audit.log\n"
            f"users: [{{name: a, role: admin, password_hash: '{h}'}}]\n")
    f.write_text(base + "trusted_hosts: [lb1.example.net, '[2001:db8::5]']\n"
                        "trusted_proxies: 1\n")
    st = settings_mod.load(str(f))
    assert st.trusted_hosts == ("lb1.example.net", "[2001:db8::5]")
    assert st.trusted_proxies == 1
    for bad in ("trusted_hosts: lb1\n", "trusted_hosts: ['a b']\n", "trusted_hosts: []\n",
                "trusted_proxies: -1\n", "trusted_proxies: yes\n"):
        f.write_text(base + bad)
        with pytest.raises(SettingsError, match="trusted_"):
            settings_mod.load(str(f))


def test_405_keeps_allow(admin: FlaskClient) -> None:
    r = admin.get(f"/services/{SID}/rs")  # a POST-only form action
    assert r.status_code == 405 and "POST" in r.headers["Allow"]
    r = admin.delete("/api/services", headers=BEARER)
    assert r.status_code == 405 and r.get_json()["status"] == 405
    assert set(r.headers["Allow"].replace(" ", "").split(",")) == {"GET", "HEAD", "OPTIONS"}


def test_an_oversized_form_is_a_413_and_audited(client: FlaskClient, app: Flask) -> None:
    # the audit of the refusal must not read the body again (it raised: a 500)
    r = client.post("/login", data=b"x" * 70_000,
                    content_type="application/x-www-form-urlencoded")
    assert r.status_code == 413
    entry = audit_entries(app, logins=True)[-1]
    assert entry["result"].startswith("refused (413)") and entry["params"] == {}
