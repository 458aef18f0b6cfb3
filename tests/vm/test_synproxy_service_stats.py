"""Per-service SYN-proxy counters (0028/0029): which VIP is under attack.

Each SYN-proxy service carries its own counters (IPVS_SVC_ATTR_SYNPROXY_STATS,
named as the netns rows of /proc/net/ip_vs_ext_stats they add to). A flood
on one VIP:port must move that service's counters, by exactly what the netns
counters moved, and leave every other service's at zero: another port of the
same VIP, the other family's VIP, a service without the SYN proxy (which has
no such counters at all).
"""

from __future__ import annotations

import pytest

from ipvs_synproxy.kernel.model import FwdMethod, Service
from ipvs_synproxy.kernel.netlink import IPVS
from ipvs_synproxy_testbed import flood, netns, peers
from tests.vm.helpers import (
    FAMILIES,
    IP,
    METHODS,
    NETS,
    ext_stats_file,
    synproxy_service,
    wait_for,
)

FLOOD = 300       # packets per flood
RATE = 300        # pps: a second per flood under TCG


def _sp(ipvs: IPVS, svc: Service) -> dict[str, int] | None:
    got = ipvs.service(svc).sp_stats
    return dict(got) if got is not None else None


def _moved(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def _handshakes_pending() -> bool:
    """An earlier test's connection still in its handshake with a real server
    would count a SYN retransmission or timeout in the netns while we compare."""
    out = netns.run("lb", ["ipvsadm", "-Lnc"]).stdout
    return any(" SYN_RECV " in ln or " SYN_SENT " in ln for ln in out.splitlines())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_a_flood_on_one_vip_moves_its_counters_and_no_other(
        ipvs: IPVS, real_servers: object, method: str, family: str) -> None:
    net, fwd = NETS[family], METHODS[method]
    other = NETS["ipv6" if family == "ipv4" else "ipv4"]
    flooded = synproxy_service(ipvs, net, fwd, port=80)
    same_vip = synproxy_service(ipvs, net, fwd, port=8080, rs_port=80)
    other_vip = synproxy_service(ipvs, other, fwd, port=80)
    plain = synproxy_service(ipvs, net, fwd, port=8081, rs_port=80, synproxy=False)
    quiet = (same_vip, other_vip)
    assert wait_for(lambda: not _handshakes_pending(), 90), "earlier handshakes linger"
    zero = {name: 0 for name in _sp(ipvs, flooded) or {}}
    assert zero and "synproxy_syn_received" in zero, _sp(ipvs, flooded)
    assert all(_sp(ipvs, s) == zero for s in quiet)
    assert _sp(ipvs, plain) is None, "a service that never had the SYN proxy has no counters"

    # SYNs, forged ACKs, then every malformed and odd segment the flood knows:
    # each round's per-service change equals the netns change, name by name.
    for kind in ("syn", "ack", "mixed"):
        netns_before, svc_before = ext_stats_file(), _sp(ipvs, flooded) or {}
        sent = flood.run_flood(kind, target=net.vip, port=80, count=FLOOD, rate_pps=RATE,
                               family=net.version)
        assert sent.sent == FLOOD
        svc_moved = _moved(svc_before, _sp(ipvs, flooded) or {})
        netns_moved = _moved(netns_before, ext_stats_file())
        assert svc_moved == {k: v for k, v in netns_moved.items() if k in zero}, \
            f"{kind} flood: the service's counters moved {svc_moved}, the netns' {netns_moved}"
        assert all(_sp(ipvs, s) == zero for s in quiet), \
            f"{kind} flood on {flooded} moved {[(str(s), _sp(ipvs, s)) for s in quiet]}"
    after = _sp(ipvs, flooded) or {}
    assert after["synproxy_syn_received"] >= FLOOD and after["synproxy_cookie_sent"] >= FLOOD
    assert after["synproxy_ack_invalid"] >= FLOOD
    assert after["synproxy_drop_header"] + after["synproxy_drop_options"] \
        + after["synproxy_stray_drop"] > 0, after

    # A real client through the other port counts there, and only there.
    peers.http_get(net.vip, 8080)
    got = _sp(ipvs, same_vip) or {}
    assert (got["synproxy_syn_received"], got["synproxy_cookie_sent"], got["synproxy_ack_valid"],
            got["synproxy_conn_proxied"]) == (1, 1, 1, 1), got
    assert _sp(ipvs, flooded) == after
    assert _sp(ipvs, other_vip) == zero


@pytest.mark.parametrize("family", FAMILIES)
def test_counters_survive_the_syn_proxy_off_and_on_and_start_at_zero_when_re_added(
        ipvs: IPVS, real_servers: object, family: str) -> None:
    net = NETS[family]
    svc = synproxy_service(ipvs, net, FwdMethod.MASQ, port=80)
    refused = synproxy_service(ipvs, net, FwdMethod.MASQ, port=8082, rs_port=9)
    peers.http_get(net.vip, 80)
    counted = _sp(ipvs, svc) or {}
    assert counted["synproxy_conn_proxied"] == 1, counted

    # A real server that refuses (nothing listens on port 9): a handshake
    # failure of that service, not of the other.
    with pytest.raises(OSError):
        peers.http_get(net.vip, 8082, timeout=5)
    assert (_sp(ipvs, refused) or {})["synproxy_rs_reset"] == 1, _sp(ipvs, refused)
    assert _sp(ipvs, svc) == counted

    plain = Service(addr=IP(net.vip), port=80, scheduler="rr", synproxy=False)
    ipvs.edit_service(plain)
    assert _sp(ipvs, svc) == counted, "switched off: the counters stay, unchanged"
    peers.http_get(net.vip, 80)
    assert _sp(ipvs, svc) == counted, "without the SYN proxy nothing counts"
    ipvs.edit_service(svc)
    peers.http_get(net.vip, 80)
    again = _sp(ipvs, svc) or {}
    assert again["synproxy_conn_proxied"] == 2, "on again: counting on from where it was"

    ipvs.del_service(svc)
    svc = synproxy_service(ipvs, net, FwdMethod.MASQ, port=80)
    assert set((_sp(ipvs, svc) or {"x": 1}).values()) == {0}, "a new service starts at zero"
