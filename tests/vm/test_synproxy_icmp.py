"""ICMP errors from the client's side about a SYN-proxied connection reach the
real server's socket: path MTU discovery works through the proxy.

The client's side sees the real server's sequence numbers moved by the
proxy's delta; an ICMP error quotes them that way, and the real server's TCP
drops an error whose quoted sequence number it never sent. The balancer moves
it back (``synproxy_icmp_seq``). An error with a bad ICMP checksum is dropped
before anything is rewritten.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time

import pytest

from ipvs_synproxy.kernel.netlink import IPVS
from ipvs_synproxy_testbed import netns
from tests.vm.helpers import (
    CLIENT_MAC,
    FAMILIES,
    LB_MAC,
    METHODS,
    NETS,
    Capture,
    ext_stats_file,
    send_frames,
    synproxy_service,
    wait_for,
)

TCP_INFO_PMTU = 8 + 13 * 4      # struct tcp_info: 8 bytes of u8 fields, then u32s


def _moved(before: dict[str, int], name: str) -> int:
    """How much a counter moved (0 for one this kernel does not have)."""
    return ext_stats_file().get(name, 0) - before.get(name, 0)


def _pmtu(sock: socket.socket) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return int(struct.unpack_from("I", info, TCP_INFO_PMTU)[0])


class OneServer:
    """A listener on a real server that keeps the one connection it accepts."""

    def __init__(self, ns: str, addr: str, port: int) -> None:
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        self.lsock = netns.socket_in(ns, fam, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((addr, port))
        self.lsock.listen(1)
        self.conn: socket.socket | None = None
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self.conn, _ = self.lsock.accept()

    def close(self) -> None:
        with contextlib.suppress(OSError):  # wakes the accept() (see test_apply)
            self.lsock.shutdown(socket.SHUT_RDWR)
        self.lsock.close()
        self._thread.join(2)
        if self.conn is not None:
            self.conn.close()


def _next_seq(frames: list[bytes], sport: int, dport: int) -> int:
    """The sequence number after the last segment from sport to dport."""
    from scapy.layers.inet import TCP
    from scapy.layers.l2 import Ether

    nxt = None
    for f in frames:
        pkt = Ether(f)
        if TCP in pkt and (pkt[TCP].sport, pkt[TCP].dport) == (sport, dport):
            nxt = (pkt[TCP].seq + len(pkt[TCP].payload) + pkt[TCP].flags.F) & 0xFFFFFFFF
    assert nxt is not None, f"no segment {sport} -> {dport} captured"
    return nxt


def _too_big(net, port: int, cport: int, seq: int, bad_csum: bool = False) -> bytes:
    """ICMP fragmentation needed (IPv4, MTU 1200) or packet too big (IPv6,
    1280) from the client about a segment VIP:port -> client:cport."""
    from scapy.layers.inet import ICMP, IP, TCP
    from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6
    from scapy.layers.l2 import Ether

    quoted_tcp = TCP(sport=port, dport=cport, seq=seq, ack=1, flags="PA") / (b"x" * 64)
    if net.version == 4:
        icmp = ICMP(type=3, code=4, nexthopmtu=1200)
        pkt = (IP(src=net.client, dst=net.vip) / icmp
               / IP(src=net.vip, dst=net.client, flags="DF") / quoted_tcp)
        raw = bytearray(bytes(pkt))
        csum_at = 20 + 2
    else:
        pkt = (IPv6(src=net.client, dst=net.vip) / ICMPv6PacketTooBig(mtu=1280)
               / IPv6(src=net.vip, dst=net.client) / quoted_tcp)
        raw = bytearray(bytes(pkt))
        csum_at = 40 + 2
    if bad_csum:
        raw[csum_at] ^= 0x5A
    # Ether() without a payload would say type 0x9000 (loopback)
    ethertype = 0x0800 if net.version == 4 else 0x86DD
    return bytes(Ether(src=CLIENT_MAC, dst=LB_MAC, type=ethertype)) + bytes(raw)


def _is_too_big(frame: bytes, version: int) -> bool:
    if version == 4:    # ICMP (1) destination unreachable (3)
        return len(frame) > 34 and frame[23] == 1 and frame[34] == 3
    return len(frame) > 54 and frame[20] == 58 and frame[54] == 2   # packet too big


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_path_mtu_from_the_client_side_reaches_the_real_servers_socket(
        ipvs: IPVS, method: str, family: str) -> None:
    net = NETS[family]
    port = 9200 + 2 * (method == "fullnat") + (family == "ipv6")
    synproxy_service(ipvs, net, METHODS[method], port=port, servers=("rs1",))
    server = OneServer("rs1", net.rs["rs1"], port)
    client = netns.socket_in("client", socket.AF_INET6 if net.version == 6 else
                             socket.AF_INET, socket.SOCK_STREAM)
    cap = Capture("client")
    try:
        client.settimeout(20)
        client.connect((net.vip, port))
        cport = client.getsockname()[1]
        assert wait_for(lambda: server.conn is not None, 10)
        assert server.conn is not None
        server.conn.sendall(b"y" * 20000)
        got = 0
        while got < 20000:
            got += len(client.recv(65536))
        time.sleep(0.5)             # the client's last ACK reaches the server
        mtu0 = _pmtu(server.conn)
        want = 1200 if net.version == 4 else 1280
        assert mtu0 > want, mtu0
        seq = _next_seq(cap.frames, port, cport)
        before = ext_stats_file()
        rs = Capture("rs1")
        try:
            send_frames([_too_big(net, port, cport, seq, bad_csum=True)])
            time.sleep(1.5)
            assert _pmtu(server.conn) == mtu0, "an error with a bad checksum was acted on"
            assert _moved(before, "synproxy_icmp_seq") == 0
            send_frames([_too_big(net, port, cport, seq)])
            ok = wait_for(lambda: _pmtu(server.conn) == want, 10)
            assert ok, \
                (f"the real server's path MTU stayed {_pmtu(server.conn)}: it did not "
                 f"take the error for its own segment")
        finally:
            rs_frames = rs.stop()
        assert _moved(before, "synproxy_icmp_seq") == 1
        at_rs = [f for f in rs_frames if _is_too_big(f, net.version)]
        assert len(at_rs) == 1, f"{len(at_rs)} ICMP errors reached the real server"
        # and the connection still carries data both ways
        client.sendall(b"ping")
        assert server.conn.recv(4) == b"ping"
        server.conn.sendall(b"pong")
        assert client.recv(4) == b"pong"
    finally:
        cap.stop()
        client.close()
        server.close()
