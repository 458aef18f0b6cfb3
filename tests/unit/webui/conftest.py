"""Fixtures of the console tests: an app on the kernel stand-in, clients logged in."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from ipvs_synproxy.config.state import ServiceState, State
from ipvs_synproxy.kernel import xdp
from ipvs_synproxy.kernel.model import Dest, Laddr
from ipvs_synproxy.kernel.sysctl import Sysctls
from tests.unit.webui.support import (
    RS1,
    RS2,
    SVC,
    SVC6,
    UDP,
    V4,
    Clock,
    Kernel,
    login,
    make_users,
)
from webui import create_app, validate
from webui.service import ConsoleService
from webui.settings import Settings


@pytest.fixture(autouse=True)
def _fast_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests' users have quick pbkdf2 hashes (FAST): accept those here only."""
    monkeypatch.setattr(validate, "PBKDF2_MIN_ITERATIONS", 1000)


@pytest.fixture
def kernel() -> Kernel:
    k = Kernel.from_state(State((
        ServiceState(SVC, (RS1, RS2), (Laddr(V4("192.0.2.100"), port_conflict=1,
                                             conn_counts=644),)),
        ServiceState(SVC6, (Dest(addr=ipaddress.IPv6Address("2001:db8:2::11"), port=443),)),
        ServiceState(UDP, ()),
    )))
    k.ext = {"fullnat_conn_new": 100, "fullnat_no_laddr": 0}
    return k


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def sysctl_dir(tmp_path: Path) -> Path:
    d = tmp_path / "vs"
    d.mkdir()
    for name, value in (("conntrack", "1"), ("fullnat_lport_min", "1024"),
                        ("fullnat_lport_max", "65535"), ("sync_threshold", "3\t50")):
        (d / name).write_text(value + "\n")
    return d


@pytest.fixture
def xdp_devices() -> list[xdp.DeviceStats]:
    """The XDP programs the console reads (none unless a test adds some)."""
    return []


@pytest.fixture
def app(tmp_path: Path, kernel: Kernel, clock: Clock, sysctl_dir: Path,
        xdp_devices: list[xdp.DeviceStats]) -> Iterator[Flask]:
    settings = Settings(users=make_users(), secret_key=b"k" * 32,
                        audit_log=str(tmp_path / "log" / "audit.log"),
                        extra={"TESTING": True})
    service = ConsoleService(lambda: kernel, Sysctls(root=str(sysctl_dir)),
                             proc_stats=lambda: {"conns": 17, "inpkts": 170, "outpkts": 160,
                                                 "inbytes": 17000, "outbytes": 16000},
                             clock=clock, xdp_stats=lambda: list(xdp_devices))
    a = create_app(settings, service)
    a.extensions["ipvs_throttle"].clock = clock
    a.extensions["ipvs_sessions"].clock = clock
    yield a
    a.extensions["ipvs_audit"].close()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def admin(client: FlaskClient) -> FlaskClient:
    assert login(client).status_code == 302
    return client


@pytest.fixture
def reader(client: FlaskClient) -> FlaskClient:
    assert login(client, "bob").status_code == 302
    return client
