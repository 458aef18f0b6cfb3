"""The cookie's own guarantees: the TSval's integrity bits, checked in the TSecr
of a timestamp ACK, and the window scale announced in the SYN/ACK, which the
connection keeps even when ``synproxy_wscale`` changes before the ACK comes.

Crafted clients play the handshake with frames from the client namespace
(``tcp flags rst`` of their ports dropped on the client's output: its stack
knows no socket for them); real Linux clients show that nothing else changes
for them, with the proxy's timestamps on and off.
"""

from __future__ import annotations

import os
import time

import pytest

from ipvs_synproxy.kernel import cookie
from ipvs_synproxy.kernel.model import FwdMethod
from ipvs_synproxy.kernel.netlink import IPVS
from ipvs_synproxy_testbed import netns, peers
from tests.vm.helpers import (
    FAMILIES,
    METHODS,
    NETS,
    Capture,
    CraftedClient,
    delta,
    ext_stats_file,
    lb_sysctls,
    nft,
    options_of,
    read_synacks,
    syn_options,
    synproxy_service,
    wait_for,
)

REQUEST = b"GET / HTTP/1.0\r\nHost: vip\r\n\r\n"


def _keys(secret: bytes, wscale: int = cookie.DEFAULT_WSCALE) -> list[bytes]:
    period = int(netns.read_sysctl("lb", "net.ipv4.vs.synproxy_secret_period"))
    now = time.time()
    # this epoch's and the previous one's, and the one before in case a
    # boundary passed since the SYN/ACK was made
    return [cookie.epoch_key(secret, e, wscale)
            for e in range(int(now) // period, int(now) // period - 3, -1)]


def _syn_at_rs(frames: list[bytes], port: int) -> bool:
    from scapy.layers.inet import TCP
    from scapy.layers.l2 import Ether

    return any(TCP in Ether(f) and Ether(f)[TCP].dport == port and Ether(f)[TCP].flags == "S"
               for f in frames)


def _ts(tsval: int, tsecr: int) -> bytes:
    return b"\x01\x01\x08\x0a" + tsval.to_bytes(4, "big") + tsecr.to_bytes(4, "big")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_a_timestamp_ack_must_echo_the_tsval_bits(ipvs: IPVS, real_servers: dict,
                                                  method: str, family: str) -> None:
    """The SYN/ACK's TSval carries 8 bits of the cookie (checked against the
    Python reference); an ACK with the right ISN but another low TSecr byte is
    refused and counted, and opens nothing; the same ACK echoing the TSval
    opens the connection."""
    from scapy.layers.inet import TCP

    net = NETS[family]
    synproxy_service(ipvs, net, METHODS[method])
    secret = os.urandom(cookie.KEY_LEN)
    ipvs.set_synproxy_secret(secret)
    sport = 41000 + 10 * (family == "ipv6") + (method == "fullnat")
    isn = int.from_bytes(os.urandom(4), "big")
    with nft("client", f"tcp sport {sport} tcp flags rst drop", hook="output"):
        peer = CraftedClient(net, sport, isn)
        rs1, rs2 = Capture("rs1"), Capture("rs2")
        try:
            peer.syn(syn_options(1460, 7, True, True, tsval=1000))
            ours, echoed = options_of(peer.synack)["Timestamp"]
            assert echoed == 1000
            keys = _keys(secret)
            assert cookie.check_cookie(keys, net.client, net.vip, sport, 80, isn + 1,
                                       peer.cookie + 1, tsecr=ours) is not None, \
                "the TSval does not carry the reference's hash bits"
            before = ext_stats_file()
            for wrong in (ours ^ 0x01, ours ^ 0x80, (ours & ~0xFF) | ((ours + 17) & 0xFF)):
                peer.ack(_ts(1001, wrong))
            assert wait_for(lambda: delta(before, "synproxy_ack_ts_invalid") == 3, 20), \
                delta(before, "synproxy_ack_ts_invalid")
            time.sleep(1.0)                 # window for a SYN at a real server
            assert not _syn_at_rs(rs1.frames + rs2.frames, 80), \
                "an ACK without the TSval's bits opened the connection"
            assert delta(before, "synproxy_ack_valid") == 0
            peer.ack(_ts(1002, ours))
            assert wait_for(lambda: _syn_at_rs(rs1.frames + rs2.frames, 80), 20), \
                "the ACK echoing the TSval did not open the connection"
            assert delta(before, "synproxy_ack_valid") == 1
        finally:
            rs1.stop()
            rs2.stop()
            peer.close()
    assert peer.synack[TCP].flags == "SA"


@pytest.mark.parametrize("timestamps", [1, 0])
@pytest.mark.parametrize("family", FAMILIES)
def test_real_clients_connect_with_the_proxys_timestamps_on_and_off(
        ipvs: IPVS, real_servers: dict, family: str, timestamps: int) -> None:
    """Linux clients (timestamps on) are served either way; with
    synproxy_timestamp on every SYN/ACK's TSval carries the cookie's bits, and
    no ACK of theirs is ever refused for them."""
    net = NETS[family]
    synproxy_service(ipvs, net, FwdMethod.FULLNAT)
    secret = os.urandom(cookie.KEY_LEN)
    ipvs.set_synproxy_secret(secret)
    before = ext_stats_file()
    at_client, at_lb = Capture("client"), Capture("lb")
    try:
        with lb_sysctls(synproxy_timestamp=timestamps):
            served = [peers.http_get(net.vip, 80, timeout=20).server for _ in range(10)]
        time.sleep(0.5)
    finally:
        synacks = read_synacks(at_client.stop())
        syns = _client_syns(at_lb.stop())
    assert sorted(set(served)) == ["rs1", "rs2"]
    assert delta(before, "synproxy_ack_valid") >= 10
    assert delta(before, "synproxy_ack_ts_invalid") == 0
    assert delta(before, "synproxy_ack_invalid") == 0
    assert len(synacks) >= 10
    keys = _keys(secret)
    for sport, synack in synacks.items():
        opts = options_of(synack)
        assert ("Timestamp" in opts) == bool(timestamps), (sport, opts)
        if timestamps:
            from scapy.layers.inet import TCP

            got = cookie.check_cookie(keys, net.client, net.vip, sport, 80,
                                      syns[sport] + 1, synack[TCP].seq + 1,
                                      tsecr=opts["Timestamp"][0])
            assert got is not None, (sport, "TSval without the cookie's bits")


def _client_syns(frames: list[bytes]) -> dict[int, int]:
    """Client SYNs to port 80 in frames: their ISN by source port."""
    from scapy.layers.inet import TCP
    from scapy.layers.l2 import Ether

    out = {}
    for f in frames:
        pkt = Ether(f)
        if TCP in pkt and pkt[TCP].dport == 80 and pkt[TCP].flags == "S":
            out[int(pkt[TCP].sport)] = int(pkt[TCP].seq)
    return out


def _first_data(frames: list[bytes], sport: int, dport: int | None = None):
    """The first segment from sport (to dport, if given) carrying data, with its
    window and the window scale of its flow's SYN/ACK; only flows whose SYN/ACK
    is among the frames count, so an earlier test's connection still sending
    from sport is not taken for this one. None if there is none."""
    from scapy.layers.inet import TCP
    from scapy.layers.l2 import Ether

    wscale: dict[tuple[str, int], int | None] = {}
    for f in frames:
        pkt = Ether(f)
        if TCP not in pkt or pkt[TCP].sport != sport:
            continue
        if dport is not None and pkt[TCP].dport != dport:
            continue
        flow = (pkt[TCP].underlayer.dst, int(pkt[TCP].dport))
        if pkt[TCP].flags.S and pkt[TCP].flags.A:
            wscale[flow] = dict(pkt[TCP].options).get("WScale")
        elif len(pkt[TCP].payload) and flow in wscale:
            return int(pkt[TCP].window), wscale[flow]
    return None


@pytest.mark.parametrize("method", METHODS)
def test_the_announced_window_scale_holds_when_the_sysctl_changes_before_the_ack(
        ipvs: IPVS, real_servers: dict, method: str) -> None:
    """The SYN/ACK announces synproxy_wscale 7; it is set to 2 before the
    client's ACK. The key that validates the ACK is the one made for 7, and the
    real server's windows reach the client scaled for 7: the window the client
    sees is the server's, rescaled from the server's own scale to 7."""
    net = NETS["ipv4"]
    synproxy_service(ipvs, net, METHODS[method])
    sport = 41100 + (method == "fullnat")
    isn = int.from_bytes(os.urandom(4), "big")
    with nft("client", f"tcp sport {sport} tcp flags rst drop", hook="output"), \
            lb_sysctls(synproxy_wscale=7):
        peer = CraftedClient(net, sport, isn)
        from_rs = Capture("lb", "eth1")     # what the real servers send lb
        try:
            peer.syn(syn_options(1460, 7, True, False))
            assert options_of(peer.synack)["WScale"] == 7
            before = ext_stats_file()
            with lb_sysctls(synproxy_wscale=2):
                peer.ack(payload=REQUEST)
                assert wait_for(lambda: _first_data(peer.cap.frames, 80, sport) is not None,
                                20), \
                    "no answer from the real server"
            assert delta(before, "synproxy_ack_valid") == 1
        finally:
            rs_frames = from_rs.stop()
            client_frames = peer.close()
    at_rs = _first_data(rs_frames, 80)
    at_client = _first_data(client_frames, 80, sport)
    assert at_rs is not None and at_client is not None
    (w_rs, rs_scale), (w_client, _) = at_rs, at_client
    assert rs_scale is not None, "the real server's SYN/ACK has no window scale"
    expect = min(-(-(w_rs << rs_scale) // (1 << 7)), 0xFFFF)
    wrong = min(-(-(w_rs << rs_scale) // (1 << 2)), 0xFFFF)
    assert expect != wrong
    assert w_client == expect, (f"client sees window {w_client}: the server's {w_rs} "
                                f"(scale {rs_scale}) rescaled to 7 is {expect}, to 2 {wrong}")
