"""The ``keepalived`` commands of ``ipvs-synproxy``: ``render`` and ``build``.

Exit codes: 0 success, 1 the build failed, 2 bad input (an invalid config,
or one that keepalived.conf cannot express).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from ipvs_synproxy.build import keepalived as keepalived_build
from ipvs_synproxy.config import keepalived
from ipvs_synproxy.config import load as config_load
from ipvs_synproxy.config import reader as config_reader

EXIT_FAILED = 1
EXIT_USAGE = 2


def _err(msg: str) -> None:
    print(f"ipvs-synproxy: {msg}", file=sys.stderr)


def _cmd_render(args: argparse.Namespace) -> int:
    try:
        cfg = config_load.load(args.file)
        text = keepalived.render(cfg)
    except config_reader.ConfigError as exc:
        _err(f"invalid config: {exc}\nnothing was rendered")
        return EXIT_USAGE
    if not cfg.state.services and not args.allow_empty:
        # keepalived would take every virtual server down at its next reload
        _err(f"{args.file} declares no service: a keepalived.conf without virtual "
             "servers removes every one on reload; nothing was rendered "
             "(--allow-empty renders it anyway)")
        return EXIT_USAGE
    if args.output in (None, "-"):
        sys.stdout.write(text)
        return 0
    # Replace the file atomically: keepalived may reload at any moment.
    out_dir = os.path.dirname(os.path.abspath(args.output))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".keepalived-", dir=out_dir)
    except OSError as exc:
        _err(f"writing {args.output}: {exc.strerror or exc} ({out_dir}); "
             "nothing was written")
        return EXIT_FAILED
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, args.output)
    except OSError as exc:
        os.unlink(tmp)
        _err(f"writing {args.output}: {exc.strerror or exc}")
        return EXIT_FAILED
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    try:
        res = keepalived_build.build(force=args.force)
    except keepalived_build.KeepalivedBuildError as exc:
        _err(f"keepalived build: {exc}")
        return EXIT_FAILED
    state = "built" if res.rebuilt else "up to date"
    print(f"{state}: keepalived {keepalived_build.VERSION} with "
          f"{len(keepalived_build.read_series())} patches (key {res.key})\n{res.binary}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    k = sub.add_parser("keepalived", help="render keepalived.conf; build the patched "
                                          "keepalived")
    ks = k.add_subparsers(dest="action", required=True, metavar="ACTION")
    r = ks.add_parser(
        "render", help="render keepalived.conf from a config file",
        description="Render keepalived.conf (global_defs, VRRP instances, local address "
                    "groups, virtual servers with health checks) from the config file "
                    "that diff/apply read. Deterministic; an invalid config is rejected "
                    "with exit code 2 before anything is written.")
    r.add_argument("file", help="the YAML config file")
    r.add_argument("-o", "--output", metavar="PATH",
                   help="write here (atomically) instead of to standard output")
    r.add_argument("--allow-empty", action="store_true",
                   help="render even a file without services (keepalived then removes "
                        "every virtual server)")
    r.set_defaults(func=_cmd_render)
    b = ks.add_parser(
        "build", help="download, verify, patch and build keepalived 2.2.7",
        description="Download Debian's keepalived 2.2.7 source, verify its SHA-256, "
                    "apply keepalived/patches and build it (cached by tarball and "
                    "patches). Prints the path of the binary.")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    b.add_argument("--install-deps", action="store_true",
                   help="install missing Debian build packages with apt-get instead of "
                        "naming them and stopping")
    b.set_defaults(func=_cmd_build)
