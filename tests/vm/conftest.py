"""Fixtures for tests that run inside the testbed guest (``make vm-test``).

These tests need the real (patched or stock) IPVS modules and the standard
topology; outside the guest they refuse to run rather than pass vacuously.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest

from ipvs_synproxy.build import keepalived as keepalived_build
from ipvs_synproxy.kernel.netlink import IPVS
from ipvs_synproxy_testbed import netns, peers, topology
from ipvs_synproxy_testbed.transfer import ServerProcess
from ipvs_synproxy_testbed.vm import TEST_MARK
from tests.vm.helpers import FAMILIES, NETS


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("IPVS_SP_GUEST") != "1":
        raise pytest.UsageError(
            "tests/vm run inside the testbed guest: "
            "ipvs-synproxy vm exec --topology -- python -m pytest tests/vm"
        )


def pytest_runtest_logstart(nodeid: str, location: tuple[str, int | None, str]) -> None:
    """Marks each test's start in the kernel log: a guest that dies leaves no
    test report, and the console then tells which test was running."""
    try:
        with open("/dev/kmsg", "w") as kmsg:
            kmsg.write(f"{TEST_MARK}{nodeid}\n")
    except OSError:
        pass


@pytest.fixture(scope="session")
def topo() -> None:
    if os.environ.get("IPVS_SP_TOPOLOGY") != "1":
        pytest.fail("the standard topology is missing: run vm exec with --topology")
    present = set(os.listdir(netns.NETNS_RUN_DIR))
    missing = set(topology.NETNS) - present
    assert not missing, f"netns missing: {missing}"


def ipvsadm(*args: str) -> str:
    """Run the distribution's ipvsadm in the balancer's namespace."""
    return netns.run("lb", ["ipvsadm", *args]).stdout


@pytest.fixture
def lb(topo: None) -> Iterator[None]:
    """A balancer with an empty IPVS table, emptied again afterwards."""
    ipvsadm("-C")
    yield
    ipvsadm("-C")


@pytest.fixture
def real_servers(topo: None) -> Iterator[dict[str, list[peers.HttpServer]]]:
    """HTTP responders on port 80 in rs1 and rs2, v4 and v6."""
    servers = {
        rs: [peers.start_http_server(rs, topology.RS4[rs], 80),
             peers.start_http_server(rs, topology.RS6[rs], 80)]
        for rs in ("rs1", "rs2")
    }
    yield servers
    for group in servers.values():
        for s in group:
            s.close()


@pytest.fixture
def ipvs(topo: None) -> Iterator[IPVS]:
    """A netlink connection to lb's IPVS with an empty table, emptied afterwards."""
    with IPVS(netns="lb") as conn:
        conn.flush()
        yield conn
        conn.flush()


# DESIGN.md's second balancer: its own addresses on both segments
LB2 = "lb2"
LB2_ADDRS = {"eth0": ("198.51.100.3/24", "2001:db8:1::3/64"),
             "eth1": ("192.0.2.3/24", "2001:db8:2::3/64")}


@pytest.fixture
def lb2(topo: None) -> Iterator[str]:
    """A second balancer namespace on the same two segments as lb (a router,
    IPv4 and IPv6, no VIP, no laddr), removed afterwards with what it held."""
    subprocess.run(["ip", "netns", "add", LB2], check=True)
    try:
        for key, value in (("net.ipv4.ip_forward", 1), ("net.ipv6.conf.all.forwarding", 1),
                           ("net.ipv6.conf.all.accept_dad", 0),
                           ("net.ipv6.conf.default.accept_dad", 0),
                           ("net.ipv4.conf.all.rp_filter", 0),
                           ("net.ipv4.conf.default.rp_filter", 0)):
            netns.write_sysctl(LB2, key, value)
        for dev, bridge in (("eth0", topology.CLIENT_BRIDGE), ("eth1", topology.SERVER_BRIDGE)):
            peer = f"{LB2}-{dev}"
            subprocess.run(["ip", "link", "add", peer, "type", "veth", "peer", "name", dev,
                            "netns", LB2], check=True)
            subprocess.run(["ip", "link", "set", peer, "master", bridge, "up"], check=True)
        lines = ["link set lo up",
                 *(f"addr add {a} dev {d}" for d, addrs in LB2_ADDRS.items() for a in addrs),
                 "link set eth0 up", "link set eth1 up"]
        subprocess.run(["ip", "-n", LB2, "-batch", "-"], input="\n".join(lines) + "\n",
                       text=True, check=True)
        yield LB2
    finally:
        subprocess.run(["ip", "netns", "del", LB2], check=False)
        for dev in ("eth0", "eth1"):  # gone with the namespace; just in case
            subprocess.run(["ip", "link", "del", f"{LB2}-{dev}"], capture_output=True,
                           check=False)
        # Nobody may go on sending to lb2's MAC an address it held (a VIP
        # after a failover): the entry would linger, stale, for seconds
        for ns in ("client", "rs1", "rs2"):
            netns.run(ns, ["ip", "neigh", "flush", "all"], check=False)


@pytest.fixture(scope="module")
def binary() -> Path:
    """The keepalived built (and patched) on the host."""
    path = keepalived_build.binary_path()
    if not path.exists():
        pytest.fail(f"{path} is missing: run `ipvs-synproxy keepalived build` on the host "
                    "first (make vm-test does)")
    return path


class _Daemon(Protocol):
    def stop(self) -> None: ...


@pytest.fixture
def daemons(binary: Path, lb: None) -> Iterator[list[_Daemon]]:
    """keepalived instances (tests/vm/test_keepalived.py's Keepalived) a test
    starts, on lb's fresh table: all stopped afterwards."""
    started: list[_Daemon] = []
    yield started
    for k in started:
        k.stop()


@pytest.fixture(scope="module")
def blob_servers(topo: None) -> Iterator[ServerProcess]:
    """BlobServers on port 8080 of rs1 and rs2 (v4 and v6) in a child process, so
    the client and the servers do not share one interpreter's GIL."""
    specs = [f"blob:{rs}:{a if ':' not in a else f'[{a}]'}:8080"
             for rs in ("rs1", "rs2") for a in (NETS[f].rs[rs] for f in FAMILIES)]
    with ServerProcess(specs) as proc:
        yield proc
