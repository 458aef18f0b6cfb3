"""The patched keepalived against the patched kernel, in the testbed guest.

keepalived 2.2.7 with keepalived/patches is built on the host beforehand
(``ipvs-synproxy keepalived build``; ``make vm-test`` does it) and run here in
the balancer namespaces with configs rendered by ``ipvs-synproxy keepalived
render``'s code: it must program FULLNAT + SYN-proxy services and their
laddrs, follow the real servers' health, and move the VIP to a second
balancer when the first one goes away.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ipvs_synproxy.build import keepalived as keepalived_build
from ipvs_synproxy.config import keepalived
from ipvs_synproxy.config import load as config_load
from ipvs_synproxy.kernel.model import FwdMethod, Service
from ipvs_synproxy.kernel.netlink import IPVS
from ipvs_synproxy_testbed import netns, peers, topology

VIP = topology.VIP4
VIP6 = topology.VIP6
RS1, RS2 = topology.RS4["rs1"], topology.RS4["rs2"]
LADDRS = ("192.0.2.100", "192.0.2.101")
# The second balancer: its own addresses inside the testbed's prefixes.
LB2_CLIENT, LB2_SERVER = "198.51.100.3", "192.0.2.3"
LB2_LADDRS = ("192.0.2.110", "192.0.2.111")
CHECK = "{type: tcp, interval: 1, timeout: 1, retry: 1, delay_before_retry: 1}"


def wait_for(cond: Callable[[], bool], timeout: float = 30.0, step: float = 0.3) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()


def render(tmp: Path, text: str) -> str:
    src = tmp / "ipvs.yaml"
    src.write_text(text)
    return keepalived.render(config_load.load(str(src)))


class Keepalived:
    """One patched keepalived in a namespace: foreground, logging to a file,
    with pid files of its own so that several can run side by side."""

    def __init__(self, ns: str, conf_text: str, workdir: Path) -> None:
        binary = keepalived_build.binary_path()
        workdir.mkdir(parents=True, exist_ok=True)
        self.ns = ns
        self.conf = workdir / "keepalived.conf"
        self.conf.write_text(conf_text)
        self.log_path = workdir / "keepalived.log"
        argv = [str(binary), "--dont-fork", "--log-console", "--log-detail",
                "-f", str(self.conf), "-p", str(workdir / "keepalived.pid"),
                "-r", str(workdir / "vrrp.pid"), "-c", str(workdir / "checkers.pid")]
        with netns.netns(ns):  # where its interfaces are
            check = keepalived_build.config_test(binary, self.conf)
        assert check.returncode == 0, f"config test failed:\n{check.stdout}{check.stderr}"
        with open(self.log_path, "w") as log, netns.netns(ns):
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (keepalived gives up the VIP and removes its services), then
        SIGKILL for its whole process group if it does not finish in time."""
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError):  # the children share the group
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(5)


@pytest.fixture
def servers(topo: None) -> Iterator[dict[str, peers.HttpServer]]:
    """HTTP responders on port 80 in rs1 and rs2 (IPv4); a test may replace them."""
    srv = {rs: peers.start_http_server(rs, topology.RS4[rs], 80) for rs in ("rs1", "rs2")}
    srv6 = [peers.start_http_server(rs, topology.RS6[rs], 80) for rs in ("rs1", "rs2")]
    yield srv
    for s in [*srv.values(), *srv6]:
        s.close()


def lb_table(ns: str = "lb") -> dict[str, tuple[Service, list[tuple[str, int, FwdMethod]],
                                                set[str]]]:
    """The namespace's IPVS table: "vip:port" -> (service, real servers, laddrs)."""
    out = {}
    with IPVS(netns=ns) as ipvs:
        for svc in ipvs.services():
            dests = sorted((str(d.addr), d.weight, d.fwd) for d in ipvs.dests(svc))
            laddrs = {str(la.addr) for la in ipvs.laddrs(svc)}
            out[f"{svc.addr}:{svc.port}"] = (svc, dests, laddrs)
    return out


def served_by(n: int = 6) -> dict[str, set[str]]:
    """Who answered n requests to the VIP, and which peers they saw."""
    seen: dict[str, set[str]] = {}
    for _ in range(n):
        r = peers.http_get(VIP, 80)
        seen.setdefault(r.server, set()).add(r.peer)
    return seen


def adm_list(ns: str = "lb") -> str:
    """What an operator sees: ``ipvs-synproxy adm -L -n`` in the namespace."""
    return netns.run(ns, [sys.executable, "-m", "ipvs_synproxy.cli", "adm", "-L", "-n"]).stdout


def adm_laddrs(ns: str, vip: str) -> set[str]:
    """``ipvs-synproxy adm --laddr-list -t VIP -n``: the service's local addresses."""
    out = netns.run(ns, [sys.executable, "-m", "ipvs_synproxy.cli", "adm", "--laddr-list",
                         "-t", vip, "-n"]).stdout
    return {line.split()[1] for line in out.splitlines()[2:] if line.startswith("  -> ")}


def has_addr(ns: str, addr: str) -> bool:
    res = netns.run(ns, ["ip", "-o", "addr", "show", "to", addr])
    return bool(res.stdout.strip())


CONFIG = f"""
keepalived:
  router_id: lb
  healthcheck: {CHECK}
services:
  - vip: {VIP}:80
    scheduler: rr
    synproxy: true
    forward: fullnat
    laddrs: [{", ".join(LADDRS)}]
    real_servers: [{{addr: {RS1}}}, {{addr: {RS2}}}]
  - vip: "[{VIP6}]:80"
    scheduler: wrr
    synproxy: true
    forward: fullnat
    laddrs: ["{topology.LADDRS6[0]}"]
    real_servers:
      - {{addr: "[{topology.RS6['rs1']}]:80", weight: 2}}
"""


EXAMPLE = Path(__file__).parents[1] / "unit" / "data" / "keepalived" / "example.yaml"


def test_patched_keepalived_accepts_every_config_we_render(binary: Path, topo: None,
                                                           tmp_path: Path) -> None:
    """``keepalived --config-test`` in lb (where the VRRP interfaces exist) on the
    documented example (TCP_CHECK, HTTP_GET, MISC_CHECK, laddr groups, VRRP) and
    on every config the tests below run; a dangling laddr group is refused."""
    configs = {
        "example": keepalived.render(config_load.load(str(EXAMPLE))),
        "tcp": render(tmp_path, CONFIG),
        "http": render(tmp_path, CONFIG.replace(CHECK, "{type: http, path: /health}")),
        "master": render(tmp_path, balancer_config("lb", "master", 150, LADDRS)),
        "backup": render(tmp_path, balancer_config("lb2", "backup", 100, LB2_LADDRS)),
    }
    assert "MISC_CHECK" in configs["example"] and "HTTP_GET" in configs["example"]
    assert "TCP_CHECK" in configs["tcp"] and "local_address_group" in configs["tcp"]
    for name, text in configs.items():
        conf = tmp_path / f"{name}.conf"
        conf.write_text(text)
        with netns.netns("lb"):
            res = keepalived_build.config_test(binary, conf)
        assert res.returncode == 0, f"{name}: {res.stdout}{res.stderr}"
    bad = tmp_path / "bad.conf"
    bad.write_text(configs["tcp"].replace("laddr_group_name laddr_", "laddr_group_name nosuch_"))
    assert bad.read_text() != configs["tcp"]
    with netns.netns("lb"):
        assert keepalived_build.config_test(binary, bad).returncode != 0


def test_keepalived_programs_fullnat_synproxy_services_and_laddrs(
        daemons: list[Keepalived], servers: dict[str, peers.HttpServer],
        tmp_path: Path) -> None:
    ka = Keepalived("lb", render(tmp_path, CONFIG), tmp_path / "lb")
    daemons.append(ka)

    def programmed() -> bool:
        t = lb_table()
        return (f"{VIP}:80" in t and len(t[f"{VIP}:80"][1]) == 2
                and len(t[f"{VIP}:80"][2]) == 2 and f"{VIP6}:80" in t)

    assert wait_for(programmed), f"table: {lb_table()}\nlog:\n{ka.log()}"
    t = lb_table()
    svc, dests, laddrs = t[f"{VIP}:80"]
    assert svc.synproxy and svc.scheduler == "rr"
    assert dests == [(RS1, 1, FwdMethod.FULLNAT), (RS2, 1, FwdMethod.FULLNAT)]
    assert laddrs == set(LADDRS)
    svc6, dests6, laddrs6 = t[f"{VIP6}:80"]
    assert svc6.synproxy
    assert dests6 == [(topology.RS6["rs1"], 2, FwdMethod.FULLNAT)]
    assert laddrs6 == {topology.LADDRS6[0]}

    # The same, as the operator's listing shows it.
    listing = adm_list()
    assert f"TCP  {VIP}:80 rr synproxy" in listing, listing
    assert f"  -> {RS1}:80" in listing and f"  -> {RS2}:80" in listing, listing
    for rs in (RS1, RS2):
        line = next(ln for ln in listing.splitlines() if f"-> {rs}:80" in ln)
        assert line.split()[2:4] == ["FullNat", "1"], line
    assert f"TCP  [{VIP6}]:80 wrr synproxy" in listing, listing
    assert adm_laddrs("lb", f"{VIP}:80") == set(LADDRS)

    seen = served_by(4)
    assert set(seen) == {"rs1", "rs2"}, seen
    assert set().union(*seen.values()) <= set(LADDRS), seen  # FULLNAT: they see laddrs
    assert peers.http_get(VIP6, 80).server == "rs1"
    assert "failed" not in ka.log() and "IPVS cmd" not in ka.log(), ka.log()

    # A reload (SIGHUP) with another pool and without the SYN proxy edits in place.
    other = CONFIG.replace(f"laddrs: [{', '.join(LADDRS)}]", "laddrs: [192.0.2.101, 192.0.2.102]")
    other = other.replace("synproxy: true", "synproxy: false", 1)
    ka.conf.write_text(render(tmp_path, other))
    ka.proc.send_signal(signal.SIGHUP)

    def reloaded() -> bool:
        t = lb_table()
        return (f"{VIP}:80" in t and t[f"{VIP}:80"][2] == {"192.0.2.101", "192.0.2.102"}
                and not t[f"{VIP}:80"][0].synproxy)

    assert wait_for(reloaded), f"table: {lb_table()}\nlog:\n{ka.log()}"
    assert lb_table()[f"{VIP6}:80"][0].synproxy
    assert set().union(*served_by(4).values()) <= {"192.0.2.101", "192.0.2.102"}

    # Stopping keepalived removes what it programmed.
    ka.stop()
    assert lb_table() == {}


@pytest.mark.parametrize("inhibit", [False, True], ids=["removed", "weight-0"])
def test_failed_real_server_leaves_and_comes_back(
        daemons: list[Keepalived], servers: dict[str, peers.HttpServer],
        tmp_path: Path, inhibit: bool) -> None:
    check = ("{type: http, path: /health, interval: 1, timeout: 1, retry: 1, "
             f"delay_before_retry: 1, inhibit_on_failure: {str(inhibit).lower()}}}")
    ka = Keepalived("lb", render(tmp_path, CONFIG.replace(CHECK, check)), tmp_path / "lb")
    daemons.append(ka)

    def weights() -> dict[str, int]:
        t = lb_table()
        return {d[0]: d[1] for d in t[f"{VIP}:80"][1]} if f"{VIP}:80" in t else {}

    assert wait_for(lambda: weights() == {RS1: 1, RS2: 1}), ka.log()
    servers["rs2"].close()
    t0 = time.monotonic()
    failed = {RS1: 1, RS2: 0} if inhibit else {RS1: 1}
    assert wait_for(lambda: weights() == failed, timeout=20), (weights(), ka.log())
    removed_after = time.monotonic() - t0
    for _ in range(3):  # clients keep being served, by rs1 alone
        assert set(served_by(4)) == {"rs1"}

    servers["rs2"] = peers.start_http_server("rs2", RS2, 80)
    assert wait_for(lambda: weights() == {RS1: 1, RS2: 1}, timeout=20), ka.log()
    assert set(served_by(4)) == {"rs1", "rs2"}
    # detection: one failed check, one retry 1 s later; a few seconds of slack for TCG
    assert removed_after < 8, f"rs2 taken out only after {removed_after:.1f} s"


# ---- two balancers with VRRP ------------------------------------------------------------------


@pytest.fixture
def lb2(lb2: str) -> str:
    """conftest's second balancer with laddrs of its own (these tests run each
    balancer with its own laddrs; tests/vm/test_ha_sync.py shares them)."""
    subprocess.run(["ip", "-n", lb2, "-batch", "-"], text=True, check=True,
                   input="".join(f"addr add {a}/32 dev eth1\n" for a in LB2_LADDRS))
    return lb2


@pytest.fixture
def vip_by_vrrp(topo: None) -> Iterator[None]:
    """lb without its static VIP, so that VRRP decides who holds it."""
    netns.run("lb", ["ip", "addr", "del", f"{VIP}/32", "dev", "eth0"])
    yield
    netns.run("lb", ["ip", "addr", "replace", f"{VIP}/32", "dev", "eth0"])
    # The client learnt lb2's MAC for the VIP from VRRP's gratuitous ARP.
    netns.run("client", ["ip", "neigh", "flush", "to", VIP])


def balancer_config(router_id: str, state: str, priority: int,
                    laddrs: tuple[str, ...]) -> str:
    return f"""
keepalived:
  router_id: {router_id}
  healthcheck: {CHECK}
  vrrp:
    - name: VI_CLIENT
      interface: eth0
      state: {state}
      virtual_router_id: 51
      priority: {priority}
      advert_int: 1
      vips: [{VIP}/32]
services:
  - vip: {VIP}:80
    scheduler: rr
    synproxy: true
    forward: fullnat
    laddrs: [{", ".join(laddrs)}]
    real_servers: [{{addr: {RS1}}}, {{addr: {RS2}}}]
"""


def test_vip_moves_to_the_backup_when_the_master_dies(
        lb2: str, vip_by_vrrp: None, servers: dict[str, peers.HttpServer],
        daemons: list[Keepalived], tmp_path: Path) -> None:
    # (fixtures in this order: the daemons stop before lb2 and the VIP are undone)
    master = Keepalived("lb", render(tmp_path, balancer_config("lb", "master", 150, LADDRS)),
                        tmp_path / "lb")
    daemons.append(master)
    backup = Keepalived(lb2, render(tmp_path, balancer_config("lb2", "backup", 100,
                                                              LB2_LADDRS)),
                        tmp_path / "lb2")
    daemons.append(backup)

    assert wait_for(lambda: has_addr("lb", VIP)), master.log()
    assert wait_for(lambda: f"{VIP}:80" in lb_table(lb2)
                    and lb_table(lb2)[f"{VIP}:80"][2] == set(LB2_LADDRS)), backup.log()
    time.sleep(3)  # a few adverts: the backup stays backup
    assert not has_addr(lb2, VIP), backup.log()
    assert set().union(*served_by(4).values()) <= set(LADDRS)

    master.stop()
    assert not has_addr("lb", VIP)
    assert wait_for(lambda: has_addr(lb2, VIP), timeout=20), backup.log()
    svc = lb_table(lb2)[f"{VIP}:80"][0]
    assert svc.synproxy
    with IPVS(netns=lb2) as ipvs:
        before = ipvs.ext_stats()

    # New connections go through lb2's FULLNAT service (its laddrs reach the RSs).
    def through_lb2() -> bool:
        try:
            seen = served_by(4)
        except OSError:
            return False
        return set().union(*seen.values()) <= set(LB2_LADDRS) and set(seen) == {"rs1",
                                                                                  "rs2"}

    assert wait_for(through_lb2, timeout=20), backup.log()
    # ... and through its SYN proxy: lb2 answered the SYNs with cookies and
    # validated the clients' ACKs before opening the real-server side.
    with IPVS(netns=lb2) as ipvs:
        after = ipvs.ext_stats()
    for name in ("synproxy_cookie_sent", "synproxy_ack_valid", "synproxy_conn_proxied"):
        assert after[name] >= before[name] + 4, (name, before[name], after[name])
    assert f"TCP  {VIP}:80 rr synproxy" in adm_list(lb2)
