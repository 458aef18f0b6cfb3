"""``ipvs-synproxy webui``: serve the console with waitress.

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
    host, port = st.listen
    if not settings_mod.is_loopback(host):
        print(f"ipvs-synproxy webui: warning: listening on {host}, not loopback: anyone "
              "who can reach it sees the login page", file=sys.stderr)

    import waitress  # type: ignore[import-untyped]

    from webui import create_app

    app = create_app(st)
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    print(f"ipvs-synproxy console on http://{where}/"
          f"{' (netns ' + st.netns + ')' if st.netns else ''}", flush=True)
    # waitress refuses a body over the app's limit before buffering it (to disk, otherwise)
    waitress.serve(app, host=host, port=port, threads=args.threads, ident="ipvs-synproxy",
                   max_request_body_size=app.config["MAX_CONTENT_LENGTH"], _quiet=True)
    return 0


def register(sub: Any) -> None:
    """Add ``webui`` to the ``ipvs-synproxy`` subparsers."""
    w = sub.add_parser("webui", help="serve the web console (dashboard, JSON API, /metrics)",
                       description="Serve the operations console with waitress. Users, "
                                   "the session key and the audit log come from the YAML "
                                   "config (see docs/operator-guide.md); it refuses to start "
                                   "without users.")
    w.add_argument("--config", metavar="FILE", help="console settings (YAML)")
    w.add_argument("--listen", metavar="ADDR:PORT", default=None,
                   help="address to serve on (default: the config's, else 127.0.0.1:8080)")
    w.add_argument("--netns", metavar="NAME", default=None,
                   help="network namespace whose IPVS to show (default: the config's)")
    w.add_argument("--threads", type=int, default=4, help="waitress worker threads")
    w.add_argument("--hash-password", action="store_true",
                   help="read a password (or API token) and print its hash for the config")
    w.set_defaults(func=_cmd_webui)
