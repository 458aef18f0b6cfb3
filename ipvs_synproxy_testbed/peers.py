"""Real TCP servers and clients inside the testbed's namespaces.

Servers are plain threaded HTTP/1.0 responders on sockets created in a real
server's namespace; each answers with its name and the peer address the kernel
reported, so tests can see scheduling and (with FULLNAT) what address the real
server sees. Clients are ordinary connected sockets created in ``client``.
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
from dataclasses import dataclass

from ipvs_synproxy_testbed.netns import socket_in


def ns_socket(ns: str, family: socket.AddressFamily,
              kind: socket.SocketKind = socket.SOCK_STREAM) -> socket.socket:
    """A socket that lives in namespace ``ns``."""
    return socket_in(ns, family, kind)


def family_of(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        self.request.settimeout(30)
        # Read the request head (ends at a blank line) so clients can send one.
        while True:
            line = self.rfile.readline(65536)
            if not line or line in (b"\r\n", b"\n"):
                break
        peer = self.client_address
        body = f"server={self.server.name} peer={peer[0]} port={peer[1]}\n".encode()
        self.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, name: str, sock: socket.socket) -> None:
        self.name = name
        super().__init__(sock.getsockname()[:2], _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.socket.listen(512)


@dataclass
class HttpServer:
    """One HTTP responder in a namespace, stopped by :meth:`close`."""

    ns: str
    addr: str
    port: int
    _server: _Server
    _thread: threading.Thread

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def start_http_server(ns: str, addr: str, port: int = 80, name: str | None = None
                      ) -> HttpServer:
    fam = family_of(addr)
    sock = ns_socket(ns, fam)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((addr, port))
    srv = _Server(name or ns, sock)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1},
                         daemon=True)
    t.start()
    return HttpServer(ns, addr, port, srv, t)


@dataclass(frozen=True)
class Reply:
    server: str
    peer: str
    peer_port: int
    local: tuple[str, int]


def http_get(addr: str, port: int = 80, ns: str = "client", timeout: float = 15.0,
             source_port: int = 0, reset: bool = False) -> Reply:
    """One HTTP/1.0 GET from namespace ``ns``; returns who answered and whom it saw.
    With ``reset`` the client ends the connection with a RST instead of a FIN,
    so that the balancer forgets it in seconds (CLOSE), not after TIME_WAIT."""
    fam = family_of(addr)
    with ns_socket(ns, fam) as s:
        s.settimeout(timeout)
        if source_port:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", source_port))
        s.connect((addr, port))
        local = s.getsockname()[:2]
        s.sendall(b"GET / HTTP/1.0\r\nHost: vip\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        if reset:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.0 200"):
        raise ConnectionError(f"bad reply from {addr}:{port}: {data[:200]!r}")
    fields = dict(kv.split("=", 1) for kv in body.decode().split())
    return Reply(fields["server"], fields["peer"], int(fields["port"]), local)
