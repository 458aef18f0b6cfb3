"""netlink.py's ipvs-synproxy extensions (kernel_patches/UAPI.md) against the
patched kernel: laddr commands, extended statistics, the FULLNAT method.

Needs the patched modules (the default of ``vm exec``); the traffic side of
FULLNAT is tests/vm/test_fullnat.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from ipvs_synproxy.kernel import netlink
from ipvs_synproxy.kernel.model import FwdMethod, Service, make_dest, make_service
from ipvs_synproxy_testbed import netns, topology
from tests.vm.helpers import IP


@pytest.fixture
def ipvs(lb: None) -> Iterator[netlink.IPVS]:
    with netlink.IPVS("lb") as conn:
        yield conn


def _svc(addr: str, port: int = 80) -> Service:
    return make_service(source="test", addr=addr, port=port, scheduler="rr")


def test_the_patched_kernel_announces_the_extension_commands(ipvs: netlink.IPVS) -> None:
    for cmd in (netlink.IPVS_CMD_NEW_LADDR, netlink.IPVS_CMD_DEL_LADDR,
                netlink.IPVS_CMD_GET_LADDR, netlink.IPVS_CMD_GET_EXT_STATS):
        assert ipvs.supports(cmd), cmd


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_laddrs_are_listed_in_the_order_added_and_deleted_one_by_one(
        ipvs: netlink.IPVS, family: str) -> None:
    vip, pool = ((topology.VIP4, topology.LADDRS4) if family == "ipv4"
                 else (topology.VIP6, topology.LADDRS6))
    svc = _svc(vip)
    ipvs.add_service(svc)
    for a in pool:
        ipvs.add_laddr(svc, IP(a))
    listed = ipvs.laddrs(svc)
    assert [la.addr for la in listed] == [IP(a) for a in pool]
    assert all(la.conn_counts == 0 and la.port_conflict == 0 for la in listed)
    ipvs.del_laddr(svc, IP(pool[1]))
    assert [la.addr for la in ipvs.laddrs(svc)] == [IP(a) for a in pool if a != pool[1]]


def test_laddrs_belong_to_their_service(ipvs: netlink.IPVS) -> None:
    a, b = _svc(topology.VIP4, 80), _svc(topology.VIP4, 81)
    ipvs.add_service(a)
    ipvs.add_service(b)
    ipvs.add_laddr(a, IP(topology.LADDRS4[0]))
    assert ipvs.laddrs(b) == []
    ipvs.del_service(a)
    ipvs.add_service(a)
    assert ipvs.laddrs(a) == []  # a deleted service takes its pool with it


def test_laddr_requests_for_a_missing_service_raise_service_not_found(
        ipvs: netlink.IPVS) -> None:
    missing = _svc(topology.VIP4, 9999)
    for call in (lambda: ipvs.add_laddr(missing, IP(topology.LADDRS4[0])),
                 lambda: ipvs.del_laddr(missing, IP(topology.LADDRS4[0])),
                 lambda: ipvs.laddrs(missing)):
        with pytest.raises(netlink.ServiceNotFound,
                           match=re.escape(f"service {missing} does not exist")):
            call()


def test_duplicate_and_unknown_laddrs_raise_and_change_nothing(ipvs: netlink.IPVS) -> None:
    svc = _svc(topology.VIP4)
    ipvs.add_service(svc)
    ipvs.add_laddr(svc, IP(topology.LADDRS4[0]))
    with pytest.raises(netlink.AlreadyExists, match="already exists"):
        ipvs.add_laddr(svc, IP(topology.LADDRS4[0]))
    with pytest.raises(netlink.LaddrNotFound, match=f"laddr {topology.LADDRS4[3]} "):
        ipvs.del_laddr(svc, IP(topology.LADDRS4[3]))
    assert [la.addr for la in ipvs.laddrs(svc)] == [IP(topology.LADDRS4[0])]


def test_fullnat_dest_reads_back_as_fullnat(ipvs: netlink.IPVS) -> None:
    svc = _svc(topology.VIP6)
    ipvs.add_service(svc)
    dest = make_dest(source="t", addr=topology.RS6["rs2"], port=8080, fwd="fullnat",
                     weight=5)
    ipvs.add_dest(svc, dest)
    (listed,) = ipvs.dests(svc)
    assert listed == dest
    assert listed.fwd is FwdMethod.FULLNAT


def _proc_ext_stats() -> dict[str, int]:
    text = netns.run("lb", ["cat", "/proc/net/ip_vs_ext_stats"]).stdout
    rows = [ln.split() for ln in text.splitlines()[1:] if ln.strip()]
    return {r[0]: int(r[1]) for r in rows}


def test_ext_stats_are_the_rows_of_proc_ip_vs_ext_stats(ipvs: netlink.IPVS) -> None:
    # No traffic runs: both views are of the same, still counters.
    got = ipvs.ext_stats()
    assert got, "no counters over netlink"
    assert got == _proc_ext_stats()
    assert {"fullnat_lport_exhausted", "fullnat_lport_give_up"} <= set(got)
