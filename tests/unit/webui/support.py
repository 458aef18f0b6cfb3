"""What the console tests share: users, a kernel stand-in with services, helpers."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from werkzeug.security import generate_password_hash

from ipvs_synproxy.kernel.model import Dest, FwdMethod, Protocol, Service, Stats
from tests.unit.fake_ipvs import FakeKernel
from webui.settings import User

FAST = "pbkdf2:sha256:1000"  # a quick hash for tests; production uses the default
PASSWORDS = {"alice": "alice-admin-pw", "bob": "bob-readonly-pw"}
TOKEN = "bot-token-0123456789"

V4 = ipaddress.IPv4Address
SVC = Service(protocol=Protocol.TCP, addr=V4("198.51.100.10"), port=80, scheduler="wrr",
              stats=Stats(conns=10, cps=3, inpps=40, outpps=30, inbps=4000, outbps=9000))
SID = "tcp_198.51.100.10_80"
SVC6 = Service(addr=ipaddress.IPv6Address("2001:db8:1::10"), port=443, synproxy=True)
SID6 = "tcp_2001:db8:1::10_443"
UDP = Service(protocol=Protocol.UDP, addr=V4("198.51.100.10"), port=53)
UDP_SID = "udp_198.51.100.10_53"
RS1 = Dest(addr=V4("192.0.2.11"), port=80, fwd=FwdMethod.FULLNAT, weight=5, active_conns=4,
           inact_conns=2, stats=Stats(cps=1))
RS2 = Dest(addr=V4("192.0.2.12"), port=80, fwd=FwdMethod.FULLNAT, weight=0)
RID1, RID2 = "192.0.2.11_80", "192.0.2.12_80"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Kernel(FakeKernel):
    """FakeKernel with extended counters that a test can move."""

    ext: dict[str, int]

    def ext_stats(self) -> dict[str, int]:
        return dict(self.ext)


def make_users() -> dict[str, User]:
    return {
        "alice": User("alice", "admin", generate_password_hash(PASSWORDS["alice"], FAST)),
        "bob": User("bob", "readonly", generate_password_hash(PASSWORDS["bob"], FAST)),
        "bot": User("bot", "admin", token_hash=generate_password_hash(TOKEN, FAST)),
        "peek": User("peek", "readonly", token_hash=generate_password_hash(TOKEN, FAST)),
    }


def csrf(client: FlaskClient) -> str:
    with client.session_transaction() as s:
        token = s.get("csrf")
    assert isinstance(token, str)
    return token


def login(client: FlaskClient, user: str = "alice", password: str | None = None) -> Any:
    client.get("/login")
    return client.post("/login", data={"username": user,
                                       "password": password or PASSWORDS[user],
                                       "csrf_token": csrf(client)})


def audit_entries(app: Flask, logins: bool = False) -> list[dict[str, Any]]:
    """The audit log's entries (without logins and logouts unless ``logins``)."""
    path = Path(app.config["AUDIT_LOG"])
    if not path.exists():
        return []
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    return [e for e in entries if logins or e["action"] not in ("login", "logout")]


def weight(kernel: Kernel, svc: Service = SVC, rid: str = RID1) -> int | None:
    for d in kernel.dests(svc):
        if f"{d.addr}_{d.port}" == rid:
            return d.weight
    return None


BEARER = {"Authorization": f"Bearer bot:{TOKEN}"}
PAGES = ["/", f"/services/{SID}", f"/services/{SID6}", "/synproxy", "/sysctl"]
API_GETS = ["/api/services", f"/api/services/{SID}", "/api/ext-stats", "/api/xdp",
            "/api/attack", "/api/sysctl", "/api/openapi.json", "/api/whoami"]
FORM_ACTIONS = [
    (f"/services/{SID}/rs/{RID1}/weight", {"weight": "7"}),
    (f"/services/{SID}/rs/{RID1}/proxy-protocol", {"proxy_protocol": "v2"}),
    (f"/services/{SID}/rs/{RID1}/drain", {}),
    (f"/services/{SID}/rs/{RID1}/delete", {}),
    (f"/services/{SID}/rs", {"addr": "192.0.2.13", "weight": "2"}),
    (f"/services/{SID}/synproxy", {"enabled": "on"}),
]
API_ACTIONS = [
    ("PUT", f"/api/services/{SID}/real-servers/{RID1}/weight", {"weight": 7}),
    ("PUT", f"/api/services/{SID}/real-servers/{RID1}/proxy-protocol",
     {"proxy_protocol": "v2"}),
    ("POST", f"/api/services/{SID}/real-servers/{RID1}/drain", None),
    ("DELETE", f"/api/services/{SID}/real-servers/{RID1}", None),
    ("POST", f"/api/services/{SID}/real-servers", {"addr": "192.0.2.13"}),
    ("PUT", f"/api/services/{SID}/synproxy", {"enabled": True}),
]


def proxy_protocol(kernel: Kernel, svc: Service = SVC, rid: str = RID1) -> str | None:
    for d in kernel.dests(svc):
        if f"{d.addr}_{d.port}" == rid:
            return str(d.proxy_protocol)
    return None
