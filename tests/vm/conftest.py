"""Fixtures for tests that run inside the testbed guest (``make vm-test``).

These tests need the real (patched or stock) IPVS modules and the standard
topology; outside the guest they refuse to run rather than pass vacuously.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from ipvs_synproxy.kernel.netlink import IPVS
from ipvs_synproxy_testbed import netns, peers, topology
from ipvs_synproxy_testbed.vm import TEST_MARK


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
