"""netlink.py against the real kernel: what it writes is what the distribution's
ipvsadm lists, what ipvsadm writes is what it reads, and the kernel's refusals
become NetlinkErrors that leave the table as it was.

Stock IPVS semantics only; the laddr / extended-statistics / cookie-secret
commands are tested once the kernel series implements them.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest

from ipvs_synproxy.kernel import netlink
from ipvs_synproxy.kernel.model import FwdMethod, Service, Timeouts, make_dest, make_service
from ipvs_synproxy_testbed import peers, topology
from tests.vm.conftest import ipvsadm

Table = dict[str, dict[str, tuple[str, str]]]


def ipvsadm_table() -> Table:
    """``ipvsadm -Ln`` as {service line: {real server: (forward, weight)}}."""
    table: Table = {}
    current = None
    for line in ipvsadm("-L", "-n").splitlines()[3:]:
        fields = line.split()
        if fields[0] == "->":
            assert current is not None, line
            table[current][fields[1]] = (fields[2], fields[3])
        else:
            current = " ".join(fields)
            table[current] = {}
    return table


@pytest.fixture
def ipvs(lb: None) -> Iterator[netlink.IPVS]:
    with netlink.IPVS("lb") as conn:
        yield conn


def _svc(addr: str, port: int = 80, **kw: object) -> Service:
    return make_service(source="test", addr=addr, port=port, **kw)


V4 = topology.VIP4
V6 = topology.VIP6


def _populate(ipvs: netlink.IPVS) -> tuple[Service, Service]:
    s4 = _svc(V4, 80, scheduler="rr")
    s6 = _svc(V6, 443, scheduler="wlc", persistent=120)
    ipvs.add_service(s4)
    ipvs.add_service(s6)
    ipvs.add_dest(s4, make_dest(source="t", addr=topology.RS4["rs1"], port=80, weight=3))
    ipvs.add_dest(s4, make_dest(source="t", addr=topology.RS4["rs2"], port=8080, fwd="dr"))
    ipvs.add_dest(s6, make_dest(source="t", addr=topology.RS6["rs1"], port=443,
                                fwd="tunnel", weight=0))
    return s4, s6


EXPECTED = {
    f"TCP {V4}:80 rr": {f"{topology.RS4['rs1']}:80": ("Masq", "3"),
                        f"{topology.RS4['rs2']}:8080": ("Route", "1")},
    f"TCP [{V6}]:443 wlc persistent 120": {f"[{topology.RS6['rs1']}]:443": ("Tunnel", "0")},
}


def test_services_and_dests_added_through_netlink_are_what_ipvsadm_lists(
        ipvs: netlink.IPVS) -> None:
    _populate(ipvs)
    assert ipvsadm_table() == EXPECTED


def test_listing_reads_back_exactly_what_was_added(ipvs: netlink.IPVS) -> None:
    s4, s6 = _populate(ipvs)
    assert sorted(map(str, ipvs.services())) == sorted([str(s4), str(s6)])
    assert {str(s): s for s in ipvs.services()} == {str(s4): s4, str(s6): s6}
    dests = {str(d): d for d in ipvs.dests(s4)}
    assert dests[f"{topology.RS4['rs1']}:80"].weight == 3
    assert dests[f"{topology.RS4['rs2']}:8080"].fwd is FwdMethod.ROUTE
    (d6,) = ipvs.dests(s6)
    assert (d6.fwd, d6.weight) == (FwdMethod.TUNNEL, 0)


def test_services_made_by_ipvsadm_are_read_with_flags_netmask_and_scheduler(
        ipvs: netlink.IPVS) -> None:
    ipvsadm("-A", "-t", f"{V4}:80", "-s", "sh", "-p", "600", "-M", "255.255.255.0",
            "-b", "sh-port")
    ipvsadm("-A", "-u", f"[{V6}]:53", "-s", "rr", "-o")
    ipvsadm("-A", "-f", "9", "-6", "-s", "lc")
    got = {str(s): s for s in ipvs.services()}
    tcp = got[f"{V4}:80/tcp"]
    assert (tcp.scheduler, tcp.persistent, tcp.prefix) == ("sh", 600, 24)
    assert tcp.flags == 0x10  # IP_VS_SVC_F_SCHED_SH_PORT
    udp = got[f"[{V6}]:53/udp"]
    assert (udp.scheduler, udp.persistent, udp.flags) == ("rr", 0, 0x4)  # one-packet
    mark = got["fwmark 9/ipv6"]
    assert (mark.fwmark, mark.scheduler) == (9, "lc")


def _settled_service(ipvs: netlink.IPVS) -> Service:
    """The only service, once the 2 s estimator has folded in every packet."""
    def totals(s: Service) -> tuple[int, ...]:
        # the cumulative counters; the rates (cps, inbps…) keep decaying
        assert s.stats is not None
        return (s.stats.conns, s.stats.inpkts, s.stats.outpkts, s.stats.inbytes,
                s.stats.outbytes)

    (prev,) = ipvs.services()
    for _ in range(10):
        time.sleep(2.2)
        (cur,) = ipvs.services()
        if totals(cur) == totals(prev) and totals(cur)[0]:
            return cur
        prev = cur
    raise AssertionError(f"service counters never settled: {prev.stats}")


def test_service_stats_count_real_traffic_and_zero_clears_them(
        ipvs: netlink.IPVS, real_servers: dict[str, list[peers.HttpServer]]) -> None:
    svc = _svc(V4, 80, scheduler="rr")
    ipvs.add_service(svc)
    ipvs.add_dest(svc, make_dest(source="t", addr=topology.RS4["rs1"], port=80))
    # A real server deleted by an earlier test comes back from IPVS's dest
    # trash with its old counters: take them as the baseline once two
    # estimator ticks have folded everything in.
    time.sleep(4.5)
    (fresh,) = ipvs.dests(svc)
    assert fresh.stats is not None
    baseline = fresh.stats.conns
    for _ in range(3):
        peers.http_get(V4)
    listed = _settled_service(ipvs)
    assert listed.stats is not None
    assert listed.stats.conns == 3
    assert listed.stats.inpkts > 0 and listed.stats.outbytes > 0
    # ipvsadm agrees (its --stats row: Conns InPkts OutPkts InBytes OutBytes)
    row = next(ln for ln in ipvsadm("-L", "-n", "--stats", "--exact").splitlines()
               if ln.startswith("TCP"))
    assert row.split()[2:7] == [str(listed.stats.conns), str(listed.stats.inpkts),
                                str(listed.stats.outpkts), str(listed.stats.inbytes),
                                str(listed.stats.outbytes)]
    (dest,) = ipvs.dests(svc)
    assert dest.stats is not None and dest.stats.conns - baseline == 3
    ipvs.zero(svc)
    (listed,) = ipvs.services()
    assert listed.stats is not None and listed.stats.conns == 0
    assert listed.stats.inpkts == 0


def test_edit_dest_changes_only_the_weight(ipvs: netlink.IPVS) -> None:
    s4, _ = _populate(ipvs)
    ipvs.edit_dest(s4, make_dest(source="t", addr=topology.RS4["rs1"], port=80, weight=9))
    expected = {k: dict(v) for k, v in EXPECTED.items()}
    expected[f"TCP {V4}:80 rr"][f"{topology.RS4['rs1']}:80"] = ("Masq", "9")
    assert ipvsadm_table() == expected


def test_edit_service_changes_scheduler_and_persistence(ipvs: netlink.IPVS) -> None:
    _populate(ipvs)
    ipvs.edit_service(_svc(V4, 80, scheduler="wrr", persistent=30))
    table = ipvsadm_table()
    assert f"TCP {V4}:80 wrr persistent 30" in table
    assert f"TCP {V4}:80 rr" not in table
    assert len(table[f"TCP {V4}:80 wrr persistent 30"]) == 2


def test_delete_dest_then_service(ipvs: netlink.IPVS) -> None:
    s4, s6 = _populate(ipvs)
    ipvs.del_dest(s4, make_dest(source="t", addr=topology.RS4["rs2"], port=8080))
    table = ipvsadm_table()
    assert list(table[f"TCP {V4}:80 rr"]) == [f"{topology.RS4['rs1']}:80"]
    ipvs.del_service(s6)
    assert list(ipvsadm_table()) == [f"TCP {V4}:80 rr"]


def test_flush_removes_every_service(ipvs: netlink.IPVS) -> None:
    _populate(ipvs)
    ipvs.flush()
    assert ipvsadm_table() == {}
    assert ipvs.services() == []


def test_synproxy_flag_survives_a_dump(ipvs: netlink.IPVS) -> None:
    ipvs.add_service(_svc(V4, 80, synproxy=True))
    ipvs.add_service(_svc(V4, 81))
    got = {s.port: s.synproxy for s in ipvs.services()}
    assert got == {80: True, 81: False}


def _bad_requests(ipvs: netlink.IPVS, s4: Service) -> list[tuple[type[Exception], str, object]]:
    missing = _svc(V4, 9999)
    rs1 = make_dest(source="t", addr=topology.RS4["rs1"], port=80)
    return [
        (netlink.AlreadyExists, f"service {s4} already exists",
         lambda: ipvs.add_service(s4)),
        (netlink.ServiceNotFound, "service 198.51.100.10:9999/tcp does not exist",
         lambda: ipvs.del_service(missing)),
        (netlink.ServiceNotFound, "service 198.51.100.10:9999/tcp does not exist",
         lambda: ipvs.edit_service(missing)),
        (netlink.ServiceNotFound, "service 198.51.100.10:9999/tcp does not exist",
         lambda: ipvs.add_dest(missing, rs1)),
        (netlink.ServiceNotFound, "service 198.51.100.10:9999/tcp does not exist",
         lambda: ipvs.dests(missing)),
        (netlink.AlreadyExists, "already exists", lambda: ipvs.add_dest(s4, rs1)),
        (netlink.DestNotFound, "does not exist",
         lambda: ipvs.del_dest(s4, make_dest(source="t", addr=topology.RS4["rs1"],
                                             port=81))),
        (netlink.DestNotFound, "does not exist",
         lambda: ipvs.edit_dest(s4, make_dest(source="t", addr=topology.RS4["rs1"],
                                              port=81))),
        # a v6 real server behind a v4 NAT service: the kernel only tunnels across
        (netlink.InvalidRequest, "Invalid argument",
         lambda: ipvs.add_dest(s4, make_dest(source="t", addr=topology.RS6["rs1"],
                                             port=80))),
        (netlink.InvalidRequest, "scheduler 'nosuch'",
         lambda: ipvs.add_service(_svc(V4, 82, scheduler="nosuch"))),
    ]


def test_bad_requests_raise_netlink_errors_and_change_nothing(ipvs: netlink.IPVS) -> None:
    s4, _ = _populate(ipvs)
    before = ipvsadm_table()
    listed_before = ipvs.services()
    for exc_type, text, call in _bad_requests(ipvs, s4):
        with pytest.raises(exc_type) as info:
            call()  # type: ignore[operator]
        assert text in str(info.value), (exc_type, str(info.value))
        assert isinstance(info.value, netlink.NetlinkError)
        assert ipvsadm_table() == before, text
    assert ipvs.services() == listed_before


def test_connection_sees_only_its_own_namespace(ipvs: netlink.IPVS) -> None:
    ipvs.add_service(_svc(V4, 80))
    with netlink.IPVS("rs1") as other:
        assert other.services() == []
    assert len(ipvs.services()) == 1


def test_info_matches_ipvsadm_header(ipvs: netlink.IPVS) -> None:
    info = ipvs.info()
    head = ipvsadm("-L", "-n").splitlines()[0]
    m = re.match(r"IP Virtual Server version (\S+) \(size=(\d+)\)", head)
    assert m, head
    assert (info.version, info.conn_tab_size) == (m.group(1), int(m.group(2)))


def test_timeouts_set_and_read_back(ipvs: netlink.IPVS) -> None:
    old = ipvs.timeouts()
    try:
        ipvs.set_timeouts(Timeouts(tcp=901, tcp_fin=61, udp=0))
        now = ipvs.timeouts()
        assert (now.tcp, now.tcp_fin, now.udp) == (901, 61, old.udp)
        assert ipvsadm("-L", "--timeout").split()[-3:] == ["901", "61", str(old.udp)]
    finally:
        ipvs.set_timeouts(old)
