"""Serving the console: where it may listen, TLS, and the WSGI server (cheroot).

* Plain HTTP only on a loopback address, unless the operator says
  ``insecure`` (``--insecure-listen``: a TLS proxy on the same host, a private
  management network). Anything else needs a certificate and key.
* The server is cheroot (CherryPy's WSGI server, maintained, pure Python): it
  speaks TLS through Python's :mod:`ssl` with a context per server, refuses a
  request body over the app's limit (Content-Length and chunked alike) before
  the app sees it, and gives each connection a timeout. waitress has no TLS,
  and wrapping its sockets in :mod:`ssl` is not sound: its event loop does
  non-blocking reads and writes that do not handle the renegotiation states of
  an SSL socket, and a handshake in its accept loop would stall every client.
* A failure to bind (address in use, not on this host, no permission) is a
  :class:`ServeError` with one line of text, not a traceback.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

from webui.settings import format_host, is_loopback

if TYPE_CHECKING:
    from cheroot.wsgi import Server


class ServeError(Exception):
    """The console cannot serve as asked; the message is one line for stderr."""


def check_listen(host: str, tls: bool, insecure: bool) -> None:
    """Refuse plain HTTP on an address other hosts can reach, unless ``insecure``."""
    if tls or insecure or is_loopback(host):
        return
    raise ServeError(f"refusing plain HTTP on {host}, which is not a loopback address: "
                     "give --tls-cert and --tls-key, or --insecure-listen if TLS is "
                     "terminated in front of the console")


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """The server's TLS context (TLS 1.2 or later, Python's default ciphers)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise ServeError(f"--tls-cert/--tls-key: {exc.filename}: no such file") from None
    except OSError as exc:  # ssl.SSLError is an OSError
        reason = getattr(exc, "reason", None) or exc.strerror or str(exc)
        raise ServeError(f"--tls-cert {cert} / --tls-key {key}: cannot load the "
                         f"certificate and key ({reason})") from None
    return ctx


def url(host: str, port: int, tls: bool) -> str:
    return f"{'https' if tls else 'http'}://{format_host(host)}:{port}/"


def make_server(app: Any, host: str, port: int, *, tls: tuple[str, str] | None = None,
                threads: int = 4, max_body: int | None = None) -> Server:
    """A cheroot server for ``app``, not yet bound (:func:`bind`); ``tls`` is
    (certificate file, key file)."""
    from cheroot import wsgi
    from cheroot.ssl.builtin import BuiltinSSLAdapter

    class _Server(wsgi.Server):
        def bind(self, family: int, type: int, proto: int = 0) -> Any:
            # cheroot folds a bind error into a message of its own; keep the errno's text
            try:
                return super().bind(family, type, proto)
            except OSError as exc:
                raise ServeError(f"cannot listen on {format_host(host)}:{port}: "
                                 f"{exc.strerror or exc}") from None

    server = _Server((host, port), _BodyLimit(app), numthreads=threads,
                     server_name="ipvs-synproxy")  # cheroot sends it as Server:
    if max_body is not None:
        server.max_request_body_size = max_body
    if tls is not None:
        ctx = tls_context(*tls)  # our checks and minimum version, one-line errors
        adapter = BuiltinSSLAdapter(*tls)
        adapter.context = ctx
        server.ssl_adapter = adapter
    return server


class _BodyLimit:
    """cheroot stops a chunked body at the limit by raising from ``wsgi.input``'s read
    in the middle of the app (MaxSizeExceeded, or an OSError that werkzeug takes for a
    disconnected client): a 500 or a 400. Make it the 413 (werkzeug's
    :class:`RequestEntityTooLarge`) that it is."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        environ["wsgi.input"] = _LimitedInput(environ["wsgi.input"])
        return self.app(environ, start_response)


class _LimitedInput:
    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def _do(self, name: str, *args: Any) -> Any:
        from cheroot.errors import MaxSizeExceeded
        from werkzeug.exceptions import RequestEntityTooLarge

        try:
            return getattr(self._stream, name)(*args)
        except MaxSizeExceeded:
            raise RequestEntityTooLarge() from None
        except OSError as exc:  # a chunk's announced size over the limit
            if exc.args == ("Request Entity Too Large",):
                raise RequestEntityTooLarge() from None
            raise

    def read(self, *args: Any) -> bytes:
        return bytes(self._do("read", *args))

    def readline(self, *args: Any) -> bytes:
        return bytes(self._do("readline", *args))

    def readlines(self, *args: Any) -> list[bytes]:
        return list(self._do("readlines", *args))

    def __iter__(self) -> Any:
        return iter(self.readline, b"")


def bind(server: Server) -> tuple[str, int]:
    """Bind and listen; :class:`ServeError` if the address cannot be had. Returns
    the address bound (the port, when 0 was asked for)."""
    try:
        server.prepare()
    except ServeError:
        raise
    except OSError as exc:  # what cheroot raises itself (no address at all)
        raise ServeError(f"cannot listen: {exc}") from None
    host, port = server.bind_addr[:2]
    return str(host), int(port)
