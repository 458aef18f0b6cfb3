"""The web console with Flask's test client, backed by the in-memory kernel stand-in."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.security import generate_password_hash

from ipvs_synproxy.cli import main as cli
from ipvs_synproxy.kernel.model import FwdMethod
from ipvs_synproxy.kernel.sysctl import Sysctls
from tests.unit.fake_ipvs import FakeKernel
from tests.unit.webui.support import (
    API_ACTIONS,
    API_GETS,
    BEARER,
    FAST,
    FORM_ACTIONS,
    PAGES,
    PASSWORDS,
    RID1,
    SID,
    SID6,
    SVC,
    TOKEN,
    UDP_SID,
    Clock,
    Kernel,
    audit_entries,
    csrf,
    login,
    make_users,
    proxy_protocol,
    weight,
)
from webui import create_app
from webui import settings as settings_mod
from webui.service import ConsoleService, parse_proc_stats
from webui.settings import Settings, SettingsError, User

# ---- refusing to run without credentials ---------------------------------------------------


def test_app_refuses_to_start_without_users(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="no users configured"):
        create_app(Settings(users={}, secret_key=b"k" * 32,
                            audit_log=str(tmp_path / "a.log")))


def test_settings_file_without_users_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    f = tmp_path / "console.yaml"
    f.write_text("secret_key_file: key\naudit_log: audit.log\n")
    with pytest.raises(SettingsError, match="never starts with a default login"):
        settings_mod.load(str(f))


def test_cli_webui_without_users_exits_1_naming_the_problem(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "console.yaml"
    f.write_text("secret_key_file: key\naudit_log: audit.log\nusers: []\n")
    assert cli.main(["webui", "--config", str(f)]) == 1
    assert "no users configured" in capsys.readouterr().err


def test_cli_webui_needs_a_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["webui"]) == 2
    assert "--config" in capsys.readouterr().err


def test_cli_hash_password_prints_a_werkzeug_hash(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import io

    from werkzeug.security import check_password_hash

    monkeypatch.setattr("sys.stdin", io.StringIO("correct horse battery\n"))
    assert cli.main(["webui", "--hash-password"]) == 0
    assert check_password_hash(capsys.readouterr().out.strip(), "correct horse battery")


def test_cli_webui_refuses_a_bad_listen_address(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    h = generate_password_hash("x" * 10, FAST)
    f = tmp_path / "console.yaml"
    f.write_text(f"secret_key_file: key\naudit_log: audit.log\n"
                 f"users: [{{name: a, role: admin, password_hash: '{h}'}}]\n")
    assert cli.main(["webui", "--config", str(f), "--listen", "localhost:80"]) == 1
    assert "not an IP address" in capsys.readouterr().err


def test_clear_text_password_in_settings_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "console.yaml"
    f.write_text("secret_key_file: key\naudit_log: audit.log\n"
                 "users: [{name: a, role: admin, password_hash: hunter2}]\n")
    with pytest.raises(SettingsError, match="not a password hash"):
        settings_mod.load(str(f))


def test_settings_load_defaults_and_secret_key_file(tmp_path: Path) -> None:
    h = generate_password_hash("x" * 10, FAST)
    f = tmp_path / "console.yaml"
    f.write_text(f"secret_key_file: key\naudit_log: log/audit.log\nnetns: lb\n"
                 f"users: [{{name: alice, role: admin, password_hash: '{h}'}}]\n")
    st = settings_mod.load(str(f))
    assert st.listen == ("127.0.0.1", 8080)  # loopback unless asked otherwise
    assert st.netns == "lb" and st.users["alice"].is_admin
    key = tmp_path / "key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(st.secret_key) >= 32
    assert settings_mod.load(str(f)).secret_key == st.secret_key  # kept, not remade


@pytest.mark.parametrize(("text", "expected"), [("127.0.0.1:8080", ("127.0.0.1", 8080)),
                                                ("[::1]:9000", ("::1", 9000)),
                                                ("0.0.0.0:8080", ("0.0.0.0", 8080))])
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert settings_mod.parse_listen(text) == expected


@pytest.mark.parametrize("text", ["8080", "localhost:80", "127.0.0.1:0", "127.0.0.1:x",
                                  "[::1]8080"])
def test_parse_listen_rejects(text: str) -> None:
    with pytest.raises(SettingsError):
        settings_mod.parse_listen(text)


def test_unknown_role_is_refused() -> None:
    with pytest.raises(SettingsError, match="role"):
        settings_mod.check_users({"x": User("x", "root", "pbkdf2:sha256:1$a$b")})


def test_webui_subcommand_is_registered() -> None:
    args = cli.build_parser().parse_args(["webui", "--config", "c.yaml", "--listen",
                                          "127.0.0.1:8081", "--netns", "lb"])
    assert (args.config, args.listen, args.netns) == ("c.yaml", "127.0.0.1:8081", "lb")


# ---- login, logout, sessions ----------------------------------------------------------------


@pytest.mark.parametrize("path", PAGES)
def test_pages_redirect_to_login_without_a_session(client: FlaskClient, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 302 and "/login" in r.headers["Location"]


@pytest.mark.parametrize("path", API_GETS)
def test_api_needs_authentication(client: FlaskClient, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 401 and "login required" in r.get_json()["error"]


def test_static_script_needs_login_but_login_stylesheet_does_not(client: FlaskClient) -> None:
    assert client.get("/static/charts.js").status_code == 302
    assert client.get("/static/style.css").status_code == 200


def test_metrics_need_no_login(client: FlaskClient) -> None:
    assert client.get("/metrics").status_code == 200


def test_login_then_pages_then_logout(client: FlaskClient) -> None:
    r = login(client)
    assert r.status_code == 302 and r.headers["Location"] == "/"
    assert client.get("/").status_code == 200
    r = client.post("/logout", data={"csrf_token": csrf(client)})
    assert r.status_code == 302
    assert client.get("/").status_code == 302


def test_logout_needscsrf(admin: FlaskClient) -> None:
    assert admin.post("/logout").status_code == 400
    assert admin.get("/").status_code == 200  # still logged in


def test_wrong_password_is_refused(client: FlaskClient) -> None:
    r = login(client, "alice", "not-her-password")
    assert r.status_code == 401 and b"Wrong user name or password" in r.data
    assert client.get("/").status_code == 302


def test_unknown_user_is_refused_the_same_way(client: FlaskClient) -> None:
    r = login(client, "mallory", "whatever-password")
    assert r.status_code == 401 and b"Wrong user name or password" in r.data


def test_repeated_wrong_passwords_are_throttled(client: FlaskClient) -> None:
    for _ in range(5):
        assert login(client, "alice", "guess-guess").status_code == 401
    r = login(client)  # even the right password waits now
    assert r.status_code == 429 and b"Too many failed logins" in r.data
    assert client.get("/").status_code == 302


def test_token_only_user_cannot_log_in_with_a_password(client: FlaskClient) -> None:
    assert login(client, "bot", TOKEN).status_code == 401


def test_login_without_csrf_token_is_400(client: FlaskClient) -> None:
    client.get("/login")
    r = client.post("/login", data={"username": "alice", "password": PASSWORDS["alice"]})
    assert r.status_code == 400
    assert client.get("/").status_code == 302


def test_login_redirects_back_to_a_local_page_only(client: FlaskClient) -> None:
    client.get("/login")
    data = {"username": "alice", "password": PASSWORDS["alice"], "csrf_token": csrf(client)}
    r = client.post("/login?next=/sysctl", data=data)
    assert r.headers["Location"] == "/sysctl"
    client.post("/logout", data={"csrf_token": csrf(client)})
    client.get("/login")
    data["csrf_token"] = csrf(client)
    r = client.post("/login?next=//evil.example/x", data=data)
    assert r.headers["Location"] == "/"


def test_session_cookie_is_httponly_and_samesite(client: FlaskClient) -> None:
    r = login(client)
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie


def test_pages_send_security_headers(admin: FlaskClient) -> None:
    r = admin.get("/")
    assert "script-src 'self'" in r.headers["Content-Security-Policy"]
    assert r.headers["X-Frame-Options"] == "DENY"


def test_user_removed_from_settings_loses_the_session(app: Flask, admin: FlaskClient) -> None:
    del app.config["CONSOLE_USERS"]["alice"]
    assert admin.get("/").status_code == 302


def test_api_token_authenticates_withoutcsrf(client: FlaskClient, kernel: Kernel) -> None:
    r = client.get("/api/whoami", headers=BEARER)
    assert r.get_json() == {"user": "bot", "role": "admin"}
    r = client.put(f"/api/services/{SID}/real-servers/{RID1}/weight", json={"weight": 9},
                   headers=BEARER)
    assert r.status_code == 200 and weight(kernel) == 9


@pytest.mark.parametrize("header", ["Bearer bot:wrong", "Bearer nobody:" + TOKEN,
                                    "Bearer " + TOKEN, "Basic Ym90OnRva2Vu"])
def test_bad_api_token_is_401(client: FlaskClient, header: str) -> None:
    r = client.get("/api/services", headers={"Authorization": header})
    assert r.status_code == 401


# ---- pages ---------------------------------------------------------------------------------


def test_overview_shows_services_with_rates_connections_and_health(admin: FlaskClient) -> None:
    html = admin.get("/").get_data(as_text=True)
    assert "198.51.100.10:80/tcp" in html and "[2001:db8:1::10]:443/tcp" in html
    assert "wrr" in html and "fullnat" in html
    assert "4000 / 9000" in html  # BPS in/out
    assert "192.0.2.11:80 up" in html and "192.0.2.12:80 drained" in html


def test_service_page_shows_real_servers_and_laddr_usage(admin: FlaskClient) -> None:
    html = admin.get(f"/services/{SID}").get_data(as_text=True)
    assert "192.0.2.11:80" in html and "192.0.2.100" in html
    assert "1.0 %" in html  # 644 connections of 64512 ports
    assert "Set weight" in html and "Drain" in html


def test_readonly_user_sees_no_action_forms(reader: FlaskClient) -> None:
    html = reader.get(f"/services/{SID}").get_data(as_text=True)
    assert "Set weight" not in html and "Drain" not in html and "Add a real server" not in html


def test_unknown_service_page_is_404(admin: FlaskClient) -> None:
    assert admin.get("/services/tcp_198.51.100.99_80").status_code == 404
    assert admin.get("/api/services/nonsense").status_code == 404


def test_synproxy_page_loads_the_chart_script(admin: FlaskClient) -> None:
    html = admin.get("/synproxy").get_data(as_text=True)
    assert 'src="/static/charts.js"' in html and 'data-src="/api/ext-stats"' in html
    assert "fullnat_conn_new" in html
    assert "<script>" not in html  # no inline script (the CSP forbids it)
    js = admin.get("/static/charts.js").get_data(as_text=True)
    assert "createElementNS" in js and "setInterval" in js


def test_sysctl_page_lists_knobs_with_defaults(admin: FlaskClient) -> None:
    html = admin.get("/sysctl").get_data(as_text=True)
    assert "net.ipv4.vs.conntrack" in html and "not present" in html
    assert "3 50" in html


# ---- API reads -----------------------------------------------------------------------------


def test_api_services(admin: FlaskClient) -> None:
    data = admin.get("/api/services").get_json()
    ids = [s["id"] for s in data["services"]]
    assert ids == [SID, SID6, UDP_SID]
    svc = data["services"][0]
    assert svc["stats"]["cps"] == 3 and svc["active_conns"] == 4 and svc["synproxy"] is False
    assert svc["real_servers"][0]["weight"] == 5


def test_api_service_detail(admin: FlaskClient) -> None:
    data = admin.get(f"/api/services/{SID}").get_json()
    assert data["laddrs"] == [{"addr": "192.0.2.100", "conns": 644, "port_conflicts": 1,
                               "ports": 64512, "usage_percent": 1.0}]


def test_api_ext_stats_rates_per_second(admin: FlaskClient, kernel: Kernel,
                                        clock: Clock) -> None:
    first = admin.get("/api/ext-stats").get_json()
    assert first["available"] and first["totals"]["fullnat_conn_new"] == 100
    kernel.ext["fullnat_conn_new"] = 160
    clock.t += 2.0
    second = admin.get("/api/ext-stats").get_json()
    assert second["rates"]["fullnat_conn_new"] == 30.0


def test_api_sysctl(admin: FlaskClient) -> None:
    knobs = {k["name"]: k for k in admin.get("/api/sysctl").get_json()["sysctls"]}
    assert knobs["net.ipv4.vs.conntrack"]["value"] == "1"
    assert knobs["net.ipv4.vs.conntrack"]["changed"] is True
    assert knobs["net.ipv4.vs.secure_tcp"]["present"] is False


def test_openapi_documents_every_api_route(app: Flask, admin: FlaskClient) -> None:
    doc = admin.get("/api/openapi.json").get_json()
    assert doc["openapi"].startswith("3.")
    documented = {(path, method.upper()) for path, ops in doc["paths"].items()
                  for method in ops}
    routed = set()
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/api/"):
            path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
            routed |= {(path, m) for m in rule.methods or () if m not in ("HEAD", "OPTIONS")}
    assert documented == routed


def test_whoami_gives_the_session_csrf_token(admin: FlaskClient) -> None:
    data = admin.get("/api/whoami").get_json()
    assert data["user"] == "alice" and data["csrf_token"] == csrf(admin)


# ---- actions: confirmation, audit ----------------------------------------------------------


def test_weight_change_asks_for_confirmation_first(admin: FlaskClient, kernel: Kernel,
                                                   app: Flask) -> None:
    r = admin.post(f"/services/{SID}/rs/{RID1}/weight",
                   data={"weight": "7", "csrf_token": csrf(admin)})
    assert r.status_code == 200 and b"from 5 to 7" in r.data and b'value="yes"' in r.data
    assert weight(kernel) == 5 and audit_entries(app) == []
    r = admin.post(f"/services/{SID}/rs/{RID1}/weight",
                   data={"weight": "7", "confirm": "yes", "csrf_token": csrf(admin)})
    assert r.status_code == 302 and weight(kernel) == 7
    assert b"set to 7" in admin.get(r.headers["Location"]).data


def test_drain_sets_weight_zero_after_confirmation(admin: FlaskClient, kernel: Kernel) -> None:
    url = f"/services/{SID}/rs/{RID1}/drain"
    assert b"weight 5" in admin.post(url, data={"csrf_token": csrf(admin)}).data
    assert weight(kernel) == 5
    admin.post(url, data={"confirm": "yes", "csrf_token": csrf(admin)})
    assert weight(kernel) == 0


def test_add_and_remove_real_server(admin: FlaskClient, kernel: Kernel) -> None:
    add = {"addr": "192.0.2.13", "port": "", "weight": "3", "forward": "",
           "csrf_token": csrf(admin)}
    assert b"Add real server" in admin.post(f"/services/{SID}/rs", data=add).data
    assert weight(kernel, rid="192.0.2.13_80") is None
    admin.post(f"/services/{SID}/rs", data={**add, "confirm": "yes"})
    new = [d for d in kernel.dests(SVC) if str(d.addr) == "192.0.2.13"]
    assert new and new[0].weight == 3 and new[0].port == 80 and new[0].fwd == FwdMethod.FULLNAT
    admin.post(f"/services/{SID}/rs/192.0.2.13_80/delete",
               data={"confirm": "yes", "csrf_token": csrf(admin)})
    assert weight(kernel, rid="192.0.2.13_80") is None


def test_toggle_synproxy(admin: FlaskClient, kernel: Kernel) -> None:
    url = f"/services/{SID}/synproxy"
    assert b"Turn the SYN proxy on" in admin.post(
        url, data={"enabled": "on", "csrf_token": csrf(admin)}).data
    assert not kernel.services()[0].synproxy
    admin.post(url, data={"enabled": "on", "confirm": "yes", "csrf_token": csrf(admin)})
    assert kernel.services()[0].synproxy


def test_actions_are_audit_logged_with_user_action_and_time(admin: FlaskClient,
                                                            app: Flask) -> None:
    admin.post(f"/services/{SID}/rs/{RID1}/weight",
               data={"weight": "8", "confirm": "yes", "csrf_token": csrf(admin)})
    (entry,) = audit_entries(app)
    assert entry["user"] == "alice" and entry["role"] == "admin"
    assert entry["action"] == "set_weight" and entry["target"] == f"{SID}/{RID1}"
    assert entry["params"] == {"weight": 8} and entry["result"] == "ok"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", entry["time"])


def test_api_actions_are_audit_logged_with_the_token_user(client: FlaskClient,
                                                          app: Flask) -> None:
    client.post(f"/api/services/{SID}/real-servers/{RID1}/drain", headers=BEARER)
    (entry,) = audit_entries(app)
    assert (entry["user"], entry["action"], entry["result"]) == ("bot", "drain", "ok")


def test_refused_kernel_change_is_audit_logged(admin: FlaskClient, app: Flask) -> None:
    r = admin.post(f"/api/services/{SID}/real-servers", json={"addr": "192.0.2.11",
                                                               "port": 80},
                   headers={"X-CSRF-Token": csrf(admin)})
    assert r.status_code == 409
    (entry,) = audit_entries(app)
    assert entry["action"] == "add_real_server" and entry["result"].startswith("refused (409)")


@pytest.mark.parametrize(("method", "url", "body"), API_ACTIONS)
def test_api_actions_with_session_andcsrf(admin: FlaskClient, kernel: Kernel,
                                           method: str, url: str, body: Any) -> None:
    before = kernel.state()
    r = admin.open(url, method=method, json=body, headers={"X-CSRF-Token": csrf(admin)})
    assert r.status_code in (200, 201), r.get_json()
    assert kernel.state() != before


# ---- roles and CSRF ------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "data"), FORM_ACTIONS)
def test_readonly_user_gets_403_on_form_actions(reader: FlaskClient, kernel: Kernel,
                                                app: Flask, url: str,
                                                data: dict[str, str]) -> None:
    before = kernel.state()
    r = reader.post(url, data={**data, "confirm": "yes", "csrf_token": csrf(reader)})
    assert r.status_code == 403
    assert kernel.state() == before
    (entry,) = audit_entries(app)  # refused, and logged as such
    assert entry["user"] == "bob" and entry["result"].startswith("refused (403)")


@pytest.mark.parametrize(("method", "url", "body"), API_ACTIONS)
def test_readonly_token_gets_403_on_api_actions(client: FlaskClient, kernel: Kernel,
                                                method: str, url: str, body: Any) -> None:
    before = kernel.state()
    r = client.open(url, method=method, json=body,
                    headers={"Authorization": f"Bearer peek:{TOKEN}"})
    assert r.status_code == 403 and "admin role" in r.get_json()["error"]
    assert kernel.state() == before


@pytest.mark.parametrize(("url", "data"), FORM_ACTIONS)
@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_form_actions_without_the_right_csrf_token_are_400(
        admin: FlaskClient, kernel: Kernel, url: str, data: dict[str, str],
        token: str | None) -> None:
    before = kernel.state()
    form = {**data, "confirm": "yes"}
    if token is not None:
        form["csrf_token"] = token
    r = admin.post(url, data=form)
    assert r.status_code == 400 and b"CSRF" in r.data
    assert kernel.state() == before


@pytest.mark.parametrize(("method", "url", "body"), API_ACTIONS)
def test_api_actions_on_a_session_without_csrf_header_are_400(
        admin: FlaskClient, kernel: Kernel, method: str, url: str, body: Any) -> None:
    before = kernel.state()
    r = admin.open(url, method=method, json=body)
    assert r.status_code == 400 and "CSRF" in r.get_json()["error"]
    assert kernel.state() == before


def test_csrf_token_of_another_session_is_refused(app: Flask, kernel: Kernel) -> None:
    a, b = app.test_client(), app.test_client()
    login(a)
    login(b)
    r = a.post(f"/services/{SID}/rs/{RID1}/drain",
               data={"confirm": "yes", "csrf_token": csrf(b) + "x"})
    assert r.status_code == 400 and weight(kernel) == 5


# ---- bad input ----------------------------------------------------------------------------


BAD_WEIGHTS = ["-1", "2147483648", "99999999999", "abc", "", "1.5", "0x10", " ", "1e3"]


@pytest.mark.parametrize("bad", BAD_WEIGHTS)
def test_bad_weight_in_form_is_400_and_changes_nothing(admin: FlaskClient, kernel: Kernel,
                                                       app: Flask, bad: str) -> None:
    before = kernel.state()
    for confirm in ({}, {"confirm": "yes"}):
        r = admin.post(f"/services/{SID}/rs/{RID1}/weight",
                       data={"weight": bad, "csrf_token": csrf(admin), **confirm})
        assert r.status_code == 400 and b"weight" in r.data
    assert kernel.state() == before
    assert [e["result"][:13] for e in audit_entries(app)] == ["refused (400)"] * 2


@pytest.mark.parametrize("bad", [-1, 2**31, "abc", None, True, 1.5, [], "2147483648"])
def test_bad_weight_in_api_is_400_and_changes_nothing(client: FlaskClient, kernel: Kernel,
                                                      bad: Any) -> None:
    before = kernel.state()
    r = client.put(f"/api/services/{SID}/real-servers/{RID1}/weight", json={"weight": bad},
                   headers=BEARER)
    assert r.status_code == 400
    body = r.get_json()
    assert body["field"] == "weight" and "0-2147483647" in body["error"]
    assert kernel.state() == before


@pytest.mark.parametrize("weight_value", [0, 65535, 70000, 2**31 - 1])
def test_weight_range_ends_are_accepted(client: FlaskClient, kernel: Kernel,
                                        weight_value: int) -> None:
    r = client.put(f"/api/services/{SID}/real-servers/{RID1}/weight",
                   json={"weight": weight_value}, headers=BEARER)
    assert r.status_code == 200 and weight(kernel) == weight_value


@pytest.mark.parametrize(("sid", "rid"), [("tcp_198.51.100.99_80", RID1),
                                          ("nonsense", RID1),
                                          (SID, "192.0.2.99_80"),
                                          (SID, "not-an-rs"),
                                          (SID, "192.0.2.11_99999")])
def test_unknown_service_or_real_server_is_400(admin: FlaskClient, client: FlaskClient,
                                               kernel: Kernel, sid: str, rid: str) -> None:
    before = kernel.state()
    r = admin.post(f"/services/{sid}/rs/{rid}/weight",
                   data={"weight": "3", "confirm": "yes", "csrf_token": csrf(admin)})
    assert r.status_code == 400
    r = admin.post(f"/services/{sid}/rs/{rid}/drain", data={"csrf_token": csrf(admin)})
    assert r.status_code == 400
    r = client.delete(f"/api/services/{sid}/real-servers/{rid}", headers=BEARER)
    assert r.status_code == 400
    assert kernel.state() == before


@pytest.mark.parametrize("body", [{"addr": "not-an-ip"}, {"addr": "2001:db8:2::13"},
                                  {"addr": "192.0.2.13", "port": 70000},
                                  {"addr": "192.0.2.13", "forward": "teleport"},
                                  {"addr": "192.0.2.13", "weight": -1},
                                  {"addr": "192.0.2.13", "colour": "red"}, {}, [1], "x"])
def test_bad_new_real_server_is_400(client: FlaskClient, kernel: Kernel, body: Any) -> None:
    before = kernel.state()
    r = client.post(f"/api/services/{SID}/real-servers", json=body, headers=BEARER)
    assert r.status_code == 400, r.get_json()
    assert kernel.state() == before


@pytest.mark.parametrize("form", [{"addr": "not-an-ip"}, {"addr": "2001:db8:2::13"},
                                  {"addr": "192.0.2.13", "port": "x"},
                                  {"addr": "192.0.2.13", "forward": "teleport"},
                                  {"addr": "192.0.2.13", "weight": "2147483648"}])
def test_bad_new_real_server_in_form_is_400_before_the_confirmation(
        admin: FlaskClient, kernel: Kernel, form: dict[str, str]) -> None:
    before = kernel.state()
    r = admin.post(f"/services/{SID}/rs", data={**form, "csrf_token": csrf(admin)})
    assert r.status_code == 400 and b"Confirm" not in r.data
    assert kernel.state() == before


def test_adding_an_existing_real_server_is_409(admin: FlaskClient) -> None:
    r = admin.post(f"/services/{SID}/rs", data={"addr": "192.0.2.11",
                                                "csrf_token": csrf(admin)})
    assert r.status_code == 409


def test_add_real_server_to_unknown_service_is_400(admin: FlaskClient) -> None:
    r = admin.post("/services/tcp_198.51.100.99_80/rs",
                   data={"addr": "192.0.2.13", "csrf_token": csrf(admin)})
    assert r.status_code == 400


@pytest.mark.parametrize("value", ["maybe", None, 2])
def test_bad_synproxy_value_is_400(client: FlaskClient, kernel: Kernel, value: Any) -> None:
    before = kernel.state()
    r = client.put(f"/api/services/{SID}/synproxy", json={"enabled": value}, headers=BEARER)
    assert r.status_code == 400 and kernel.state() == before


def test_synproxy_on_a_udp_service_is_400(client: FlaskClient, kernel: Kernel) -> None:
    r = client.put(f"/api/services/{UDP_SID}/synproxy", json={"enabled": True},
                   headers=BEARER)
    assert r.status_code == 400 and "TCP" in r.get_json()["error"]


def test_non_json_body_is_400(client: FlaskClient, kernel: Kernel) -> None:
    r = client.put(f"/api/services/{SID}/real-servers/{RID1}/weight", data="weight=3",
                   headers=BEARER)
    assert r.status_code == 400 and weight(kernel) == 5


# ---- /metrics -----------------------------------------------------------------------------


_LABEL = re.compile(r'(\w+)="([^"]*)"')


def _key(name: str, labels: str = "") -> str:
    """A sample's name with its labels in a canonical (sorted) order."""
    pairs = sorted(_LABEL.findall(labels))
    return name + ("{" + ",".join(f'{k}="{v}"' for k, v in pairs) + "}" if pairs else "")


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            sample, _, value = line.rpartition(" ")
            name, _, labels = sample.partition("{")
            out[_key(name, labels)] = float(value)
    return out


def test_metrics_serve_the_exporters_series_per_vip(client: FlaskClient) -> None:
    text = client.get("/metrics").get_data(as_text=True)
    s = _samples(text)
    svc = 'vip="198.51.100.10",port="80",protocol="tcp"'
    rs = svc + ',real_server="192.0.2.11",real_port="80"'
    assert s["ipvs_synproxy_up"] == 1
    assert s[_key("ipvs_synproxy_service_connections_total", svc)] == 10
    assert s[_key("ipvs_synproxy_real_server_weight", rs)] == 5
    assert s[_key("ipvs_synproxy_real_server_active_connections", rs)] == 4
    assert s[_key("ipvs_synproxy_real_server_inactive_connections", rs)] == 2
    assert s[_key("ipvs_synproxy_service_info",
                  'vip="2001:db8:1::10",port="443",protocol="tcp",scheduler="wlc",'
                  'syn_proxy="on"')] == 1
    laddr = svc + ',laddr="192.0.2.100"'
    assert s[_key("ipvs_synproxy_fullnat_lports_used", laddr)] == 644
    assert s[_key("ipvs_synproxy_fullnat_lports_free", laddr)] == 65535 - 1024 + 1 - 644
    assert s[_key("ipvs_synproxy_fullnat_lport_conflicts_total", laddr)] == 1
    assert s["ipvs_synproxy_fullnat_connections_total"] == 100
    assert s[_key("ipvs_synproxy_sync_daemon_running", 'state="master"')] == 0
    assert re.search(r"^# TYPE ipvs_synproxy_fullnat_connections(_total)? counter$", text,
                     re.M)


def test_metrics_leave_node_exporters_names_alone(client: FlaskClient) -> None:
    """node_exporter's IPVS collector serves node_ipvs_* for our modules; serving
    them again would double every sum. No name stutters either."""
    text = client.get("/metrics").get_data(as_text=True)
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
             if line and not line.startswith("#")}
    assert names and not [n for n in names if not n.startswith("ipvs_synproxy_")]
    assert not [n for n in names if "synproxy_synproxy" in n]


def test_metrics_report_down_when_ipvs_is_unreachable(tmp_path: Path) -> None:
    from ipvs_synproxy.kernel import netlink

    def broken() -> FakeKernel:
        raise netlink.IpvsUnavailable("no IPVS in the kernel")

    settings = Settings(users=make_users(), secret_key=b"k" * 32,
                        audit_log=str(tmp_path / "a.log"))
    app = create_app(settings, ConsoleService(broken, Sysctls(root=str(tmp_path))))
    c = app.test_client()
    assert _samples(c.get("/metrics").get_data(as_text=True))["ipvs_synproxy_up"] == 0
    r = c.get("/api/services", headers=BEARER)
    assert r.status_code == 503 and "no IPVS" in r.get_json()["error"]
    app.extensions["ipvs_audit"].close()


def test_parse_proc_ip_vs_stats() -> None:
    text = ("   Total Incoming Outgoing         Incoming         Outgoing\n"
            "   Conns  Packets  Packets            Bytes            Bytes\n"
            "       1F       2A        0              3E8                0\n\n"
            " Conns/s   Pkts/s   Pkts/s          Bytes/s          Bytes/s\n"
            "       0        0        0                0                0\n")
    assert parse_proc_stats(text) == {"conns": 31, "inpkts": 42, "outpkts": 0,
                                      "inbytes": 1000, "outbytes": 0}


def test_secret_key_file_is_private(tmp_path: Path) -> None:
    key = tmp_path / "sub" / "key"
    settings_mod.read_secret_key(str(key))
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600


# ---- the PROXY protocol of FULLNAT real servers (issue 21) --------------------------------


def test_service_page_shows_the_proxy_setting_and_a_form_for_fullnat_servers(
        admin: FlaskClient, kernel: Kernel) -> None:
    html = admin.get(f"/services/{SID}").get_data(as_text=True)
    assert ">PROXY</th>" in html and '<td class="proxy">off</td>' in html
    assert "Set PROXY" in html and 'name="proxy_protocol"' in html
    assert admin.get(f"/api/services/{SID}").get_json()["real_servers"][0][
        "proxy_protocol"] == "off"
    udp = admin.get(f"/services/{UDP_SID}").get_data(as_text=True)
    assert "Set PROXY" not in udp and 'name="proxy_protocol"' not in udp


def test_proxy_protocol_change_asks_first_then_edits_in_place(
        admin: FlaskClient, kernel: Kernel, app: Flask) -> None:
    url = f"/services/{SID}/rs/{RID1}/proxy-protocol"
    r = admin.post(url, data={"proxy_protocol": "v2", "csrf_token": csrf(admin)})
    assert r.status_code == 200 and b"from off to v2" in r.data
    assert proxy_protocol(kernel) == "off" and audit_entries(app) == []
    r = admin.post(url, data={"proxy_protocol": "v2", "confirm": "yes",
                              "csrf_token": csrf(admin)})
    assert r.status_code == 302 and proxy_protocol(kernel) == "v2"
    assert weight(kernel) == 5  # an edit of the same real server, nothing else
    assert [c.split(":")[0] for c in kernel.calls] == ["edit_dest"]
    assert audit_entries(app)[-1]["action"] == "set_proxy_protocol"
    html = admin.get(r.headers["Location"]).get_data(as_text=True)
    assert "set to v2" in html and '<td class="proxy">v2</td>' in html


@pytest.mark.parametrize("value", ["v3", "", "v 2", "on", "2", "v2\x00", "off;v2"])
def test_a_bad_proxy_protocol_is_400_and_changes_nothing(admin: FlaskClient, kernel: Kernel,
                                                         client: FlaskClient,
                                                         value: str) -> None:
    before = kernel.state()
    r = admin.post(f"/services/{SID}/rs/{RID1}/proxy-protocol",
                   data={"proxy_protocol": value, "confirm": "yes", "csrf_token": csrf(admin)})
    assert r.status_code == 400 and b"proxy_protocol" in r.data
    r = client.put(f"/api/services/{SID}/real-servers/{RID1}/proxy-protocol",
                   json={"proxy_protocol": value}, headers=BEARER)
    assert r.status_code == 400 and r.get_json()["field"] == "proxy_protocol"
    assert kernel.state() == before and kernel.calls == []


def test_proxy_protocol_needs_fullnat_and_tcp(admin: FlaskClient, kernel: Kernel,
                                             client: FlaskClient) -> None:
    before = kernel.state()
    r = client.put(f"/api/services/{SID6}/real-servers/2001:db8:2::11_443/proxy-protocol",
                   json={"proxy_protocol": "v1"}, headers=BEARER)
    assert r.status_code == 400 and "needs FULLNAT" in r.get_json()["error"]
    r = client.post(f"/api/services/{SID6}/real-servers", headers=BEARER,
                    json={"addr": "2001:db8:2::12", "forward": "masq",
                          "proxy_protocol": "v2"})
    assert r.status_code == 400 and "needs FULLNAT" in r.get_json()["error"]
    r = client.post(f"/api/services/{UDP_SID}/real-servers", headers=BEARER,
                    json={"addr": "192.0.2.20", "forward": "fullnat", "proxy_protocol": "v2"})
    assert r.status_code == 400 and "TCP services only" in r.get_json()["error"]
    assert kernel.state() == before and kernel.calls == []
    # "off" is what every other real server has: fine anywhere
    r = client.post(f"/api/services/{UDP_SID}/real-servers", headers=BEARER,
                    json={"addr": "192.0.2.20", "forward": "fullnat", "proxy_protocol": "off"})
    assert r.status_code == 201 and r.get_json()["proxy_protocol"] == "off"


def test_add_real_server_form_sets_the_header(admin: FlaskClient, kernel: Kernel) -> None:
    add = {"addr": "192.0.2.13", "port": "", "weight": "1", "forward": "fullnat",
           "proxy_protocol": "v1", "csrf_token": csrf(admin)}
    assert b"PROXY protocol v1" in admin.post(f"/services/{SID}/rs", data=add).data
    assert proxy_protocol(kernel, rid="192.0.2.13_80") is None
    admin.post(f"/services/{SID}/rs", data={**add, "confirm": "yes"})
    assert proxy_protocol(kernel, rid="192.0.2.13_80") == "v1"
