"""``make demo``: the testbed serving real clients through IPVS, step by step.

Runs inside the guest (``ipvs-synproxy vm exec --topology -- python -m
ipvs_synproxy.testbed.demo``). It shows what the patched modules do today:
FULLNAT services (IPv4 and IPv6) configured through this project's own
control plane, real servers with no route back to the clients, the client's
address recovered on the real servers by toa.ko, and the counters. It grows
toward the project's mission: a SYN-proxied FULLNAT VIP holding while a SYN
flood runs.
"""

from __future__ import annotations

import collections
import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

from ipvs_synproxy import adm, kmod
from ipvs_synproxy.model import make_dest, make_service
from ipvs_synproxy.netlink import IPVS
from ipvs_synproxy.testbed import netns, peers, topology

REQUESTS = 10


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _adm(*argv: str) -> None:
    """Show a listing with the ipvsadm-compatible front end, as an operator would."""
    def read_conn() -> str:
        with netns.netns("lb"), open("/proc/thread-self/net/ip_vs_conn") as f:
            return f.read()

    print(f"$ ipvsadm-sp {' '.join(argv)}")
    adm.run(list(argv), netns="lb", stdout=sys.stdout, stderr=sys.stderr,
            read_conn=read_conn)
    sys.stdout.flush()


def _toa_ko() -> Path:
    kernel = kmod.Kernel(os.uname().release)
    ko = kmod.cached_build(kernel, f"toa-{kmod.toa_key(kernel)}") / "toa.ko"
    return ko if ko.exists() else kmod.build_toa().modules[0]


def _round(vip: str) -> tuple[collections.Counter[str], set[str], int]:
    served: collections.Counter[str] = collections.Counter()
    peers_seen: set[str] = set()
    failures = 0
    for _ in range(REQUESTS):
        try:
            reply = peers.http_get(vip)
        except OSError as exc:
            failures += 1
            print(f"  request failed: {exc}")
            continue
        served[reply.server] += 1
        peers_seen.add(reply.peer)
    return served, peers_seen, failures


def _requests(title: str) -> int:
    failures = 0
    for vip in (topology.VIP4, topology.VIP6):
        _say(f"client: {REQUESTS} HTTP requests to {vip} port 80 ({title})")
        served, seen, failed = _round(vip)
        failures += failed
        for name, count in sorted(served.items()):
            print(f"  {name}: {count} replies")
        print(f"  the real servers saw the peer as: {', '.join(sorted(seen))}")
    return failures


def main() -> int:
    _say("topology: client -- lb -- {rs1, rs2} (network namespaces in the guest)")
    print(netns.run("lb", ["ip", "-br", "addr"]).stdout, end="")

    _say("real servers: HTTP on port 80 in rs1 and rs2, and NO route back to the clients")
    for rs in ("rs1", "rs2"):
        for fam in ("-4", "-6"):
            netns.run(rs, ["ip", fam, "route", "del", "default"])
        print(f"  {rs}: " + netns.run(rs, ["ip", "route", "show"]).stdout.replace("\n", "; "))
    servers = [peers.start_http_server(rs, addr, 80)
               for rs in ("rs1", "rs2")
               for addr in (topology.RS4[rs], topology.RS6[rs])]

    _say("balancer: FULLNAT services with local-address pools, via ipvs_synproxy.netlink")
    with IPVS("lb") as ipvs:
        plan: list[tuple[str, dict[str, str], tuple[str, ...]]] = [
            (topology.VIP4, topology.RS4, topology.LADDRS4),
            (topology.VIP6, topology.RS6, topology.LADDRS6)]
        for vip, rs_addrs, laddrs in plan:
            svc = make_service(source="demo", addr=vip, port=80, scheduler="rr")
            ipvs.add_service(svc)
            for name in ("rs1", "rs2"):
                ipvs.add_dest(svc, make_dest(source="demo", addr=rs_addrs[name], port=80,
                                             fwd="fullnat"))
            for laddr in laddrs:
                ipvs.add_laddr(svc, ipaddress.ip_address(laddr))
    _adm("-L", "-n")
    _adm("--laddr-list", "-n")

    failures = _requests("FULLNAT, no TOA reader on the real servers")

    _say("real servers: load toa.ko so servers see the client's own address")
    subprocess.run(["insmod", str(_toa_ko())], check=True)
    failures += _requests("FULLNAT + TOA")

    # IPVS 6.1 folds its per-CPU counters into the totals on a 2 s estimator
    # tick: wait one so the statistics include the requests just made.
    time.sleep(2.5)
    _say("balancer: per-service statistics")
    _adm("-L", "-n", "--stats")
    _say("balancer: extended counters (non-zero), /proc/net/ip_vs_ext_stats")
    with IPVS("lb") as ipvs:
        for name, value in sorted(ipvs.ext_stats().items()):
            if value:
                print(f"  {name:28} {value}")

    for s in servers:
        s.close()
    _say("done" if not failures else f"done, {failures} requests failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
