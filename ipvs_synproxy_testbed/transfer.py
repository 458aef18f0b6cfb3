"""Bulk transfers and short connections through a VIP, for guest tests and benchmarks.

:class:`BlobServer` runs in a real server's namespace and serves downloads
(``b"D"`` + 8-byte length), checks uploads (``b"U"`` + length, answered with the
SHA-256 of what arrived) and sinks uploads unchecked (``b"S"`` + length, answered
with 32 zero bytes). :func:`transfer` is its client in ``client``.

:class:`ConnServer` answers each connection with one short reply and closes it
(one thread, no per-connection work): the server side of connection-rate and
connect-time measurements; :func:`connect_once` is its client.
:class:`ServerProcess` runs any of these servers in a child process
(``python -m ipvs_synproxy_testbed.transfer conn:rs1:192.0.2.11:80 …``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from ipvs_synproxy_testbed import netns

MB = 1 << 20
BLOB = random.Random(4).randbytes(MB)
XFER = 50 * MB


def family_of(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def expected_digest(n: int) -> str:
    """SHA-256 of the first ``n`` bytes of the repeated blob."""
    h = hashlib.sha256()
    for _ in range(n // MB):
        h.update(BLOB)
    h.update(BLOB[: n % MB])
    return h.hexdigest()


def recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"peer closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def send_blob(conn: socket.socket, n: int) -> None:
    view = memoryview(BLOB)
    while n > 0:
        k = min(n, MB)
        conn.sendall(view[:k])
        n -= k


def recv_digest(conn: socket.socket, n: int) -> str:
    h, buf, got = hashlib.sha256(), bytearray(256 * 1024), 0
    while got < n:
        k = conn.recv_into(buf, min(len(buf), n - got))
        if not k:
            raise ConnectionError(f"peer closed after {got} of {n} bytes")
        h.update(memoryview(buf)[:k])
        got += k
    return h.hexdigest()


def sink(conn: socket.socket, n: int) -> None:
    buf, got = bytearray(256 * 1024), 0
    while got < n:
        k = conn.recv_into(buf, min(len(buf), n - got))
        if not k:
            raise ConnectionError(f"peer closed after {got} of {n} bytes")
        got += k


class Listener:
    """A listening socket in a namespace with an accept loop on a daemon thread;
    a subclass handles each accepted connection (on that thread: a slow one
    starts its own)."""

    def __init__(self, ns: str, addr: str, port: int, backlog: int = 64) -> None:
        self.ns, self.addr, self.port = ns, addr, port
        self.sock = netns.socket_in(ns, family_of(addr), socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family_of(addr) == socket.AF_INET6:
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        self.sock.bind((addr, port))
        self.sock.listen(backlog)
        self._thread = threading.Thread(target=self._serve, daemon=True,
                                        name=f"{type(self).__name__}-{ns}-{port}")
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.handle(conn)

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        # shutdown() wakes the thread blocked in accept(); close() alone does not
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(5)

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BlobServer(Listener):
    """Downloads, checked uploads and unchecked uploads (see the module's text)."""

    def __init__(self, ns: str, addr: str, port: int, backlog: int = 64) -> None:
        super().__init__(ns, addr, port, backlog)

    def handle(self, conn: socket.socket) -> None:
        threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    @staticmethod
    def _one(conn: socket.socket) -> None:
        with conn:
            try:
                head = recv_exact(conn, 9)
                n = struct.unpack("!Q", head[1:])[0]
                if head[:1] == b"D":
                    send_blob(conn, n)
                    conn.shutdown(socket.SHUT_WR)
                    conn.recv(1)
                elif head[:1] == b"S":
                    sink(conn, n)
                    conn.sendall(b"\0" * 32)
                else:
                    conn.sendall(bytes.fromhex(recv_digest(conn, n)))
            except OSError:
                return


def transfer(vip: str, port: int, direction: str, n: int = XFER, check: bool = True,
             ns: str = "client", timeout: float = 120.0) -> float:
    """One transfer through ``vip:port`` from namespace ``ns``; its rate in MB/s.

    With ``check`` the bytes are hashed and compared (ConnectionError if they
    differ); without, the rate is the network path's, not the hash function's.
    """
    conn = netns.socket_in(ns, family_of(vip), socket.SOCK_STREAM)
    with conn:
        conn.settimeout(timeout)
        conn.connect((vip, port))
        try:
            return _transfer_on(conn, direction, n, check)
        except TimeoutError as exc:
            lport = conn.getsockname()[1]
            stalled = TimeoutError(f"{direction} from port {lport} stalled")
            # The stalled socket's own view (window, cwnd, retransmits,
            # backoff), taken before it closes.
            ss = netns.run(ns, ["ss", "-tinoe", f"sport = :{lport}"], check=False)
            stalled.add_note(f"{ns} socket: {ss.stdout.strip()}")
            raise stalled from exc


def _transfer_on(conn: socket.socket, direction: str, n: int, check: bool) -> float:
    t0 = time.monotonic()
    if direction == "download":
        conn.sendall(b"D" + struct.pack("!Q", n))
        if not check:
            sink(conn, n)
            return n / MB / (time.monotonic() - t0)
        digest = recv_digest(conn, n)
    elif direction == "upload":
        conn.sendall((b"U" if check else b"S") + struct.pack("!Q", n))
        send_blob(conn, n)
        digest = recv_exact(conn, 32).hex()
        if not check:
            return n / MB / (time.monotonic() - t0)
    else:
        raise ValueError(f"direction must be download or upload, not {direction!r}")
    elapsed = time.monotonic() - t0
    if digest != expected_digest(n):
        raise ConnectionError(f"{direction} of {n} bytes arrived changed")
    return n / MB / elapsed


REPLY = b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n"


class ConnServer(Listener):
    """Reads the client's request (one segment), answers :data:`REPLY` and closes,
    all on the accept thread: a server whose own cost per connection is small."""

    def __init__(self, ns: str, addr: str, port: int, backlog: int = 1024) -> None:
        super().__init__(ns, addr, port, backlog)

    def handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(2.0)
                conn.recv(256)
                conn.sendall(REPLY)
            except OSError:
                return


@dataclass(frozen=True)
class ConnTiming:
    ok: bool
    connect: float   # seconds until connect() returned (the handshake with whoever answers)
    total: float     # seconds until the reply was read to its end
    error: str = ""


def connect_once(sock: socket.socket, vip: str, port: int, timeout: float) -> ConnTiming:
    """One request/reply connection on a fresh (unconnected) socket, closed afterwards."""
    t0 = time.monotonic()
    connected = t0
    with sock:
        try:
            sock.settimeout(timeout)
            sock.connect((vip, port))
            connected = time.monotonic()
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := sock.recv(256):
                data += chunk
            end = time.monotonic()
        except OSError as exc:
            end = time.monotonic()
            return ConnTiming(False, connected - t0, end - t0, f"{type(exc).__name__}: {exc}")
    if data != REPLY:
        return ConnTiming(False, connected - t0, end - t0, f"bad reply {data[:40]!r}")
    return ConnTiming(True, connected - t0, end - t0)


# ---- servers in a process of their own ------------------------------------------------------
#
# A client and its server in one Python process share the GIL: a server thread woken
# while the client thread runs waits up to the interpreter's switch interval (5 ms),
# which turns the order of wake-ups into latency. Measurements therefore run the
# servers in a separate process.

SERVER_KINDS: dict[str, type[Listener]] = {"conn": ConnServer, "blob": BlobServer}


def serve(specs: list[str]) -> None:
    """Run servers given as ``KIND:NS:ADDR:PORT`` (IPv6 addresses in brackets) until
    stdin closes; print ``ready`` once all listen."""
    servers = []
    for spec in specs:
        kind, ns, rest = spec.split(":", 2)
        addr, _, port = rest.rpartition(":")
        servers.append(SERVER_KINDS[kind](ns, addr.strip("[]"), int(port)))
    print("ready", flush=True)
    try:
        sys.stdin.read()
    finally:
        for s in servers:
            s.close()


class ServerProcess:
    """:func:`serve` in a child process (``with ServerProcess([...]):``); or
    another module's servers that, like it, print "ready" once they listen
    and stop when their stdin closes."""

    def __init__(self, specs: list[str],
                 module: str = "ipvs_synproxy_testbed.transfer") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *specs],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.close()
            raise RuntimeError(f"{module} servers {specs} did not start: {line!r}")

    def close(self) -> None:
        if self.proc.stdin:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    serve(sys.argv[1:])
