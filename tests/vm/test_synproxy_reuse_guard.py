"""Session reuse replaces a closing SYN proxy connection only for a genuinely
new handshake: a late duplicate of the connection's own cookie ACK, or a
retransmitted FIN that still acknowledges the cookie, leaves it alone.

The client connects without sending data and half-closes, so its handshake
ACK and its FIN both carry the cookie (ack_seq - 1) and the connection sits
in CLOSE_WAIT, where session reuse is on by default; the real server answers
only afterwards, through the connection the duplicates must not tear down.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest

from ipvs_synproxy.kernel.model import FwdMethod
from ipvs_synproxy.kernel.netlink import IPVS
from ipvs_synproxy_testbed import netns, topology
from tests.vm.helpers import (
    ACK,
    FIN,
    NETS,
    Capture,
    conn_states,
    delta,
    eth_frame,
    ext_stats_file,
    send_frames,
    synproxy_service,
    tcp_seg,
    tcp_segments,
    wait_for,
)

NET4 = NETS["ipv4"]
PORT = 8085
REPLY = b"still here\n"
DUPLICATES = {"handshake-ack": ACK, "fin-ack": FIN | ACK}


class AnswerLater:
    """A server on rs1:PORT that reads a connection to its end and answers
    only when told to."""

    def __init__(self) -> None:
        self.go = threading.Event()
        self.srv = netns.socket_in("rs1", socket.AF_INET, socket.SOCK_STREAM)
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind((topology.RS4["rs1"], PORT))
        self.srv.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.srv.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(30)
            with contextlib.suppress(OSError):
                while conn.recv(4096):
                    pass
                if self.go.wait(30):
                    conn.sendall(REPLY)

    def close(self) -> None:
        self.go.set()
        with contextlib.suppress(OSError):
            self.srv.shutdown(socket.SHUT_RDWR)
        self.srv.close()
        self.thread.join(5)


@pytest.fixture
def answer_later(topo: None) -> Iterator[AnswerLater]:
    srv = AnswerLater()
    yield srv
    srv.close()


def _recv_all(s: socket.socket) -> bytes:
    out = b""
    with contextlib.suppress(TimeoutError, ConnectionError):
        while chunk := s.recv(4096):
            out += chunk
    return out


@pytest.mark.parametrize("duplicate", DUPLICATES)
def test_a_duplicate_of_the_cookie_ack_in_close_wait_keeps_the_connection(
        ipvs: IPVS, answer_later: AnswerLater, duplicate: str) -> None:
    synproxy_service(ipvs, NET4, FwdMethod.FULLNAT, port=PORT, servers=("rs1",))
    at_lb = Capture("lb")
    s = netns.socket_in("client", socket.AF_INET, socket.SOCK_STREAM)
    with s:
        s.settimeout(10)
        try:
            s.connect((topology.VIP4, PORT))
            sport = s.getsockname()[1]
            s.shutdown(socket.SHUT_WR)
            assert wait_for(lambda: conn_states(sport, vport=PORT) == ["CLOSE_WAIT"], 10), \
                conn_states(sport, vport=PORT)
        finally:
            frames = at_lb.stop()
        handshake = next(p for p in tcp_segments(frames, PORT)
                         if p.sport == sport and p.flags == "A")
        before = ext_stats_file()
        send_frames([eth_frame(4, tcp_seg(sport, PORT, handshake.seq, handshake.ack,
                                     DUPLICATES[duplicate], window=handshake.window))])
        assert not wait_for(lambda: conn_states(sport, vport=PORT) != ["CLOSE_WAIT"], 2), \
            conn_states(sport, vport=PORT)
        answer_later.go.set()
        assert _recv_all(s) == REPLY, "the live connection was torn down"
    assert delta(before, "synproxy_reuse_close_wait") == 0
    assert delta(before, "synproxy_ack_valid") == 0
