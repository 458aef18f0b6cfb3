"""TCP keepalive through the SYN proxy: the probes and their answers are the
same pure ACK every keepalive interval, which the ACK-storm cut-off must not
take for a storm, however long the connection idles.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from ipvs_synproxy.kernel.model import FwdMethod
from ipvs_synproxy.kernel.netlink import IPVS
from ipvs_synproxy_testbed import netns, topology
from tests.vm.helpers import (
    NETS,
    Capture,
    delta,
    ext_stats_file,
    lb_sysctls,
    synproxy_service,
    tcp_segments,
)

NET4 = NETS["ipv4"]
PORT = 8086
STORM = 3  # synproxy_ack_storm: identical ACKs let through
KEEPCNT = 3  # unanswered probes before the client gives up
IDLE = 4 * (STORM + KEEPCNT)  # seconds, at one probe a second


@pytest.fixture
def echo(topo: None) -> Iterator[int]:
    """An echo server on rs1:PORT."""
    srv = netns.socket_in("rs1", socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((topology.RS4["rs1"], PORT))
    srv.listen(4)

    def serve_one(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(4096):
                conn.sendall(data)

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield PORT
    with contextlib.suppress(OSError):
        srv.shutdown(socket.SHUT_RDWR)
    srv.close()
    t.join(5)


def _exchange(s: socket.socket, msg: bytes) -> bytes:
    s.sendall(msg)
    out = b""
    while len(out) < len(msg):
        chunk = s.recv(4096)
        if not chunk:
            break
        out += chunk
    return out


def test_an_idle_connection_kept_alive_by_probes_still_works(
        ipvs: IPVS, echo: int) -> None:
    synproxy_service(ipvs, NET4, FwdMethod.FULLNAT, port=echo, servers=("rs1",))
    with lb_sysctls(synproxy_ack_storm=STORM):
        s = netns.socket_in("client", socket.AF_INET, socket.SOCK_STREAM)
        with s:
            s.settimeout(30)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 1)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPCNT)
            s.connect((topology.VIP4, echo))
            assert _exchange(s, b"ping") == b"ping"
            before = ext_stats_file()
            at_rs = Capture("rs1")
            try:
                time.sleep(IDLE)
            finally:
                frames = at_rs.stop()
            probes = [p for p in tcp_segments(frames, echo)
                      if p.flags == "A" and not bytes(p.payload)]
            assert len(probes) > STORM + KEEPCNT, \
                f"only {len(probes)} keepalive probes reached the server"
            assert _exchange(s, b"still there?") == b"still there?"
    assert delta(before, "synproxy_ack_storm") == 0
