"""No client can make a real server with toa.ko report another address.

An unmodified server in rs1 (``socket.accept()`` and ``getpeername()``) with
toa.ko believing lb's addresses. Crafted clients in the client namespace play
handshakes with frames and put TOA options of a forged address on any of their
segments: the SYN, the handshake ACK (with room for the balancer's option, or
a header full of NOPs that leaves none), pure ACKs, in-order, later and
out-of-order data, among random other options. Through FULLNAT services, with
and without the SYN proxy, and through a NAT service (the client reaches rs1
directly), with ``fullnat_toa`` 1 and 0, both families, the reported peer is:

- NAT: the client itself (toa.ko does not believe a client);
- FULLNAT, ``fullnat_toa`` 1: the client, or a laddr when no segment had room
  for the balancer's option; the client whenever the handshake ACK had room;
- FULLNAT, ``fullnat_toa`` 0: a laddr;

and never the forged address. The random sequences print their seed
(``TOA_FORGERY_SEED`` replays them).
"""

from __future__ import annotations

import os
import random
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import ip_address as IP

import pytest

from ipvs_synproxy.kernel.model import Dest, FwdMethod, Service
from ipvs_synproxy.kernel.netlink import IPVS
from ipvs_synproxy_testbed import netns
from tests.vm.helpers import (
    ACK,
    NETS,
    PSH,
    RST,
    SYN,
    Capture,
    Net,
    eth_frame,
    insmod,
    lb_sysctls,
    nft,
    remove_toa,
    send_frames,
    toa_is_loaded,
    toa_option,
    wait_for,
)

PORT_NAT, PORT_FNAT, PORT_SP = 8180, 8181, 8182
RS_PORT = 8180
FORGED = {"ipv4": ("203.0.113.66", 6666), "ipv6": ("2001:db8:66::66", 6666)}
# crafted source ports, below the client's ephemeral range
SPORTS = range(42000, 43000)
ROUNDS = 12


def _seed() -> int:
    env = os.environ.get("TOA_FORGERY_SEED")
    return int(env) if env else int.from_bytes(os.urandom(4), "big")


def _seg(sport: int, dport: int, seq: int, ack: int, flags: int, opts: bytes = b"",
         payload: bytes = b"") -> bytes:
    opts += b"\x01" * (-len(opts) % 4)
    assert len(opts) <= 40
    return struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                       (20 + len(opts)) // 4 << 4, flags, 64240, 0, 0) + opts + payload


def _synack_seq(frames: list[bytes], dport: int, sport: int) -> int | None:
    from scapy.layers.inet import TCP
    from scapy.layers.l2 import Ether

    for f in frames:
        pkt = Ether(f)
        if TCP in pkt and pkt[TCP].sport == dport and pkt[TCP].dport == sport \
                and pkt[TCP].flags.S and pkt[TCP].flags.A:
            return int(pkt[TCP].seq)
    return None


@dataclass
class Client:
    """One crafted client connection: segments as frames from the client namespace."""

    net: Net
    port: int
    sport: int
    isn: int = field(default_factory=lambda: random.getrandbits(32))
    server_isn: int = 0
    sent: int = 0

    def send(self, flags: int, opts: bytes = b"", payload: bytes = b"",
             offset: int = 0) -> None:
        seq = self.isn + (0 if flags & SYN else 1 + offset)
        ack = 0 if flags == SYN else self.server_isn + 1
        send_frames([eth_frame(self.net.version,
                             _seg(self.sport, self.port, seq, ack, flags, opts, payload))])
        if payload:
            self.sent = max(self.sent, offset + len(payload))

    def syn(self, opts: bytes) -> None:
        cap = Capture("client")
        try:
            self.send(SYN, opts)
            assert wait_for(lambda: _synack_seq(cap.frames, self.port, self.sport)
                            is not None, 10), \
                f"no SYN/ACK for {self.sport} -> {self.port} (SYN options {opts.hex()})"
            seq = _synack_seq(cap.frames, self.port, self.sport)
            assert seq is not None
            self.server_isn = seq
        finally:
            cap.stop()

    def reset(self) -> None:
        self.send(RST | ACK, offset=self.sent)


class Server:
    """An unmodified TCP server in rs1: accept(), then getpeername()."""

    def __init__(self, addr: str) -> None:
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        self.sock = netns.socket_in("rs1", fam, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((addr, RS_PORT))
        self.sock.listen(64)
        self.sock.settimeout(10)

    def close(self) -> None:
        self.sock.close()


def _opt_pieces(rng: random.Random, room: int, eol: bool = False) -> list[bytes]:
    """Random whole options that change nothing for the handshake (NOPs, unknown
    kinds, an end-of-list if ``eol``), at most room bytes together. No
    timestamps: the SYN proxy's cookie checks those; and the handshake's
    option lists stay well formed, or the SYN proxy rightly refuses the
    segment (a broken list is test_synproxy_fuzz's subject)."""
    out: list[bytes] = []
    kinds = ["nop", "unknown", "unknown"] + (["eol"] if eol else [])
    while rng.random() < 0.6:
        kind = rng.choice(kinds)
        piece = {"nop": b"\x01",
                 "unknown": bytes([rng.choice([30, 76, 99, 200]), 4]) + os.urandom(2),
                 "eol": b"\x00"}[kind]
        if sum(map(len, out)) + len(piece) > room:
            break
        out.append(piece)
    return out


def _opt_noise(rng: random.Random, room: int) -> bytes:
    return b"".join(_opt_pieces(rng, room))


@dataclass
class Plan:
    """What a crafted client sends, and whether the handshake ACK has room for TOA."""

    syn: bytes
    ack: bytes
    later: list[tuple[int, bytes, bytes, int]]
    ack_has_room: bool
    inorder: int = 0


def _plan(rng: random.Random, family: str) -> Plan:
    forged = toa_option(*FORGED[family])
    toalen = 8 if family == "ipv4" else 20

    def with_forged(room: int, eol: bool = False) -> bytes:
        pieces = _opt_pieces(rng, room - len(forged), eol)
        pieces.insert(rng.randint(0, len(pieces)), forged)
        return b"".join(pieces)

    syn = b"\x02\x04\x05\x78" + (with_forged(36) if rng.random() < 0.5 else b"")
    shape = rng.choice(["forged", "full", "full-forged", "plain", "noise"])
    ack = {"forged": with_forged(40 - toalen),
           "full": b"\x01" * 40,
           "full-forged": with_forged(40),
           "plain": b"",
           "noise": _opt_noise(rng, 40)}[shape]
    ack += b"\x01" * (-len(ack) % 4)
    later: list[tuple[int, bytes, bytes, int]] = []
    offset = 0
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(["pure", "data", "data", "ooo"])
        opts = with_forged(rng.choice([40, 40 - toalen, len(forged)]), eol=True) \
            if rng.random() < 0.7 else rng.choice([b"", b"\x01" * 40])
        if kind == "pure":
            later.append((ACK, opts, b"", 0))
        elif kind == "data":
            payload = os.urandom(rng.randint(1, 64))
            later.append((ACK | PSH, opts, payload, offset))
            offset += len(payload)
        else:
            later.append((ACK | PSH, opts, os.urandom(8), offset + 100))
    # the data in order, so that the server reads it all and every segment is seen
    if not any(p for _, _, p, off in later if off == 0 and p):
        later.append((ACK | PSH, b"", os.urandom(4), 0))
        offset = max(offset, 4)
    return Plan(syn, ack, later, len(ack) + toalen <= 40, offset)


@pytest.fixture
def forgery_setup(ipvs: IPVS) -> Iterator[IPVS]:
    """The three services on VIP:818x -> rs1:8180, toa.ko in rs1, client RSTs dropped."""
    assert not toa_is_loaded()
    insmod()
    try:
        with nft("client", f"tcp sport {SPORTS.start}-{SPORTS.stop - 1} tcp flags rst drop",
                 hook="output"):
            yield ipvs
    finally:
        remove_toa()


def _services(ipvs: IPVS, net: Net) -> None:
    rs = IP(net.rs["rs1"])
    for port, fwd, sp in ((PORT_NAT, FwdMethod.MASQ, False),
                          (PORT_FNAT, FwdMethod.FULLNAT, False),
                          (PORT_SP, FwdMethod.FULLNAT, True)):
        svc = Service(addr=IP(net.vip), port=port, scheduler="rr", synproxy=sp)
        ipvs.add_service(svc)
        ipvs.add_dest(svc, Dest(addr=rs, port=RS_PORT, fwd=fwd, weight=1))
        if fwd is FwdMethod.FULLNAT:
            for laddr in net.laddrs:
                ipvs.add_laddr(svc, IP(laddr))


def _peer_after(server: Server, client: Client, plan: Plan) -> tuple[str, int]:
    client.syn(plan.syn)
    client.send(ACK, plan.ack)
    conn, _ = server.sock.accept()
    try:
        for flags, opts, payload, offset in plan.later:
            client.send(flags, opts, payload, offset)
        # every in-order byte read: every segment before it has been processed
        got = 0
        conn.settimeout(10)
        while got < plan.inorder:
            chunk = conn.recv(4096)
            assert chunk, "the connection closed early"
            got += len(chunk)
        time.sleep(0.05)
        peer = conn.getpeername()
        return str(IP(peer[0])), int(peer[1])
    finally:
        conn.close()
        client.reset()


@pytest.mark.parametrize("toa", [1, 0])
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_no_client_packet_sequence_makes_the_server_report_another_address(
        forgery_setup: IPVS, family: str, toa: int) -> None:
    net = NETS[family]
    _services(forgery_setup, net)
    seed = _seed()
    print(f"TOA forgery seed {seed} ({family}, fullnat_toa={toa})")
    rng = random.Random(seed)
    base = SPORTS.start + 100 * (2 * (family == "ipv6") + toa)
    sports = iter(rng.sample(range(base, base + 100), ROUNDS * 3))
    client_ip = str(IP(net.client))
    laddrs = {str(IP(a)) for a in net.laddrs}
    forged = str(IP(FORGED[family][0]))
    server = Server(net.rs["rs1"])
    try:
        with lb_sysctls(fullnat_toa=toa):
            for i in range(ROUNDS):
                for port in (PORT_NAT, PORT_FNAT, PORT_SP):
                    plan = _plan(rng, family)
                    sport = next(sports)
                    client = Client(net, port, sport, isn=rng.getrandbits(32))
                    peer = _peer_after(server, client, plan)
                    where = f"round {i} port {port} sport {sport} seed {seed}: {plan}"
                    assert peer[0] != forged, where
                    if port == PORT_NAT:
                        assert peer == (client_ip, sport), where
                    elif toa == 0:
                        assert peer[0] in laddrs, (peer, where)
                    elif plan.ack_has_room:
                        assert peer == (client_ip, sport), (peer, where)
                    else:
                        assert peer == (client_ip, sport) or peer[0] in laddrs, (peer, where)
    finally:
        server.close()


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_an_ack_without_room_then_a_forged_pure_ack_names_the_client(
        forgery_setup: IPVS, family: str) -> None:
    """The audit's case: a handshake ACK of NOPs leaves no room for TOA
    (fullnat_toa_no_space), then a pure ACK and the first data carry a forged
    option: the balancer blanks both and puts the client on the data."""
    net = NETS[family]
    _services(forgery_setup, net)
    forged = toa_option(*FORGED[family])
    before = forgery_setup.ext_stats()
    server = Server(net.rs["rs1"])
    try:
        for n, port in enumerate((PORT_FNAT, PORT_SP)):
            sport = SPORTS.stop - 1 - n - 10 * (family == "ipv6")
            plan = Plan(b"\x02\x04\x05\x78", b"\x01" * 40,
                        [(ACK, forged, b"", 0), (ACK | PSH, forged, b"hello", 0)], False, 5)
            peer = _peer_after(server, Client(net, port, sport), plan)
            assert peer == (str(IP(net.client)), sport), peer
    finally:
        server.close()
    after = forgery_setup.ext_stats()
    assert after["fullnat_toa_no_space"] >= before["fullnat_toa_no_space"] + 2
    assert after["fullnat_toa_scrubbed"] >= before["fullnat_toa_scrubbed"] + 4


def test_behind_a_trusted_upstream_balancer_its_option_is_passed_on(
        forgery_setup: IPVS) -> None:
    """fullnat_toa_trust 1 (two tiers): the option a client packet carries is the
    upstream balancer's, passed on unchanged, and none of ours is added."""
    net = NETS["ipv4"]
    _services(forgery_setup, net)
    upstream = ("203.0.113.7", 777)
    before = forgery_setup.ext_stats()
    server = Server(net.rs["rs1"])
    try:
        with lb_sysctls(fullnat_toa_trust=1):
            plan = Plan(b"\x02\x04\x05\x78", toa_option(*upstream),
                        [(ACK | PSH, b"", b"x", 0)], True, 1)
            peer = _peer_after(server, Client(net, PORT_FNAT, SPORTS.stop - 20), plan)
    finally:
        server.close()
    assert peer == upstream
    assert forgery_setup.ext_stats()["fullnat_toa_scrubbed"] == before["fullnat_toa_scrubbed"]
