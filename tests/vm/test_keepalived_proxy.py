"""keepalived's ``proxy_protocol`` (keepalived/patches/0005) against the kernel.

The patched keepalived, run in lb with configs rendered by ``ipvs-synproxy
keepalived render``'s code, must program IPVS_DEST_ATTR_PROXY_PROTOCOL into
the real kernel as the file says (a service's default, a real server's own,
IPv4 and IPv6), show it in its configuration dump (``-d``), and on a reload
(SIGHUP) edit a changed setting into the destinations in place: their
counters survive, a setting turned off reads back as off, a failed real
server is not put back by the edit, and an inhibited one stays at weight 0.
The header itself reaches a raw server behind the VIP.

These need the kernel with the PROXY protocol patch (the attribute read back
from IPVS_CMD_GET_DEST) and keepalived built on the host beforehand
(``ipvs-synproxy keepalived build``; ``make vm-test`` does it).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipvs_synproxy.build import keepalived as keepalived_build
from ipvs_synproxy.kernel.model import Dest, ProxyProtocol, Stats
from ipvs_synproxy.kernel.netlink import IPVS
from ipvs_synproxy_testbed import netns, peers, topology
from tests.vm.proxy_servers import Recorder, parse
from tests.vm.test_keepalived import Keepalived, render, wait_for

VIP, VIP6 = topology.VIP4, topology.VIP6
RS1, RS2 = topology.RS4["rs1"], topology.RS4["rs2"]
RS1_6 = topology.RS6["rs1"]
CLIENT = topology.CLIENT4
LADDRS = topology.LADDRS4[:2]
RAW_PORT = 9001          # a Recorder in rs1, behind a service without checks
CHECK = "{type: tcp, interval: 1, timeout: 1, retry: 1, delay_before_retry: 1}"

OFF, V1, V2 = ProxyProtocol.OFF, ProxyProtocol.V1, ProxyProtocol.V2


class DumpingKeepalived(Keepalived):
    """test_keepalived's Keepalived with ``-d``: the configuration dump (at
    start and after every reload) goes to its log."""

    def __init__(self, ns: str, conf_text: str, workdir: Path) -> None:
        binary = keepalived_build.binary_path()
        workdir.mkdir(parents=True, exist_ok=True)
        self.ns = ns
        self.conf = workdir / "keepalived.conf"
        self.conf.write_text(conf_text)
        self.log_path = workdir / "keepalived.log"
        argv = [str(binary), "--dont-fork", "--log-console", "--log-detail", "--dump-conf",
                "-f", str(self.conf), "-p", str(workdir / "keepalived.pid"),
                "-r", str(workdir / "vrrp.pid"), "-c", str(workdir / "checkers.pid")]
        with netns.netns(ns):
            check = keepalived_build.config_test(binary, self.conf)
        assert check.returncode == 0, f"config test failed:\n{check.stdout}{check.stderr}"
        with open(self.log_path, "w") as log, netns.netns(ns):
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def reload(self, conf_text: str) -> None:
        self.conf.write_text(conf_text)
        with netns.netns(self.ns):
            check = keepalived_build.config_test(keepalived_build.binary_path(), self.conf)
        assert check.returncode == 0, f"config test failed:\n{check.stdout}{check.stderr}"
        self.proc.send_signal(signal.SIGHUP)


@pytest.fixture
def servers(topo: None) -> Iterator[dict[str, peers.HttpServer]]:
    """HTTP responders on port 80 in rs1 and rs2 (IPv4; rs1 IPv6 too): what the
    TCP checks connect to. A test may close and restart them."""
    srv = {rs: peers.start_http_server(rs, topology.RS4[rs], 80) for rs in ("rs1", "rs2")}
    srv6 = peers.start_http_server("rs1", RS1_6, 80)
    yield srv
    for s in [*srv.values(), srv6]:
        s.close()


@pytest.fixture
def recorder(topo: None) -> Iterator[Recorder]:
    rec = Recorder("rs1", RS1, RAW_PORT)
    yield rec
    rec.close()


def _pp(value: str | None) -> str:
    return "" if value is None else f', proxy_protocol: "{value}"'


def config(default: str | None, rs1: str | None, rs2: str | None, default6: str | None,
           raw: str | None, check: str = CHECK) -> str:
    """Three FULLNAT services: VIP:80 (rs1, rs2; a default and their own
    settings), [VIP6]:80 (rs1, the service's default) and VIP:RAW_PORT (the
    recorder in rs1, no checks). None: no keyword."""
    return f"""
keepalived:
  router_id: lb
  healthcheck: {check}
services:
  - vip: {VIP}:80
    scheduler: rr
    synproxy: true
    forward: fullnat
{'' if default is None else f'    proxy_protocol: "{default}"'}
    laddrs: [{", ".join(LADDRS)}]
    real_servers:
      - {{addr: {RS1}{_pp(rs1)}}}
      - {{addr: {RS2}{_pp(rs2)}}}
  - vip: "[{VIP6}]:80"
    forward: fullnat
{'' if default6 is None else f'    proxy_protocol: "{default6}"'}
    laddrs: ["{topology.LADDRS6[0]}"]
    real_servers:
      - {{addr: "[{RS1_6}]:80"}}
  - vip: {VIP}:{RAW_PORT}
    scheduler: rr
    synproxy: true
    forward: fullnat
    laddrs: [{", ".join(LADDRS)}]
    healthcheck: {{type: none}}
    real_servers:
      - {{addr: {RS1}{_pp(raw)}}}
"""


def table(ns: str = "lb") -> dict[tuple[str, int, str], Dest]:
    """lb's destinations read back over netlink: (vip, port, rs) -> Dest."""
    out = {}
    with IPVS(netns=ns) as ipvs:
        for svc in ipvs.services():
            for d in ipvs.dests(svc):
                out[(str(svc.addr), svc.port, str(d.addr))] = d
    return out


def settings() -> dict[tuple[str, int, str], ProxyProtocol]:
    return {k: d.proxy_protocol for k, d in table().items()}


def expect(rs1: ProxyProtocol, rs2: ProxyProtocol, rs6: ProxyProtocol, raw: ProxyProtocol
           ) -> dict[tuple[str, int, str], ProxyProtocol]:
    return {(VIP, 80, RS1): rs1, (VIP, 80, RS2): rs2, (VIP6, 80, RS1_6): rs6,
            (VIP, RAW_PORT, RS1): raw}


def through_raw(rec: Recorder, version: ProxyProtocol) -> None:
    """One connection to VIP:RAW_PORT: the recorder reads the header of
    ``version`` with the client's address and port, then the client's bytes."""
    start = len(rec.streams)
    payload = b"hello, real server\n"
    s = peers.ns_socket("client", socket.AF_INET)
    s.settimeout(20)
    with s:
        s.connect((VIP, RAW_PORT))
        cport = s.getsockname()[1]
        s.sendall(payload)
        assert wait_for(lambda: len(rec.streams) > start
                        and rec.streams[start].endswith(payload)), rec.streams[start:]
        got = bytes(rec.streams[start])
    head = parse(got)
    assert head.version == int(version), got
    assert (head.src, head.sport, head.dst, head.dport) == (CLIENT, cport, VIP, RAW_PORT), got
    assert got[head.length:] == payload


NO_STATS = Stats()


def no_ipvs_errors(ka: Keepalived) -> None:
    """No IPVS command failed (``-d``'s dump has "failed checkers" lines, so
    unlike test_keepalived this looks for keepalived's IPVS error only)."""
    log = ka.log()
    assert "IPVS cmd" not in log and "no longer exist" not in log, log


def test_keepalived_programs_proxy_protocol_and_edits_it_on_reload(
        daemons: list[Keepalived], servers: dict[str, peers.HttpServer], recorder: Recorder,
        tmp_path: Path) -> None:
    ka = DumpingKeepalived("lb", render(tmp_path, config("v2", None, "v1", "v2", "v1")),
                           tmp_path / "lb")
    daemons.append(ka)

    # The service's default for rs1, rs2's own, IPv6, and the raw service.
    want = expect(V2, V1, V2, V1)
    assert wait_for(lambda: settings() == want, 30), f"{settings()}\nlog:\n{ka.log()}"
    no_ipvs_errors(ka)
    # the header reaches the real server, and the keepalived-made service works
    through_raw(recorder, V1)
    assert peers.http_get(VIP, 80).server in {"rs1", "rs2"}
    # the rate estimator updates the counters every 2 s
    assert wait_for(lambda: (table()[(VIP, RAW_PORT, RS1)].stats or NO_STATS).conns >= 1, 10)
    conns = table()[(VIP, RAW_PORT, RS1)].stats
    assert conns is not None

    # SIGHUP: every setting changes, the service default's too; the
    # destinations are edited in place (their counters survive).
    ka.reload(render(tmp_path, config(None, "v1", "off", "v1", "v2")))
    want = expect(V1, OFF, V1, V2)
    assert wait_for(lambda: settings() == want, 30), f"{settings()}\nlog:\n{ka.log()}"
    after = table()[(VIP, RAW_PORT, RS1)].stats
    assert after is not None and after.conns >= conns.conns, \
        f"the counters went from {conns} to {after}: re-added, not edited"
    no_ipvs_errors(ka)
    through_raw(recorder, V2)

    # SIGHUP without any proxy_protocol: all read back as off
    ka.reload(render(tmp_path, config(None, None, None, None, None)))
    want = expect(OFF, OFF, OFF, OFF)
    assert wait_for(lambda: settings() == want, 30), f"{settings()}\nlog:\n{ka.log()}"
    no_ipvs_errors(ka)

    # ... and on again, from a service default alone.
    ka.reload(render(tmp_path, config("v2", None, None, None, "v1")))
    want = expect(V2, V2, OFF, V1)
    assert wait_for(lambda: settings() == want, 30), f"{settings()}\nlog:\n{ka.log()}"
    through_raw(recorder, V1)

    ka.stop()
    assert table() == {}


@pytest.mark.parametrize("inhibit", [False, True], ids=["removed", "weight-0"])
def test_a_failed_real_server_gets_the_new_setting_when_it_comes_back(
        daemons: list[Keepalived], servers: dict[str, peers.HttpServer], tmp_path: Path,
        inhibit: bool) -> None:
    """rs2 fails its check, then a reload changes its setting: removed, it is
    not put back by the reload; inhibited, it stays at weight 0 with the new
    setting. Back up, it has the new setting and its weight."""
    check = ("{type: tcp, interval: 1, timeout: 1, retry: 1, delay_before_retry: 1, "
             f"inhibit_on_failure: {str(inhibit).lower()}}}")
    ka = DumpingKeepalived("lb", render(tmp_path, config(None, "v2", "v1", None, None,
                                                          check)), tmp_path / "lb")
    daemons.append(ka)

    def rs2() -> Dest | None:
        return table().get((VIP, 80, RS2))

    assert wait_for(lambda: (d := rs2()) is not None and d.weight == 1
                    and d.proxy_protocol is V1, 30), f"{table()}\n{ka.log()}"
    servers["rs2"].close()
    if inhibit:
        assert wait_for(lambda: (d := rs2()) is not None and d.weight == 0, 20), ka.log()
    else:
        assert wait_for(lambda: rs2() is None, 20), ka.log()

    ka.reload(render(tmp_path, config(None, "v1", "v2", None, None, check)))
    assert wait_for(lambda: table()[(VIP, 80, RS1)].proxy_protocol is V1, 30), ka.log()
    time.sleep(3)  # a few check intervals: rs2 is still down
    d = rs2()
    if inhibit:
        assert d is not None and (d.weight, d.proxy_protocol) == (0, V2), (d, ka.log())
    else:
        assert d is None, (d, ka.log())

    servers["rs2"] = peers.start_http_server("rs2", RS2, 80)
    assert wait_for(lambda: (d := rs2()) is not None and d.weight == 1, 20), ka.log()
    d = rs2()
    assert d is not None and d.proxy_protocol is V2, (d, ka.log())
