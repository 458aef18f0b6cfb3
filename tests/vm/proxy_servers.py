"""Real servers that require the PROXY protocol, for tests/vm/test_proxy_protocol.py.

* :func:`parse` reads a PROXY protocol header (v1, the text form, or v2, the
  binary one) off the start of a byte stream: the test's own parser, written
  from the specification (haproxy.org/download/2.6/doc/proxy-protocol.txt),
  strict about everything a FULLNAT balancer must get right.
* :class:`Nginx` and :class:`Haproxy` run Debian's nginx and HAProxy in a
  real server's namespace with a configuration of their own in a temporary
  directory: both listen on port 80 of the server's addresses and *require*
  the header; each answers every request with the client's address and port
  as the header told it, and logs them.
* :class:`Recorder` keeps the first bytes of every connection it accepts.
* :class:`ProxyBlobServer` takes the header off and then is the testbed's
  ``BlobServer`` (downloads, checked uploads); it runs in a child process
  (``python -m tests.vm.proxy_servers NS ADDR PORT LOG``), writing every header
  it took to LOG.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ipvs_synproxy_testbed import netns
from ipvs_synproxy_testbed.transfer import BlobServer, Listener, ServerProcess

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107          # the longest v1 line, CRLF included (the specification's limit)


class Incomplete(Exception):
    """More bytes are needed before the header can be judged."""


@dataclass(frozen=True)
class ProxyHeader:
    version: int
    family: str          # "TCP4" or "TCP6" (also for v2: its address family/protocol)
    src: str
    dst: str
    sport: int
    dport: int
    length: int          # bytes the header takes at the start of the stream


def _v1_port(text: str) -> int:
    if not text.isdigit() or (len(text) > 1 and text[0] == "0") or int(text) > 65535:
        raise ValueError(f"bad port {text!r}")
    return int(text)


def _v1_addr(text: str, version: int) -> str:
    addr = ipaddress.ip_address(text)
    if addr.version != version:
        raise ValueError(f"{text!r} is not an IPv{version} address")
    return str(addr)


def parse(data: bytes) -> ProxyHeader:
    """The PROXY header at the start of ``data``; :class:`Incomplete` if ``data``
    ends inside it, ValueError if it is not a header we accept (LOCAL, UNKNOWN,
    UDP, UNIX and v2 TLVs included: the balancer sends none of them)."""
    if data[:len(V2_SIGNATURE)] == V2_SIGNATURE[:len(data)] and len(data) < 16:
        raise Incomplete
    if data.startswith(V2_SIGNATURE):
        ver_cmd, fam, length = struct.unpack_from("!BBH", data, 12)
        if ver_cmd != 0x21:
            raise ValueError(f"v2 version/command {ver_cmd:#04x}, not 0x21 (v2, PROXY)")
        if fam not in (0x11, 0x21):
            raise ValueError(f"v2 family/protocol {fam:#04x}, not TCP over IPv4/IPv6")
        alen = 12 if fam == 0x11 else 36
        if length != alen:
            raise ValueError(f"v2 address block of {length} bytes, not {alen} (no TLVs)")
        if len(data) < 16 + length:
            raise Incomplete
        n = 4 if fam == 0x11 else 16
        src = ipaddress.ip_address(data[16:16 + n])
        dst = ipaddress.ip_address(data[16 + n:16 + 2 * n])
        sport, dport = struct.unpack_from("!HH", data, 16 + 2 * n)
        return ProxyHeader(2, "TCP4" if fam == 0x11 else "TCP6", str(src), str(dst),
                           sport, dport, 16 + length)
    if data[:6] != b"PROXY "[:len(data)]:
        raise ValueError(f"no PROXY header: {data[:32]!r}")
    end = data.find(b"\r\n")
    if end < 0:
        if len(data) >= V1_MAX:
            raise ValueError(f"v1 line longer than {V1_MAX} bytes")
        raise Incomplete
    if end + 2 > V1_MAX:
        raise ValueError(f"v1 line longer than {V1_MAX} bytes")
    line = data[:end].decode("ascii")
    words = line.split(" ")
    if len(words) != 6 or words[0] != "PROXY" or words[1] not in ("TCP4", "TCP6"):
        raise ValueError(f"bad v1 line {line!r}")
    version = 4 if words[1] == "TCP4" else 6
    return ProxyHeader(1, words[1], _v1_addr(words[2], version), _v1_addr(words[3], version),
                       _v1_port(words[4]), _v1_port(words[5]), end + 2)


def read_header(conn: socket.socket) -> tuple[ProxyHeader, bytes]:
    """Read a connection's header (and not a byte more than it takes)."""
    data = b""
    while True:
        try:
            head = parse(data)
            return head, data[:head.length]
        except Incomplete:
            pass
        # v2's length is known after 16 bytes; v1 ends at its CRLF: read
        # byte by byte there, so that nothing behind the header is consumed
        if data.startswith(V2_SIGNATURE) and len(data) >= 16:
            want = 16 + struct.unpack_from("!H", data, 14)[0] - len(data)
        elif len(data) < 16 and data == V2_SIGNATURE[:len(data)]:
            want = 16 - len(data)
        else:
            want = 1
        chunk = conn.recv(want)
        if not chunk:
            raise ConnectionError(f"closed inside the PROXY header after {data!r}")
        data += chunk


# ---- nginx and HAProxy --------------------------------------------------------------------


def _in_ns(ns: str, argv: list[str], **kw: object) -> subprocess.Popen[bytes]:
    """A process in namespace ``ns`` (forked from a thread inside it)."""
    with netns.netns(ns):
        return subprocess.Popen(argv, **kw)  # type: ignore[call-overload, no-any-return]


def _listening(ns: str, port: int, count: int) -> bool:
    out = netns.run(ns, ["ss", "-Htln", f"sport = :{port}"], check=False).stdout
    return len([ln for ln in out.splitlines() if ln.strip()]) >= count


class _Daemon:
    """A server process in a namespace, listening on ``port`` of ``addrs``."""

    name = ""

    def __init__(self, ns: str, addrs: tuple[str, ...], port: int, tmp: Path) -> None:
        self.ns, self.addrs, self.port = ns, addrs, port
        self.dir = tmp / f"{self.name}-{ns}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.out = self.dir / "stdout.log"
        self.proc = self._start()
        deadline = time.monotonic() + 60
        while not _listening(ns, port, len(addrs)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"{self.name} in {ns} did not start: "
                                   f"{self.out.read_text(errors='replace')[-2000:]}"
                                   f"{self.errors()[-2000:]}")
            time.sleep(0.2)

    def _start(self) -> subprocess.Popen[bytes]:
        raise NotImplementedError

    def errors(self) -> str:
        return ""

    def log_lines(self) -> list[str]:
        raise NotImplementedError

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _bracket(addr: str) -> str:
    return f"[{addr}]" if ":" in addr else addr


class Nginx(_Daemon):
    """nginx, one process (no master), PROXY protocol required on every listener.

    Its answer and its access log line: ``$proxy_protocol_addr
    $proxy_protocol_port $proxy_protocol_server_addr $proxy_protocol_server_port
    $remote_addr`` (the last, the balancer's laddr: the TCP peer)."""

    name = "nginx"
    FIELDS = ("$proxy_protocol_addr $proxy_protocol_port $proxy_protocol_server_addr "
              "$proxy_protocol_server_port $remote_addr")

    def _start(self) -> subprocess.Popen[bytes]:
        d = self.dir
        listens = "\n".join(f"        listen {_bracket(a)}:{self.port} proxy_protocol;"
                            for a in self.addrs)
        temps = "\n".join(f"    {k}_temp_path {d}/{k};"
                          for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        conf = f"""\
daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 256; }}
http {{
{temps}
    log_format pp '{self.FIELDS}';
    access_log {d}/access.log pp;
    server {{
{listens}
        location / {{
            default_type text/plain;
            return 200 "{self.FIELDS}\\n";
        }}
    }}
}}
"""
        (d / "nginx.conf").write_text(conf)
        with self.out.open("wb") as out:
            return _in_ns(self.ns, ["/usr/sbin/nginx", "-p", str(d), "-e",
                                    str(d / "error.log"), "-c", str(d / "nginx.conf")],
                          stdout=out, stderr=subprocess.STDOUT)

    def errors(self) -> str:
        path = self.dir / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def log_lines(self) -> list[str]:
        path = self.dir / "access.log"
        return path.read_text().splitlines() if path.exists() else []


class Haproxy(_Daemon):
    """HAProxy in the foreground, ``accept-proxy`` on every bind, logging to
    stdout (a file here); it answers and logs ``%ci %cp %fi %fp``: the
    client's and the frontend's address and port, as the header told them."""

    name = "haproxy"
    ANSWER = "%[src] %[src_port] %[dst] %[dst_port]"

    def _start(self) -> subprocess.Popen[bytes]:
        d = self.dir
        binds = "\n".join(
            f"    bind {_bracket(a)}:{self.port} accept-proxy" + (" v6only" if ":" in a else "")
            for a in self.addrs)
        conf = f"""\
global
    pidfile {d}/haproxy.pid
    log stdout format raw local0
    maxconn 256

defaults
    mode http
    log global
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend fe
{binds}
    log-format "%ci %cp %fi %fp"
    http-request return status 200 content-type text/plain lf-string "{self.ANSWER}\\n"
"""
        (d / "haproxy.cfg").write_text(conf)
        with self.out.open("wb") as out:
            return _in_ns(self.ns, ["/usr/sbin/haproxy", "-db", "-f", str(d / "haproxy.cfg")],
                          stdout=out, stderr=subprocess.STDOUT)

    def errors(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    def log_lines(self) -> list[str]:
        # the log lines, without HAProxy's own notices (which start with "[")
        return [ln for ln in self.errors().splitlines() if ln and not ln.startswith("[")]


# ---- raw servers -------------------------------------------------------------------------


class Recorder(Listener):
    """Accepts on ``addr``:``port`` in ``ns`` and keeps every connection's bytes
    (``streams``, in the order of accept, growing as they arrive)."""

    def __init__(self, ns: str, addr: str, port: int) -> None:
        self.streams: list[bytearray] = []
        self.peers: list[tuple[str, int]] = []
        self.closed: list[bool] = []
        self._lock = threading.Lock()
        super().__init__(ns, addr, port)

    def handle(self, conn: socket.socket) -> None:
        try:
            peer = conn.getpeername()
        except OSError:   # reset before we looked
            conn.close()
            return
        with self._lock:
            i = len(self.streams)
            self.streams.append(bytearray())
            self.peers.append((peer[0], peer[1]))
            self.closed.append(False)
        threading.Thread(target=self._read, args=(conn, i), daemon=True).start()

    def _read(self, conn: socket.socket, i: int) -> None:
        with conn:
            conn.settimeout(120)
            while True:
                try:
                    chunk = conn.recv(65536)
                except OSError:
                    break
                if not chunk:
                    break
                self.streams[i] += chunk
        self.closed[i] = True


class ProxyBlobServer(BlobServer):
    """Takes the PROXY header off each connection (writing it, in hex, to
    ``log``), then serves the connection as a ``BlobServer``; a connection
    without a valid header is closed."""

    def __init__(self, ns: str, addr: str, port: int, log: str) -> None:
        self.log = log
        super().__init__(ns, addr, port)

    def handle(self, conn: socket.socket) -> None:
        threading.Thread(target=self._proxied, args=(conn,), daemon=True).start()

    def _proxied(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(300)
            _head, raw = read_header(conn)
        except (OSError, ValueError) as exc:
            with open(self.log, "a") as f:
                f.write(f"error {exc!r}\n")
            conn.close()
            return
        with open(self.log, "a") as f:
            f.write(raw.hex() + "\n")
        self._one(conn)


class ProxyBlobProcess(ServerProcess):
    """:class:`ProxyBlobServer`\\ s in a child process (so that they do not share
    the client's interpreter), one per ``(ns, addr)``, all on ``port``."""

    def __init__(self, servers: list[tuple[str, str]], port: int, log: Path) -> None:
        self.log = log
        log.write_text("")
        super().__init__([str(log), *(f"{ns},{addr},{port}" for ns, addr in servers)],
                         module="tests.vm.proxy_servers")

    def headers(self) -> list[str]:
        return self.log.read_text().splitlines()


def _serve(log: str, specs: list[str]) -> None:
    servers = []
    for spec in specs:
        ns, addr, port = spec.split(",")
        servers.append(ProxyBlobServer(ns, addr, int(port), log))
    print("ready", flush=True)
    try:
        sys.stdin.read()
    finally:
        for s in servers:
            s.close()


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2:])
