"""``ipvs-synproxy exporter``: the Prometheus exporter (:mod:`ipvs_synproxy.exporter`)."""

from __future__ import annotations

import argparse
import sys
from functools import partial
from typing import Any

from ipvs_synproxy.exporter import collector, serve
from ipvs_synproxy.kernel import netlink, xdp
from ipvs_synproxy.kernel import sysctl as sysctl_mod


def _err(msg: str) -> None:
    print(f"ipvs-synproxy exporter: {msg}", file=sys.stderr)


def _cmd_exporter(args: argparse.Namespace) -> int:
    from prometheus_client import generate_latest

    try:
        host, port = serve.parse_listen(args.listen)
    except serve.ListenError as exc:
        _err(str(exc))
        return 2
    read = partial(collector.read, partial(netlink.IPVS, args.netns),
                   sysctl_mod.Sysctls(args.netns), xdp=partial(xdp.all_stats, args.netns))
    if args.once:
        try:
            reading = read()
        except collector.READ_ERRORS as exc:
            _err(f"cannot read IPVS: {exc}")
            return 1
        sys.stdout.write(generate_latest(collector.registry(lambda: reading)).decode())
        return 0
    registry = collector.registry(read)
    print(f"ipvs-synproxy exporter: serving http://{'[' + host + ']' if ':' in host else host}"
          f":{port}/metrics", file=sys.stderr, flush=True)
    try:
        serve.serve(registry, host, port)
    except OSError as exc:
        _err(f"cannot listen on {args.listen}: {exc.strerror or exc}")
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def register(sub: Any) -> None:
    e = sub.add_parser(
        "exporter", help="serve Prometheus metrics (per VIP, real server and laddr)",
        description="Serve the ipvs_synproxy_* series for Prometheus at /metrics: per "
                    "service (labels vip, port, protocol) the SYN proxy's SYNs, cookies, "
                    "cookie ACKs, proxied connections and drops by reason; per real server "
                    "its weight, connections, packets and bytes; per FULLNAT local address "
                    "its ports used and free; the cookie key's epoch (never the secret), "
                    "the sync daemons and, per interface with the XDP fast path, its mode "
                    "and counters. docs/metrics.md lists every series. It needs "
                    "CAP_NET_ADMIN (IPVS reads are privileged); the XDP series need the "
                    "programs' pins under /sys/fs/bpf readable (root). node_exporter's "
                    "node_ipvs_* series are not repeated here.")
    e.add_argument("--listen", default=serve.DEFAULT_LISTEN, metavar="ADDRESS:PORT",
                   help=f"where to serve (default {serve.DEFAULT_LISTEN}, loopback only; "
                        "[::1]:PORT for IPv6, :PORT for every address)")
    e.add_argument("--netns", metavar="NAME", default=None,
                   help="network namespace to read (default: the current one)")
    e.add_argument("--once", action="store_true",
                   help="print one scrape to stdout and exit (1 if IPVS cannot be read)")
    e.set_defaults(func=_cmd_exporter)
