"""The real-server TOA module (kernel_patches/toa) on the stock kernel, without FULLNAT.

A raw socket in ``lb`` (192.0.2.1 / 2001:db8:2::1) completes TCP handshakes by
hand with a listener in ``rs1`` and puts a TOA option on the handshake ACK (or
on the first data packet) claiming the client 198.51.100.2:4242 /
[2001:db8:1::2]:4242. With toa.ko loaded, accept() and getpeername() in rs1
report the claimed client; without it, the real sender.

lb's own TCP stack knows nothing of these connections and answers rs1's
SYN/ACK with a RST. So that the RST cannot kill the handshake, rs1 answers
with SYN cookies (``tcp_syncookies=2``): it keeps no half-open state for the
RST to reset, and the child socket is made from the cookie ACK, through the
same ``tcp_v{4,6}_syn_recv_sock`` the module probes.
"""

from __future__ import annotations

import ipaddress
import os
import random
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import count
from pathlib import Path

import pytest

from ipvs_synproxy_testbed import netns, topology
from tests.vm.helpers import STATS, insmod, nft, remove_toa, toa_is_loaded, toa_option

CLAIM4 = (topology.CLIENT4, 4242)
CLAIM6 = (topology.CLIENT6, 4242)
# One source port per hand-made connection: a random port can repeat one of
# the same test's still-open connections, and rs1 then answers the SYN with a
# challenge ACK instead of a SYN/ACK.
_sports = count(random.randint(40000, 50000))


def _pad(options: bytes) -> bytes:
    return options + b"\x01" * (-len(options) % 4)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return int(~s & 0xFFFF)



class RawTcp:
    """Hand-made TCP segments from ``src`` in lb to ``dst``:``dport``."""

    def __init__(self, src: str, dst: str, dport: int) -> None:
        self.family = socket.AF_INET6 if ":" in src else socket.AF_INET
        self.src, self.dst, self.dport = src, dst, dport
        self.sport = next(_sports)
        self.isn = random.getrandbits(32)
        self.sock = netns.socket_in("lb", self.family, socket.SOCK_RAW, socket.IPPROTO_TCP)
        self.sock.bind((src, 0))
        self.sock.settimeout(10)

    def close(self) -> None:
        self.sock.close()

    def _segment(self, seq: int, ack: int, flags: int, options: bytes = b"",
                 payload: bytes = b"") -> bytes:
        options = _pad(options)
        head = struct.pack("!HHIIBBHHH", self.sport, self.dport, seq & 0xFFFFFFFF,
                           ack & 0xFFFFFFFF, (5 + len(options) // 4) << 4, flags, 65535,
                           0, 0)
        seg = head + options + payload
        s, d = ipaddress.ip_address(self.src).packed, ipaddress.ip_address(self.dst).packed
        if self.family == socket.AF_INET:
            pseudo = s + d + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(seg))
        else:
            pseudo = s + d + struct.pack("!I3xB", len(seg), socket.IPPROTO_TCP)
        csum = _checksum(pseudo + seg)
        return seg[:16] + struct.pack("!H", csum) + seg[18:]

    def send(self, seg: bytes) -> None:
        self.sock.sendto(seg, (self.dst, 0))

    def _synack(self) -> int:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            data, addr = self.sock.recvfrom(65535)
            if addr[0] != self.dst:
                continue
            if self.family == socket.AF_INET:
                data = data[(data[0] & 0x0F) * 4:]
            sport, dport, seq, ack, _, flags = struct.unpack_from("!HHIIBB", data)
            if (sport, dport) == (self.dport, self.sport) and flags & 0x12 == 0x12 \
                    and ack == (self.isn + 1) & 0xFFFFFFFF:
                return int(seq)
        raise TimeoutError("no SYN/ACK from the listener")

    def handshake(self, ack_options: bytes = b"", data_options: bytes | None = None
                  ) -> None:
        """SYN, wait for the SYN/ACK, ACK (with ``ack_options``); then, if
        ``data_options`` is given, one data segment carrying them."""
        self.send(self._segment(self.isn, 0, 0x02, bytes([2, 4]) + struct.pack("!H", 1400)))
        self.server_isn = self._synack()
        self.send(self._segment(self.isn + 1, self.server_isn + 1, 0x10, ack_options))
        if data_options is not None:
            self.later(0x18, data_options, b"hello")

    def later(self, flags: int, options: bytes = b"", payload: bytes = b"",
              offset: int = 0) -> None:
        """A segment after the handshake, ``offset`` bytes into the client's data."""
        self.send(self._segment(self.isn + 1 + offset, self.server_isn + 1, flags, options,
                                payload))


class Listener:
    """A TCP listener in rs1."""

    def __init__(self, addr: str, port: int, dual_stack: bool = False) -> None:
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        self.sock = netns.socket_in("rs1", fam, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY,
                                 0 if dual_stack else 1)
        self.sock.bind((addr, port))
        self.sock.listen(16)
        self.sock.settimeout(10)

    def accept(self) -> tuple[socket.socket, tuple[str, int]]:
        conn, peer = self.sock.accept()
        return conn, (peer[0], peer[1])

    def close(self) -> None:
        self.sock.close()


def toa_stats() -> dict[str, int]:
    out = {}
    for line in STATS.read_text().splitlines():
        name, value = line.split()
        out[name] = int(value)
    return out


@pytest.fixture(scope="module")
def syncookies(topo: None) -> Iterator[None]:
    old = netns.read_sysctl("rs1", "net.ipv4.tcp_syncookies")
    netns.write_sysctl("rs1", "net.ipv4.tcp_syncookies", 2)
    yield
    netns.write_sysctl("rs1", "net.ipv4.tcp_syncookies", old)


@pytest.fixture
def toa(syncookies: None) -> Iterator[None]:
    """toa.ko loaded for the test, and unloaded cleanly afterwards."""
    assert not toa_is_loaded()
    insmod()
    yield
    remove_toa()


_port = iter(range(8100, 8200))


def _accept_after(listener: Listener, raw: RawTcp, ack_options: bytes = b"",
                  data_options: bytes | None = None,
                  ) -> tuple[socket.socket, tuple[str, int]]:
    try:
        raw.handshake(ack_options, data_options)
        return listener.accept()
    finally:
        raw.close()


@contextmanager
def toa_accept(ack_options: bytes, *, v6: bool = False, dual_stack: bool = False
               ) -> Iterator[tuple[socket.socket, tuple[str, int], int]]:
    """A crafted client in lb completes a handshake to a listener in rs1 with
    ``ack_options`` on its ACK; yields the accepted socket, accept()'s peer and
    the port, and closes both afterwards."""
    port = next(_port)
    rs, lb = (topology.RS6, topology.LB_SERVER6) if v6 else (topology.RS4, topology.LB_SERVER4)
    listener = Listener("::" if dual_stack else rs["rs1"], port, dual_stack=dual_stack)
    try:
        conn, peer = _accept_after(listener, RawTcp(lb, rs["rs1"], port), ack_options)
        with conn:
            yield conn, peer, port
    finally:
        listener.close()


def test_without_the_module_the_peer_is_the_real_sender(syncookies: None) -> None:
    assert not toa_is_loaded()
    with toa_accept(toa_option(*CLAIM4)) as (conn, peer, _):
        assert peer[0] == topology.LB_SERVER4
        assert conn.getpeername()[0] == topology.LB_SERVER4


def test_toa_on_the_handshake_ack_is_the_ipv4_peer(toa: None) -> None:
    before = toa_stats()
    with toa_accept(toa_option(*CLAIM4)) as (conn, peer, port):
        assert peer == CLAIM4
        assert conn.getpeername() == CLAIM4
        # the local side is untouched
        assert conn.getsockname() == (topology.RS4["rs1"], port)
    after = toa_stats()
    assert after["ack_toa_v4"] == before["ack_toa_v4"] + 1
    assert after["getname_v4"] >= before["getname_v4"] + 2


def test_toa_on_the_handshake_ack_is_the_ipv6_peer(toa: None) -> None:
    before = toa_stats()
    with toa_accept(toa_option(*CLAIM6), v6=True) as (conn, peer, _):
        assert peer == CLAIM6
        assert conn.getpeername()[:2] == CLAIM6
    assert toa_stats()["ack_toa_v6"] == before["ack_toa_v6"] + 1


def test_ipv4_toa_on_a_dual_stack_listener_is_v4_mapped(toa: None) -> None:
    with toa_accept(toa_option(*CLAIM4), dual_stack=True) as (_conn, peer, _):
        assert peer == (f"::ffff:{CLAIM4[0]}", CLAIM4[1])


def test_toa_on_the_first_data_packet_when_the_ack_had_none(toa: None) -> None:
    before = toa_stats()
    port = next(_port)
    listener = Listener(topology.RS4["rs1"], port)
    raw = RawTcp(topology.LB_SERVER4, topology.RS4["rs1"], port)
    try:
        raw.handshake(b"", toa_option(*CLAIM4))
        # accept() may only look once the data segment has been processed
        deadline = time.monotonic() + 10
        while toa_stats()["data_toa_v4"] == before["data_toa_v4"]:
            assert time.monotonic() < deadline, toa_stats()
            time.sleep(0.1)
        conn, peer = listener.accept()
        with conn:
            assert peer == CLAIM4
            assert conn.recv(16) == b"hello"
    finally:
        raw.close()
        listener.close()


def test_an_ipv6_client_cannot_be_shown_on_an_ipv4_socket(toa: None) -> None:
    before = toa_stats()
    with toa_accept(toa_option(*CLAIM6)) as (_conn, peer, _):
        assert peer[0] == topology.LB_SERVER4
    after = toa_stats()
    assert after["ack_toa_v6"] == before["ack_toa_v6"] + 1
    assert after["getname_family_mismatch"] == before["getname_family_mismatch"] + 1


def test_a_destroyed_socket_releases_its_entry(toa: None) -> None:
    base = toa_stats()["entries"]
    port = next(_port)
    listener = Listener(topology.RS4["rs1"], port)
    try:
        conn, peer = _accept_after(listener, RawTcp(topology.LB_SERVER4,
                                                    topology.RS4["rs1"], port),
                                   toa_option(*CLAIM4))
        assert peer == CLAIM4
        assert toa_stats()["entries"] == base + 1
        # rs1's FIN meets lb's RST (lb's stack knows no such connection): the
        # socket is destroyed and the module's destructor probe forgets it.
        conn.close()
        deadline = time.monotonic() + 15
        while toa_stats()["entries"] != base:
            assert time.monotonic() < deadline, toa_stats()
            time.sleep(0.2)
    finally:
        listener.close()


def test_first_data_without_the_option_ends_the_wait(toa: None) -> None:
    before = toa_stats()
    port = next(_port)
    listener = Listener(topology.RS4["rs1"], port)
    raw = RawTcp(topology.LB_SERVER4, topology.RS4["rs1"], port)
    try:
        raw.handshake(b"", b"")  # no option on the ACK, none on the data
        conn, peer = listener.accept()
        with conn:
            assert conn.recv(16) == b"hello"
            assert peer[0] == topology.LB_SERVER4
            after = toa_stats()
            assert after["no_toa"] == before["no_toa"] + 1
            assert after["entries"] == before["entries"]  # the pending entry is gone
    finally:
        raw.close()
        listener.close()


@pytest.mark.parametrize("length", [6, 7, 10, 20])
def test_malformed_toa_lengths_are_ignored_and_counted(toa: None, length: int) -> None:
    before = toa_stats()
    with toa_accept(toa_option(*CLAIM4, length=length)) as (_conn, peer, _):
        assert peer[0] == topology.LB_SERVER4
    after = toa_stats()
    assert after["malformed"] == before["malformed"] + 1
    assert after["ack_toa_v4"] == before["ack_toa_v4"]


def test_an_option_overrunning_the_header_is_ignored(toa: None) -> None:
    before = toa_stats()
    # kind 254 claiming 40 bytes inside a 12-byte option area
    bad = bytes([1, 1, 254, 40]) + bytes(8)
    with toa_accept(bad) as (_conn, peer, _):
        assert peer[0] == topology.LB_SERVER4
    assert toa_stats()["malformed"] == before["malformed"] + 1


def test_after_rmmod_the_peer_is_the_real_sender_again(syncookies: None) -> None:
    insmod()
    port = next(_port)
    listener = Listener(topology.RS4["rs1"], port)
    try:
        # a socket accepted while loaded keeps working across the unload
        conn, peer = _accept_after(listener, RawTcp(topology.LB_SERVER4,
                                                    topology.RS4["rs1"], port),
                                   toa_option(*CLAIM4))
        assert peer == CLAIM4
        assert toa_stats()["entries"] >= 1
        remove_toa()
        assert conn.getpeername()[0] == topology.LB_SERVER4
        conn.close()
        conn, peer = _accept_after(listener, RawTcp(topology.LB_SERVER4,
                                                    topology.RS4["rs1"], port),
                                   toa_option(*CLAIM4))
        with conn:
            assert peer[0] == topology.LB_SERVER4
    finally:
        listener.close()
        if toa_is_loaded():
            remove_toa()


def test_unloading_after_servers_asked_for_peers_is_clean(syncookies: None) -> None:
    """Sockets with remembered clients, just used from several threads, then
    rmmod: they keep working and report the real sender afterwards.

    (rmmod *while* other CPUs keep calling getpeername() is a known gap: the
    6.1 guest can oops when the inet_getname kretprobe is disarmed under
    concurrent calls; see kernel_patches/toa/README.md.)"""
    insmod()
    port = next(_port)
    listener = Listener(topology.RS4["rs1"], port)
    conns: list[socket.socket] = []
    seen: set[str] = set()

    def ask() -> None:
        for _ in range(50):
            for c in conns:
                seen.add(c.getpeername()[0])

    try:
        for _ in range(20):
            conn, peer = _accept_after(listener, RawTcp(topology.LB_SERVER4,
                                                        topology.RS4["rs1"], port),
                                       toa_option(*CLAIM4))
            assert peer == CLAIM4
            conns.append(conn)
        askers = [threading.Thread(target=ask) for _ in range(4)]
        for t in askers:
            t.start()
        for t in askers:
            t.join(60)
        assert seen == {CLAIM4[0]}
        assert toa_stats()["entries"] == 20
        remove_toa()
        assert {c.getpeername()[0] for c in conns} == {topology.LB_SERVER4}
    finally:
        for c in conns:
            c.close()
        listener.close()
        if toa_is_loaded():
            remove_toa()


# ---- whom to believe: trusted_sources, and only the handshake's segments ----------------

PARAM = Path("/sys/module/toa/parameters/trusted_sources")


@pytest.fixture
def toa_untrusted(syncookies: None) -> Iterator[None]:
    """toa.ko trusting other balancers than lb."""
    assert not toa_is_loaded()
    insmod("192.0.2.200,2001:db8:2::200/128")
    yield
    remove_toa()


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_an_option_from_an_untrusted_source_is_ignored(toa_untrusted: None,
                                                       family: str) -> None:
    src, dst, claim = ((topology.LB_SERVER4, topology.RS4["rs1"], CLAIM4) if family == "ipv4"
                       else (topology.LB_SERVER6, topology.RS6["rs1"], CLAIM6))
    before = toa_stats()
    port = next(_port)
    listener = Listener(dst, port)
    try:
        conn, peer = _accept_after(listener, RawTcp(src, dst, port), toa_option(*claim))
        with conn:
            assert peer[0] == src
    finally:
        listener.close()
    after = toa_stats()
    assert after["untrusted"] == before["untrusted"] + 1
    assert after["ack_toa_v4"] + after["ack_toa_v6"] == \
        before["ack_toa_v4"] + before["ack_toa_v6"]


def test_with_no_trusted_source_nothing_is_believed(syncookies: None) -> None:
    insmod("")
    try:
        assert PARAM.read_text() == "\n"
        port = next(_port)
        listener = Listener(topology.RS4["rs1"], port)
        try:
            conn, peer = _accept_after(listener, RawTcp(topology.LB_SERVER4,
                                                        topology.RS4["rs1"], port),
                                       toa_option(*CLAIM4))
            with conn:
                assert peer[0] == topology.LB_SERVER4
        finally:
            listener.close()
    finally:
        remove_toa()


def _after_handshake(segments: list[tuple[int, bytes, bytes, int]]) -> tuple[str, int]:
    """The peer rs1 reports for a handshake without the option followed by
    segments (flags, options, payload, offset into the data)."""
    port = next(_port)
    listener = Listener(topology.RS4["rs1"], port)
    raw = RawTcp(topology.LB_SERVER4, topology.RS4["rs1"], port)
    # lb's stack knows no socket for the raw flow: its RSTs to rs1's ACKs of
    # the data would reset the connection
    try:
        with nft("lb", f"ip daddr {topology.RS4['rs1']} tcp sport {raw.sport} "
                 "tcp flags rst drop", hook="output"):
            raw.handshake(b"")
            conn, _ = listener.accept()
            for seg in segments:
                raw.later(*seg)
            with conn:
                # every segment has been processed once its payload can be read
                want = sum(len(p) for _, _, p, _ in segments)
                got = b""
                conn.settimeout(10)
                while len(got) < want:
                    chunk = conn.recv(4096)
                    assert chunk, "connection closed early"
                    got += chunk
                return conn.getpeername()
    finally:
        raw.close()
        listener.close()


def test_an_option_on_a_pure_ack_after_the_handshake_is_ignored(toa: None) -> None:
    peer = _after_handshake([(0x10, toa_option(*CLAIM4), b"", 0),
                             (0x18, b"", b"hello", 0)])
    assert peer[0] == topology.LB_SERVER4


def test_an_option_on_a_second_data_segment_is_ignored(toa: None) -> None:
    peer = _after_handshake([(0x18, b"", b"hello", 0),
                             (0x18, toa_option(*CLAIM4), b"world", 5)])
    assert peer[0] == topology.LB_SERVER4


def test_an_option_on_an_out_of_order_segment_is_ignored(toa: None) -> None:
    peer = _after_handshake([(0x18, toa_option(*CLAIM4), b"world", 5),
                             (0x18, b"", b"hello", 0)])
    assert peer[0] == topology.LB_SERVER4


def test_trusted_sources_is_normalised_and_a_bad_list_changes_nothing(toa: None) -> None:
    PARAM.write_text("192.0.2.77/24, 2001:DB8:2::5/64\n10.0.0.1")
    assert PARAM.read_text() == "192.0.2.0/24,2001:db8:2::/64,10.0.0.1/32\n"
    good = PARAM.read_text()
    seed = int.from_bytes(os.urandom(4), "big")
    print(f"trusted_sources fuzz seed {seed}")
    rng = random.Random(seed)
    alphabet = "0123456789abcdef:./, x-"
    bad = ["192.0.2.1/33", "2001:db8::/129", "192.0.2.256", "host.example", "1.2.3.4/",
           "/24", "::1/-1", "1.2.3.4/24/1", ",".join(["10.0.0.1"] * 65), "1.2.3.4 junk"]
    bad += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
            for _ in range(300)]
    for value in bad:
        try:
            PARAM.write_text(value)
        except OSError:
            assert PARAM.read_text() == good, value
        else:
            # random text that happens to be a valid list: it must read back as one
            assert all("/" in p for p in PARAM.read_text().strip().split(",") if p), value
            PARAM.write_text(good)
    assert PARAM.read_text() == good
