"""``ipvs-synproxy webui``: serve the console (:mod:`webui.serve`).

Only argparse is imported here: Flask is loaded when the command runs, so the
other subcommands do not pay for it.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any


def _cmd_webui(args: argparse.Namespace) -> int:
    import dataclasses

    from webui import settings as settings_mod

    if args.hash_password:
        from werkzeug.security import generate_password_hash

        secret = sys.stdin.readline().rstrip("\n") if not sys.stdin.isatty() else \
            getpass.getpass("password or token: ")
        if len(secret) < 8:
            print("ipvs-synproxy webui: at least 8 characters, please", file=sys.stderr)
            return 2
        print(generate_password_hash(secret))
        return 0
    if not args.config:
        print("ipvs-synproxy webui: --config FILE is required (users with password "
              "hashes; there is no default login)", file=sys.stderr)
        return 2
    try:
        st = settings_mod.load(args.config)
        if args.listen:
            st = dataclasses.replace(
                st, listen=settings_mod.parse_listen(args.listen, "--listen"))
        if args.netns:
            st = dataclasses.replace(st, netns=args.netns)
    except settings_mod.SettingsError as exc:
        print(f"ipvs-synproxy webui: {exc}", file=sys.stderr)
        return 1
    if bool(args.tls_cert) != bool(args.tls_key):
        print("ipvs-synproxy webui: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    tls = (args.tls_cert, args.tls_key) if args.tls_cert else None
    host, port = st.listen
    from webui import serve

    try:
        # Before anything is bound: no plain HTTP where other hosts can reach it
        serve.check_listen(host, tls is not None, args.insecure_listen)
    except serve.ServeError as exc:
        print(f"ipvs-synproxy webui: {exc}", file=sys.stderr)
        return 2
    if tls is not None:
        st = dataclasses.replace(st, session_cookie_secure=True)
    elif not settings_mod.is_loopback(host):
        print(f"ipvs-synproxy webui: warning: plain HTTP on {host} (--insecure-listen): "
              "passwords and cookies cross the network in clear unless TLS is "
              "terminated in front", file=sys.stderr)

    from webui import create_app

    app = create_app(st)
    try:
        server = serve.make_server(app, host, port, tls=tls, threads=args.threads,
                                   max_body=app.config["MAX_CONTENT_LENGTH"])
        serve.bind(server)
    except serve.ServeError as exc:
        print(f"ipvs-synproxy webui: {exc}", file=sys.stderr)
        return 1
    print(f"ipvs-synproxy console on {serve.url(host, port, tls is not None)}"
          f"{' (netns ' + st.netns + ')' if st.netns else ''}", flush=True)
    try:
        server.serve()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def register(sub: Any) -> None:
    """Add ``webui`` to the ``ipvs-synproxy`` subparsers."""
    w = sub.add_parser("webui", help="serve the web console (dashboard, JSON API, /metrics)",
                       description="Serve the operations console (HTTPS with --tls-cert and "
                                   "--tls-key; plain HTTP only on loopback unless "
                                   "--insecure-listen). Users, "
                                   "the session key and the audit log come from the YAML "
                                   "config (see docs/operator-guide.md); it refuses to start "
                                   "without users.")
    w.add_argument("--config", metavar="FILE", help="console settings (YAML)")
    w.add_argument("--listen", metavar="ADDR:PORT", default=None,
                   help="address to serve on (default: the config's, else 127.0.0.1:8080)")
    w.add_argument("--netns", metavar="NAME", default=None,
                   help="network namespace whose IPVS to show (default: the config's)")
    w.add_argument("--tls-cert", metavar="FILE", default=None,
                   help="serve HTTPS with this certificate (PEM, chain after it) and send "
                        "HSTS; needs --tls-key")
    w.add_argument("--tls-key", metavar="FILE", default=None,
                   help="the certificate's private key (PEM)")
    w.add_argument("--insecure-listen", action="store_true",
                   help="allow plain HTTP on a non-loopback address (TLS terminated in "
                        "front of the console)")
    w.add_argument("--threads", type=int, default=4, help="worker threads")
    w.add_argument("--hash-password", action="store_true",
                   help="read a password (or API token) and print its hash for the config")
    w.set_defaults(func=_cmd_webui)
