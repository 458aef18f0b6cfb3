"""The XDP fast path (issue 22, first part): the program on lb's client-facing
eth0 answers SYNs to SYN-proxy VIPs with the module's own cookie, and IPVS
takes the connection from the cookie ACK on.

Native mode on a veth hands XDP_TX frames to the peer, which takes them only
when it runs XDP itself: the fixture gives lb's peer in the root namespace an
XDP_PASS program (tests/vm/xdp_pass.c) while a native-mode test runs (a NIC
needs nothing of the kind).
"""
from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipvs_synproxy.build import xdp as xdp_build
from ipvs_synproxy.kernel import cookie, xdp
from ipvs_synproxy.kernel.model import FwdMethod
from ipvs_synproxy.kernel.netlink import IPVS
from ipvs_synproxy_testbed import flood, netns, peers
from tests.vm.helpers import (
    FAMILIES,
    METHODS,
    NETS,
    CraftedClient,
    conn_states,
    delta,
    dmesg_lines,
    ext_stats_file,
    kernel_complaints,
    lose_connection,
    nft,
    ns_sysctls,
    syn_options,
    synproxy_service,
    transfer,
    wait_for,
)

DEV = "eth0"
PEER = "lb-eth0"  # lb's eth0 seen from the root namespace (topology.up)
MODES = ("generic", "native")
XFER_BYTES = 50 * 1024 * 1024


def _keys(secret: bytes) -> list[bytes]:
    period = int(netns.read_sysctl("lb", "net.ipv4.vs.synproxy_secret_period"))
    now = int(time.time())
    return [cookie.epoch_key(secret, e) for e in range(now // period, now // period - 3, -1)]


def _peer_pass(on: bool) -> None:
    if on:
        obj = xdp_build.build(Path(__file__).with_name("xdp_pass.c"))
        cmd = ["ip", "link", "set", "dev", PEER, "xdpdrv", "obj", str(obj), "sec", "xdp"]
    else:
        cmd = ["ip", "link", "set", "dev", PEER, "xdpdrv", "off"]
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.fixture(params=MODES)
def attached(request: pytest.FixtureRequest, ipvs: IPVS) -> Iterator[tuple[str, bytes]]:
    """The program on lb's eth0 in the mode of the parameter, with a secret the
    test knows; detached (and the peer's XDP_PASS with it) afterwards."""
    mode = request.param
    secret = os.urandom(16)
    obj = xdp_build.build()
    if mode == "native":
        _peer_pass(True)
    try:
        st = xdp.attach(obj, DEV, "lb", ipvs, secret, mode)
        assert st.attached == mode, st
        yield mode, secret
    finally:
        xdp.detach(DEV, "lb")
        if mode == "native":
            _peer_pass(False)


def _stats() -> dict[str, int]:
    return xdp.read_stats(DEV, "lb")


@pytest.mark.parametrize("family", FAMILIES)
def test_a_syn_is_answered_by_xdp_with_the_modules_cookie(
        ipvs: IPVS, real_servers: dict, attached: tuple[str, bytes], family: str) -> None:
    """A crafted SYN gets its SYN/ACK from the program: the module's
    synproxy_syn_received does not move, the program's counter does; the
    cookie and the TSval bits are the Python reference's (bit for bit the
    module's), and the module opens the connection on the cookie's ACK."""
    from scapy.layers.inet import TCP

    _, secret = attached
    net = NETS[family]
    synproxy_service(ipvs, net, FwdMethod.MASQ)
    xdp.mirror(ipvs)
    sport = 42000 + (family == "ipv6")
    isn = int.from_bytes(os.urandom(4), "big")
    before, xbefore = ext_stats_file(), _stats()
    with nft("client", f"tcp sport {sport} tcp flags rst drop", hook="output"):
        peer = CraftedClient(net, sport, isn)
        try:
            peer.syn(syn_options(1460, 7, True, True, tsval=1000))
            assert _stats()["syn_answered"] - xbefore["syn_answered"] == 1
            assert delta(before, "synproxy_syn_received") == 0
            opts = dict(peer.synack[TCP].options)
            tsval, echoed = opts["Timestamp"]
            assert echoed == 1000
            got = cookie.check_cookie(_keys(secret), net.client, net.vip, sport, 80, isn + 1,
                                      peer.cookie + 1, tsecr=tsval)
            assert got == cookie.SynOptions(mss=1460, wscale=7, sack=True), got
            assert opts["WScale"] == cookie.DEFAULT_WSCALE and "SAckOK" in opts
            peer.ack(b"\x01\x01\x08\x0a" + (1001).to_bytes(4, "big") + tsval.to_bytes(4, "big"),
                     b"GET / HTTP/1.0\r\n\r\n")
            assert wait_for(lambda: delta(before, "synproxy_conn_proxied") == 1, 20), \
                ext_stats_file()
            assert delta(before, "synproxy_ack_valid") == 1
        finally:
            peer.close()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_real_clients_connect_and_transfer(ipvs: IPVS, real_servers: dict, blob_servers: object,
                                           attached: tuple[str, bytes], method: str,
                                           family: str) -> None:
    """Linux clients, with timestamps, window scaling and SACK on and then all
    off, are answered by the program and served by IPVS; 50 MB arrive intact
    each way, downloaded with the options on and uploaded with them off."""
    net = NETS[family]
    synproxy_service(ipvs, net, METHODS[method], port=8080)
    synproxy_service(ipvs, net, METHODS[method])
    xdp.mirror(ipvs)
    before, xbefore = ext_stats_file(), _stats()
    served = [peers.http_get(net.vip, 80, timeout=20).server for _ in range(4)]
    with ns_sysctls(("client",), tcp_timestamps="0", tcp_window_scaling="0", tcp_sack="0"):
        served += [peers.http_get(net.vip, 80, timeout=20).server for _ in range(2)]
    assert sorted(set(served)) == ["rs1", "rs2"], served
    transfer(net, 8080, "download", XFER_BYTES)
    with ns_sysctls(("client",), tcp_timestamps="0", tcp_window_scaling="0", tcp_sack="0"):
        transfer(net, 8080, "upload", XFER_BYTES)
    answered = _stats()["syn_answered"] - xbefore["syn_answered"]
    assert answered >= 8, answered
    assert delta(before, "synproxy_syn_received") == 0
    assert delta(before, "synproxy_conn_proxied") >= 8
    assert delta(before, "synproxy_ack_invalid") == 0


def test_a_forged_ack_is_dropped(ipvs: IPVS, real_servers: dict,
                                 attached: tuple[str, bytes]) -> None:
    """An ACK whose number no SYN/ACK of the program carried opens nothing."""
    net = NETS["ipv4"]
    synproxy_service(ipvs, net, FwdMethod.FULLNAT)
    xdp.mirror(ipvs)
    sport, isn = 42100, int.from_bytes(os.urandom(4), "big")
    before = ext_stats_file()
    with nft("client", f"tcp sport {sport} tcp flags rst drop", hook="output"):
        peer = CraftedClient(net, sport, isn)
        try:
            peer.syn(syn_options(1460, 7, True, False))
            from scapy.layers.inet import TCP

            peer.synack[TCP].seq ^= 0x10000   # ack a cookie off by a bit of its hash
            peer.ack()
            assert wait_for(lambda: delta(before, "synproxy_ack_invalid") == 1, 20), \
                ext_stats_file()
            assert delta(before, "synproxy_ack_valid") == 0
            peer.acked = False
        finally:
            peer.close()


def test_a_secret_set_over_netlink_is_in_force_in_both_places(
        ipvs: IPVS, real_servers: dict, attached: tuple[str, bytes]) -> None:
    """xdp.set_secret, the control plane's one path: the module and the
    program sign with the new secret at once (the cookie checks against it
    alone), and clients keep connecting."""
    net = NETS["ipv4"]
    synproxy_service(ipvs, net, FwdMethod.MASQ)
    xdp.mirror(ipvs)
    new = os.urandom(16)
    xdp.set_secret(ipvs, new)
    sport, isn = 42200, int.from_bytes(os.urandom(4), "big")
    with nft("client", f"tcp sport {sport} tcp flags rst drop", hook="output"):
        peer = CraftedClient(net, sport, isn)
        try:
            peer.syn(syn_options(1460, None, False, False))
            assert cookie.check_cookie(_keys(new), net.client, net.vip, sport, 80, isn + 1,
                                       peer.cookie + 1) is not None
        finally:
            peer.close()
    before = ext_stats_file()
    assert peers.http_get(net.vip, 80, timeout=20).server in ("rs1", "rs2")
    assert delta(before, "synproxy_ack_valid") == 1
    assert delta(before, "synproxy_syn_received") == 0


def test_detaching_returns_to_the_module_with_no_connection_lost(
        ipvs: IPVS, real_servers: dict, attached: tuple[str, bytes]) -> None:
    """A connection opened through the program goes on after it is taken off;
    new SYNs reach the module again."""
    net = NETS["ipv4"]
    synproxy_service(ipvs, net, FwdMethod.FULLNAT)
    xdp.mirror(ipvs)
    sock = netns.socket_in("client", 2, 1)
    sock.settimeout(20)
    sock.connect((net.vip, 80))
    xdp.detach(DEV, "lb")
    before = ext_stats_file()
    sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
    reply = b""
    while chunk := sock.recv(4096):
        reply += chunk
    sock.close()
    assert reply.startswith(b"HTTP/1.0 200"), reply[:80]
    assert peers.http_get(net.vip, 80, timeout=20).server in ("rs1", "rs2")
    assert delta(before, "synproxy_syn_received") == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_a_mixed_malformed_flood_is_counted_and_the_kernel_stays_silent(
        ipvs: IPVS, attached: tuple[str, bytes], family: str) -> None:
    """Every packet of the mixed flood (valid SYNs, ACKs, malformed SYNs and
    segments) is answered, dropped as malformed or passed, and counted; the
    kernel logs nothing."""
    net = NETS[family]
    synproxy_service(ipvs, net, FwdMethod.FULLNAT)
    xdp.mirror(ipvs)
    dmesg = dmesg_lines()
    xbefore = _stats()
    sent = flood.run_flood("mixed", target=net.vip, port=80, count=3000, rate_pps=1500,
                           family=net.version, seed=22)
    print(f"mixed flood seed 22: {sent}")
    time.sleep(1)
    after = _stats()
    moved = {k: after[k] - xbefore[k] for k in after}
    assert moved["syn_answered"] > 0 and moved["syn_malformed"] > 0, moved
    assert moved["syn_answered"] + moved["syn_malformed"] + moved["passed"] >= sent.sent, \
        (moved, sent)
    assert kernel_complaints(dmesg) == []


# ---- SYNs on a tuple with a past go to the module ------------------------------------------

def _sport(base: int, mode: str, family: str = "ipv4") -> int:
    """A client port of its own per test and parameter: lb keeps each
    connection's tuple for minutes after the test (TIME_WAIT)."""
    return base + MODES.index(mode) + 2 * (family == "ipv6")


def test_a_client_that_lost_its_connection_reconnects_through_the_module(
        ipvs: IPVS, real_servers: dict, attached: tuple[str, bytes]) -> None:
    """The client forgets a connection opened through the program (its RST
    never reaches lb) and connects again from the same port. The program has
    seen that tuple's segments, so it leaves the SYN to the module, which
    gives it to the live connection's real server: its challenge ACK makes
    the client reset the old connection, and the retried SYN opens a new
    one. Had the program answered the SYN, the new connection would hang in
    the old one until that expired."""
    mode = attached[0]
    net = NETS["ipv4"]
    synproxy_service(ipvs, net, FwdMethod.FULLNAT)
    xdp.mirror(ipvs)
    sport = _sport(47600, mode)
    lose_connection(net, sport)
    before, xbefore = ext_stats_file(), _stats()
    try:
        reply = peers.http_get(net.vip, 80, timeout=10, source_port=sport)
    except TimeoutError:
        pytest.fail(f"the new connection hung in the old one: {_moved(xbefore)}")
    assert reply.server in ("rs1", "rs2")
    assert _moved(xbefore)["syn_known"] >= 1
    assert delta(before, "synproxy_syn_conn") >= 1
    assert delta(before, "synproxy_reuse_close") == 1


def test_reconnecting_in_time_wait_without_timestamps_goes_through_the_module(
        ipvs: IPVS, real_servers: dict, attached: tuple[str, bytes]) -> None:
    """A client's connection with timestamps ends (lb keeps it in TIME_WAIT)
    and the client reconnects from the same port with timestamps off. Only
    the SYN's ISN, which the module notes when it answers the SYN, tells the
    new handshake's ACK from a stray segment of the old connection: the
    program leaves SYNs on a tuple it has seen to the module."""
    mode = attached[0]
    net = NETS["ipv4"]
    synproxy_service(ipvs, net, FwdMethod.MASQ)
    xdp.mirror(ipvs)
    sport = _sport(47610, mode)
    assert peers.http_get(net.vip, 80, timeout=20, source_port=sport).server
    assert wait_for(lambda: conn_states(sport, net.client) == ["TIME_WAIT"], 20), \
        conn_states(sport, net.client)
    before, xbefore = ext_stats_file(), _stats()
    with ns_sysctls(("client",), tcp_timestamps="0"):
        try:
            reply = peers.http_get(net.vip, 80, timeout=10, source_port=sport)
        except TimeoutError:
            pytest.fail(f"the new connection hung in the old one: {_moved(xbefore)}")
    assert reply.server in ("rs1", "rs2")
    assert _moved(xbefore)["syn_known"] == 1
    assert delta(before, "synproxy_reuse_time_wait") == 1


def _moved(before: dict[str, int]) -> dict[str, int]:
    return {k: v - before[k] for k, v in _stats().items()}
