"""The XDP fast path from the config file (issue 22): ``ipvs-synproxy apply``
attaches the program to the interfaces of ``xdp:``, re-attaches it when the
mode changes and detaches it when the file no longer lists it; the secret it
sets (a new random one: the file names none) is the module's too, so real
clients answered by the program connect.

With keepalived, the VRRP instance on the interface attaches the program
when this balancer becomes master and keepalived's shutdown script takes it
off. Native mode on a veth needs an XDP program on the peer
(tests/vm/test_xdp.py).
"""
from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipvs_synproxy.cli import main as cli
from ipvs_synproxy.kernel import xdp
from ipvs_synproxy_testbed import netns, peers, topology
from tests.vm.helpers import delta, ext_stats_file, wait_for
from tests.vm.test_keepalived import CHECK, Keepalived, render, vip_by_vrrp
from tests.vm.test_xdp import DEV, _peer_pass

__all__ = ["vip_by_vrrp"]  # a fixture of test_keepalived's, used here

VIP, RS1, RS2 = topology.VIP4, topology.RS4["rs1"], topology.RS4["rs2"]
TABLE = f"""\
services:
  - vip: {VIP}:80
    scheduler: rr
    synproxy: true
    real_servers:
      - {{addr: {RS1}}}
      - {{addr: {RS2}}}
"""


@pytest.fixture
def native_peer(lb: None) -> Iterator[None]:
    """lb's table emptied; the peer's XDP_PASS for native mode; nothing of
    ours left on lb's eth0 afterwards, whatever the test did."""
    _peer_pass(True)
    try:
        yield
    finally:
        if DEV in xdp.attached_devices("lb"):
            xdp.detach(DEV, "lb", missing_ok=True)
        _peer_pass(False)


def _apply(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str) -> dict[str, object]:
    f = tmp_path / "ipvs.yaml"
    f.write_text(text)
    rc = cli.main(["apply", str(f), "--netns", "lb", "--json"])
    out = capsys.readouterr()
    got: dict[str, object] = json.loads(out.out)
    assert rc == 0 and got["applied"] is True, (got, out.err)
    return got


def _texts(got: dict[str, object]) -> list[str]:
    changes = got["changes"]
    assert isinstance(changes, list)
    return [c["text"] for c in changes]


def _answered_by_xdp(pins: str | None = "lb") -> None:
    """Real clients connect, answered by the program (pinned for ``pins``)
    and served by IPVS: the module received no SYN, so program and module
    share the secret."""
    before, xbefore = ext_stats_file(), xdp.read_stats(DEV, pins)
    served = {peers.http_get(VIP, 80, timeout=20).server for _ in range(2)}
    assert served <= {"rs1", "rs2"} and served, served
    assert xdp.read_stats(DEV, pins)["syn_answered"] - xbefore["syn_answered"] >= 2
    assert delta(before, "synproxy_syn_received") == 0
    assert delta(before, "synproxy_ack_valid") >= 2


def test_apply_attaches_re_attaches_and_detaches(
        native_peer: None, real_servers: dict, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    got = _apply(tmp_path, capsys, TABLE + "xdp: [{interface: eth0, mode: generic}]\n")
    assert _texts(got)[-1] == "+ xdp eth0 (generic)"
    assert got["new_random_secret"] is True
    st = xdp.status(DEV, "lb")
    assert (st.attached, st.pinned, st.services, st.ready) == ("generic", True, 1, True), st
    _answered_by_xdp()

    # the same file again: the attachment is kept (its counters go on)
    answered = xdp.read_stats(DEV, "lb")["syn_answered"]
    assert _texts(_apply(tmp_path, capsys,
                         TABLE + "xdp: [{interface: eth0, mode: generic}]\n")) == []
    assert xdp.status(DEV, "lb").prog_id == st.prog_id
    assert xdp.read_stats(DEV, "lb")["syn_answered"] == answered

    got = _apply(tmp_path, capsys, TABLE + "xdp: [{interface: eth0, mode: native}]\n")
    assert _texts(got) == ["~ xdp eth0: mode generic -> native"]
    assert xdp.status(DEV, "lb").attached == "native"
    _answered_by_xdp()

    got = _apply(tmp_path, capsys, TABLE)
    assert _texts(got) == ["- xdp eth0"]
    st = xdp.status(DEV, "lb")
    assert (st.attached, st.pinned) == (None, False), st
    assert xdp.attached_devices("lb") == []
    before = ext_stats_file()
    assert peers.http_get(VIP, 80, timeout=20).server in ("rs1", "rs2")
    assert delta(before, "synproxy_syn_received") == 1  # the module's again


@pytest.fixture
def keepalived_pins(lb: None) -> Iterator[None]:
    """keepalived and its scripts run in lb without knowing it: they pin
    for the namespace they take for their own (pin_dir(dev, None)). Nothing
    is left on lb's eth0 afterwards."""
    yield
    with netns.netns("lb"):
        if xdp.pin_dir(DEV, None).exists():
            xdp.detach(DEV, None, missing_ok=True)


def _status_in_lb() -> xdp.Status:
    with netns.netns("lb"):
        return xdp.status(DEV, None)


def test_keepalived_attaches_on_master_and_detaches_at_stop(
        binary: Path, keepalived_pins: None, vip_by_vrrp: None, real_servers: dict,
        tmp_path: Path) -> None:
    command = Path(sys.executable).with_name("ipvs-synproxy")
    text = TABLE + f"""\
keepalived:
  healthcheck: {CHECK}
  xdp_command: {command}
  vrrp:
    - {{name: VI_CLIENT, interface: eth0, state: master, priority: 150,
       virtual_router_id: 51, vips: [{VIP}/32]}}
xdp: [{{interface: eth0, mode: generic}}]
"""
    ka = Keepalived("lb", render(tmp_path, text), tmp_path / "ka")
    try:
        assert wait_for(lambda: xdp.device_state(DEV, "lb")[0] == "generic", 40), ka.log()
        st = _status_in_lb()
        # attached once keepalived had programmed the table: it answers the VIP
        assert (st.attached, st.ready, st.services) == ("generic", True, 1), st
        _answered_by_xdp(pins=None)
    finally:
        ka.stop()
    assert xdp.device_state(DEV, "lb") == (None, None), ka.log()
    assert not xdp.pin_dir(DEV, None).exists()
