"""The exporter's HTTP endpoint: ``/metrics`` on cheroot, 127.0.0.1 by default.

Scrapes are read only and need no login (Prometheus cannot log in), but they
name every VIP and real server, so the default address is loopback: put a
Prometheus on the balancer, or give ``--listen`` an address of the management
network and filter it. The port, 10963, is outside the Prometheus wiki's
allocated 9100-9999 range (full since 2023), so it collides with no
registered exporter.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, make_wsgi_app

DEFAULT_PORT = 10963
DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"

_INDEX = (b"<html><head><title>ipvs-synproxy exporter</title></head><body>"
          b"<h1>ipvs-synproxy exporter</h1><p><a href=\"/metrics\">/metrics</a></p>"
          b"</body></html>\n")


class ListenError(ValueError):
    """A --listen value that is not ADDRESS:PORT; the message is one line."""


def parse_listen(text: str) -> tuple[str, int]:
    """``127.0.0.1:10963``, ``[::1]:10963``, ``:10963`` (every address) → (host, port)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ListenError(f"--listen {text!r}: expected ADDRESS:PORT with PORT 1-65535, "
                          f"e.g. {DEFAULT_LISTEN} or [::1]:{DEFAULT_PORT}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ListenError(f"--listen {text!r}: put an IPv6 address in brackets, "
                          f"e.g. [::1]:{port_text}")
    if host == "":
        host = "::"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ListenError(f"--listen {text!r}: {host!r} is not an IP address") from None
    return host, int(port_text)


def app(registry: CollectorRegistry) -> Callable[..., Iterable[bytes]]:
    """``/metrics`` from ``registry``, a small index at ``/``, 404 elsewhere."""
    metrics = make_wsgi_app(registry)

    def wsgi(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD"),
                                                      ("Content-Type", "text/plain")])
            return [b"only GET\n"]
        if path == "/metrics":
            return metrics(environ, start_response)  # type: ignore[no-any-return]
        if path == "/":
            start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
            return [_INDEX]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics\n"]

    return wsgi


def serve(registry: CollectorRegistry, host: str, port: int) -> None:
    """Serve until interrupted; a bind failure is an OSError with the errno's text."""
    from cheroot import wsgi

    server = wsgi.Server((host, port), app(registry), numthreads=2,
                         server_name="ipvs-synproxy-exporter")
    server.prepare()  # binds: raises here, before any output, when it cannot
    try:
        server.serve()
    finally:
        server.stop()
