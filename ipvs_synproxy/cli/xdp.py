"""``ipvs-synproxy xdp attach|detach|status``: the SYN proxy's XDP fast path
(:mod:`ipvs_synproxy.kernel.xdp`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from typing import Any

from ipvs_synproxy.build import xdp as xdp_build
from ipvs_synproxy.build.apt import DependencyError
from ipvs_synproxy.config.load import read_secret
from ipvs_synproxy.kernel import netlink, xdp
from ipvs_synproxy.kernel.model import ModelError

SECRET_LEN = 16


def _err(msg: str) -> int:
    print(f"ipvs-synproxy xdp: {msg}", file=sys.stderr)
    return 1


def _attach(args: argparse.Namespace) -> int:
    try:
        secret = (read_secret(args.secret_file, "--secret-file") if args.secret_file
                  else os.urandom(SECRET_LEN))
        obj = xdp_build.build()
        with netlink.IPVS(args.netns) as ipvs:
            # The module signs with this secret from now on too (the program
            # cannot read the module's): attach sets both through
            # xdp.set_secret once the program is pinned, before it is attached
            st = xdp.attach(obj, args.dev, args.netns, ipvs, secret, args.mode)
    except (ModelError, xdp.XdpError, xdp_build.XdpBuildError, DependencyError,
            netlink.NetlinkError, OSError) as exc:
        return _err(str(exc))
    print(f"{st.dev}: attached ({st.attached}), answering {st.services} SYN-proxy VIP:port(s)")
    return 0


def _detach(args: argparse.Namespace) -> int:
    rc = 0
    for dev in args.devs:
        try:
            xdp.detach(dev, args.netns)
        except (xdp.XdpError, OSError) as exc:
            rc = _err(str(exc))
            continue
        print(f"{dev}: detached; SYNs go to the IPVS module again")
    return rc


def _mirror(args: argparse.Namespace) -> int:
    try:
        with netlink.IPVS(args.netns) as ipvs:
            xdp.mirror(ipvs)
            devs = xdp.attached_devices(args.netns)
    except (xdp.XdpError, netlink.NetlinkError, OSError) as exc:
        return _err(str(exc))
    print(f"mirrored the SYN-proxy VIP:ports into {len(devs)} program(s)"
          + (f": {', '.join(devs)}" if devs else ""))
    return 0


def _status(args: argparse.Namespace) -> int:
    devs = [args.dev] if args.dev else xdp.attached_devices(args.netns)
    try:
        states = [xdp.status(d, args.netns) for d in devs]
    except (xdp.XdpError, OSError) as exc:
        return _err(str(exc))
    if args.json:
        print(json.dumps([asdict(s) for s in states], indent=2))
        return 0
    if not states:
        print("XDP fast path: attached nowhere")
    for s in states:
        mode = s.attached or "not attached"
        print(f"{s.dev}: {mode}" + (f" (program id {s.prog_id})" if s.prog_id else "")
              + ("" if s.pinned else ", not ours"))
        if s.pinned:
            print(f"  VIP:ports answered: {s.services}; secret: "
                  f"{'set' if s.ready else 'missing (SYNs go to the module)'}")
            for name, value in s.stats.items():
                print(f"  {name:<16} {value}")
    return 0


def register(sub: Any) -> None:
    x = sub.add_parser(
        "xdp", help="the SYN proxy's XDP fast path (answer SYNs before the stack)",
        description="Attach an XDP program to a client-facing interface that answers SYNs "
                    "to SYN-proxy VIPs with the IPVS module's own cookie, before an skb "
                    "exists; the cookie ACK and everything after it go to IPVS as before. "
                    "Attaching sets the cookie secret of the namespace (the module's and "
                    "the program's). docs/xdp.md explains modes and limits.")
    xs = x.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = xs.add_parser("attach", help="load, fill and attach the program to DEV")
    a.add_argument("dev", metavar="DEV")
    a.add_argument("--mode", choices=xdp.MODES, default="auto",
                   help="native (in the driver), generic (any device, after the skb is "
                        "made) or auto: native where the driver has it (default)")
    a.add_argument("--secret-file", metavar="PATH",
                   help="the cookie secret (32 hex digits, mode 600, owned by root), as the "
                        "config file's cookie_secret_file; default: a new random one")
    a.set_defaults(func=_attach)
    d = xs.add_parser("detach", help="take the program off DEV: SYNs go to the module")
    d.add_argument("devs", metavar="DEV", nargs="+")
    d.set_defaults(func=_detach)
    m = xs.add_parser("mirror", help="answer exactly the kernel's SYN-proxy VIP:ports now",
                      description="Make every program of the namespace answer exactly the "
                                  "SYN-proxy TCP VIP:ports the kernel has. ipvsadm-sp, apply "
                                  "and the console do it after each change; run it after "
                                  "something else changed services (a keepalived reload).")
    m.set_defaults(func=_mirror)
    s = xs.add_parser("status", help="where it is attached, in which mode, its counters")
    s.add_argument("dev", metavar="DEV", nargs="?")
    s.add_argument("--json", action="store_true", help="machine-readable")
    s.set_defaults(func=_status)
    for p in (a, d, m, s):
        p.add_argument("--netns", metavar="NAME", default=None,
                       help="network namespace of DEV (default: the current one)")
