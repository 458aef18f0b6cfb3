"""Input that gave 500s, or reached the kernel, before (issue 23): one validating
function per kind (webui/validate.py), shared by forms, API and settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.security import generate_password_hash

from ipvs_synproxy.kernel.sysctl import Sysctls
from tests.unit.webui.support import (
    BEARER,
    PASSWORDS,
    RID1,
    SID,
    SID6,
    SVC,
    Kernel,
    csrf,
    make_users,
    weight,
)
from webui import create_app, validate
from webui import settings as settings_mod
from webui.service import ConsoleService
from webui.settings import Settings, SettingsError, User

WEIGHT_URL = f"/api/services/{SID}/real-servers/{RID1}/weight"
ADD_URL = f"/api/services/{SID}/real-servers"


# ---- malformed bodies and values are 400s, not 500s ----------------------------------------


@pytest.mark.parametrize("body", [b"[" * 60000, b"{\"weight\":" * 5000, b"\xff\xfe{}",
                                  b'{"weight": 1', b"", b"null"])
def test_a_malformed_json_body_is_400(client: FlaskClient, kernel: Kernel,
                                      body: bytes) -> None:
    r = client.put(WEIGHT_URL, data=body, content_type="application/json", headers=BEARER)
    assert r.status_code == 400 and r.get_json()["status"] == 400
    assert weight(kernel) == 5


@pytest.mark.parametrize("port", ["\u00b2", "\u0663", "1_000", "0", 0, "65536", "+80", "-80",
                                  "0x50", 80.0])
def test_a_bad_port_is_400_in_the_api(client: FlaskClient, kernel: Kernel,
                                      port: Any) -> None:
    before = kernel.state()
    r = client.post(ADD_URL, json={"addr": "192.0.2.13", "port": port}, headers=BEARER)
    assert r.status_code == 400 and r.get_json()["field"] == "port"
    assert kernel.state() == before


@pytest.mark.parametrize("port", ["\u00b2", "\u0663", "0", "65536"])
def test_a_bad_port_is_400_in_the_form(admin: FlaskClient, kernel: Kernel, port: str) -> None:
    before = kernel.state()
    r = admin.post(f"/services/{SID}/rs", data={"addr": "192.0.2.13", "port": port,
                                                "csrf_token": csrf(admin)})
    assert r.status_code == 400 and b"port" in r.data
    assert kernel.state() == before


@pytest.mark.parametrize("rid", ["192.0.2.11_\u00b2", "192.0.2.11_\u0668\u0660",
                                 "fe80::1%eth0_80"])
def test_a_bad_real_server_id_is_400(client: FlaskClient, rid: str) -> None:
    r = client.delete(f"/api/services/{SID}/real-servers/{rid}", headers=BEARER)
    assert r.status_code == 400 and r.get_json()["field"] == "real_server"


@pytest.mark.parametrize("weight_text", ["\u00b2", "\u0661\u0660"])
def test_a_non_ascii_digit_weight_is_400(admin: FlaskClient, weight_text: str) -> None:
    r = admin.post(f"/services/{SID}/rs/{RID1}/weight",
                   data={"weight": weight_text, "csrf_token": csrf(admin)})
    assert r.status_code == 400


@pytest.mark.parametrize("nxt", ["/%0d%0aSet-Cookie:%20x=y", "/%0aLocation:%20//evil",
                                 "//[", "/\u00e9", "/a%09b", "/ x"])
def test_a_login_next_with_control_characters_goes_home(client: FlaskClient,
                                                        nxt: str) -> None:
    client.get("/login")
    r = client.post(f"/login?next={nxt}", data={"username": "alice",
                                               "password": PASSWORDS["alice"],
                                               "csrf_token": csrf(client)})
    assert r.status_code == 302 and r.headers["Location"] == "/"


# ---- real-server addresses IPVS can use ----------------------------------------------------


BAD_ADDRS = ["0.0.0.0", "255.255.255.255", "224.0.0.1", "239.1.2.3", "127.0.0.1",
             "127.1.2.3", "fe80::1%eth0", "192.0.2.13%1", "[192.0.2.13]", "::ffff:192.0.2.13"]
BAD_ADDRS6 = ["::", "ff02::1", "::1", "2001:db8:2::13%eth0"]


@pytest.mark.parametrize("addr", BAD_ADDRS)
def test_unusable_real_server_addresses_are_400(client: FlaskClient, kernel: Kernel,
                                                addr: str) -> None:
    before = kernel.state()
    r = client.post(ADD_URL, json={"addr": addr}, headers=BEARER)
    assert r.status_code == 400 and r.get_json()["field"] == "addr", r.get_json()
    assert kernel.state() == before


@pytest.mark.parametrize("addr", BAD_ADDRS6)
def test_unusable_ipv6_real_server_addresses_are_400(client: FlaskClient, kernel: Kernel,
                                                     addr: str) -> None:
    r = client.post(f"/api/services/{SID6}/real-servers", json={"addr": addr},
                    headers=BEARER)
    assert r.status_code == 400 and r.get_json()["field"] == "addr"


@pytest.mark.parametrize("addr", ["0.0.0.0", "224.0.0.1", "127.0.0.1", "fe80::1%eth0"])
def test_unusable_real_server_addresses_are_400_in_the_form(admin: FlaskClient,
                                                            kernel: Kernel, addr: str) -> None:
    before = kernel.state()
    r = admin.post(f"/services/{SID}/rs", data={"addr": addr, "csrf_token": csrf(admin)})
    assert r.status_code == 400 and b"Confirm" not in r.data
    assert kernel.state() == before


def test_loopback_real_servers_only_when_allowed(tmp_path: Path, kernel: Kernel) -> None:
    st = Settings(users=make_users(), secret_key=b"k" * 32,
                  audit_log=str(tmp_path / "audit.log"))
    app = create_app(st, ConsoleService(lambda: kernel, Sysctls(root=str(tmp_path)),
                                        allow_loopback=True))
    r = app.test_client().post(ADD_URL, json={"addr": "127.0.0.2"}, headers=BEARER)
    assert r.status_code == 201
    assert any(str(d.addr) == "127.0.0.2" for d in kernel.dests(SVC))
    app.extensions["ipvs_audit"].close()


def test_allow_loopback_real_servers_setting(tmp_path: Path) -> None:
    h = generate_password_hash("x" * 10)
    f = tmp_path / "console.yaml"
    f.write_text(f"secret_key_file: key\naudit_log: audit.log\n"
                 f"allow_loopback_real_servers: true\n"
                 f"users: [{{name: a, role: admin, password_hash: '{h}'}}]\n")
    assert settings_mod.load(str(f)).allow_loopback_real_servers is True


@pytest.mark.parametrize("addr", ["192.0.2.13", "10.1.2.3", "2001:db8::13", "fe80::1"])
def test_usable_addresses_pass(addr: str) -> None:
    assert str(validate.real_server_address(addr)) == addr


# ---- the validators, one per kind ------------------------------------------------------------


@pytest.mark.parametrize("text", ["\u00b2", "\u0663", "1_0", " 1 2 ", "1.0", "", "x", "+1"])
def test_integers_are_ascii_decimal_digits_only(text: str) -> None:
    with pytest.raises(validate.Invalid):
        validate.integer(text, "n", 0, 100)


def test_ports_are_1_to_65535() -> None:
    assert validate.port("1") == 1 and validate.port(65535) == 65535
    for bad in (0, "0", 65536, True):
        with pytest.raises(validate.Invalid):
            validate.port(bad)


@pytest.mark.parametrize("listen", ["127.0.0.1:\u00b2", "127.0.0.1:\u0668\u0660",
                                    "127.0.0.1:0"])
def test_the_listen_port_uses_the_same_check(listen: str) -> None:
    with pytest.raises(SettingsError, match="not a port number"):
        settings_mod.parse_listen(listen)


# ---- password hashes in the settings -------------------------------------------------------


SALT = "a" * 16


@pytest.mark.parametrize("h", [
    f"pbkdf2:sha256:1${SALT}${'0' * 64}",  # one iteration
    f"pbkdf2:sha256:599999${SALT}${'0' * 64}",
    f"pbkdf2:md5:1000000${SALT}${'0' * 32}",
    f"pbkdf2:sha256${SALT}${'0' * 64}",  # werkzeug would pick; we want it explicit
    f"scrypt:abc:8:1${SALT}${'0' * 128}",  # made login raise (a 500)
    f"scrypt:32768:8${SALT}${'0' * 128}",
    f"scrypt:1024:8:1${SALT}${'0' * 128}",  # weak
    f"scrypt:30000:8:1${SALT}${'0' * 128}",  # not a power of two
    f"scrypt:1048576:8:1${SALT}${'0' * 128}",  # 1 GiB a login
    f"scrypt:32768:8:1${SALT}${'0' * 127}",
    f"scrypt:32768:8:1${SALT}${'G' * 128}",
    f"scrypt:32768:8:1$${'0' * 128}",
    f"md5${SALT}${'0' * 32}", "plain:text", "hunter2",
])
def test_check_users_accepts_only_sound_scrypt_or_pbkdf2(
        h: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(validate, "PBKDF2_MIN_ITERATIONS", 600_000)
    with pytest.raises(SettingsError, match="user a: password_hash"):
        settings_mod.check_users({"a": User("a", "admin", h)})
    with pytest.raises(SettingsError, match="user a: token_hash"):
        settings_mod.check_users({"a": User("a", "admin", token_hash=h)})


def test_check_users_accepts_werkzeugs_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(validate, "PBKDF2_MIN_ITERATIONS", 600_000)
    for method in ("scrypt", "pbkdf2", "pbkdf2:sha512:600000"):
        settings_mod.check_users({"a": User("a", "admin",
                                            generate_password_hash("pw-pw-pw", method))})


def test_every_configured_hash_logs_in_without_a_500(app: Flask) -> None:
    users = make_users()
    for u in users.values():  # what the app was built with passed check_users
        settings_mod.check_users({u.name: u})
    c = app.test_client()
    c.get("/login")
    r = c.post("/login", data={"username": "alice", "password": "wrong-wrong",
                               "csrf_token": csrf(c)})
    assert r.status_code == 401


@pytest.mark.parametrize(("method", "path", "body", "field"), [
    ("PUT", f"/api/services/{SID}/real-servers/{RID1}/weight", {"weight": "7"}, "weight"),
    ("PUT", f"/api/services/{SID}/real-servers/{RID1}/weight", {"weight": 7, "x": 1}, "x"),
    ("PUT", f"/api/services/{SID}/synproxy", {"enabled": "on"}, "enabled"),
    ("PUT", f"/api/services/{SID}/synproxy", {"enabled": True, "x": 1}, "x"),
    ("POST", f"/api/services/{SID}/real-servers", {"addr": "192.0.2.13", "port": "80"},
     "port"),
    ("POST", f"/api/services/{SID}/real-servers", {"addr": "192.0.2.13", "port": None},
     "port"),
])
def test_the_json_api_takes_json_types_and_documented_fields_only(
        client: FlaskClient, kernel: Kernel, method: str, path: str, body: dict[str, Any],
        field: str) -> None:
    # the forms' strings ("7", "on") are for forms; the API is what openapi.json says
    before = kernel.state()
    r = client.open(path, method=method, json=body, headers=BEARER)
    assert r.status_code == 400 and r.get_json()["field"] == field
    assert kernel.state() == before
