"""``make demo``: the testbed serving real clients through IPVS, step by step.

Runs inside the guest (``ipvs-synproxy vm exec --topology -- python -m
ipvs_synproxy.testbed.demo``). Today it shows IPVS NAT on the patched modules;
it grows with the project toward its mission (a SYN-proxied FULLNAT VIP
holding while a SYN flood runs).
"""

from __future__ import annotations

import collections
import sys
import time

from ipvs_synproxy.testbed import netns, peers, topology


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _ipvsadm(*args: str) -> str:
    return netns.run("lb", ["ipvsadm", *args]).stdout


def _vs(addr: str, port: int = 80) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def main() -> int:
    _say("topology: client -- lb -- {rs1, rs2} (network namespaces in the guest)")
    print(netns.run("lb", ["ip", "-br", "addr"]).stdout, end="")

    _say("real servers: an HTTP responder on port 80 in rs1 and rs2 (v4 and v6)")
    servers = [peers.start_http_server(rs, addr, 80)
               for rs in ("rs1", "rs2")
               for addr in (topology.RS4[rs], topology.RS6[rs])]

    _say("balancer: IPVS NAT services on the VIPs, round robin over both servers")
    for vip, rs in ((topology.VIP4, topology.RS4), (topology.VIP6, topology.RS6)):
        _ipvsadm("-A", "-t", _vs(vip), "-s", "rr")
        for name in ("rs1", "rs2"):
            _ipvsadm("-a", "-t", _vs(vip), "-r", _vs(rs[name]), "-m", "-w", "1")
    print(_ipvsadm("-L", "-n"), end="")

    failures = 0
    for vip in (topology.VIP4, topology.VIP6):
        _say(f"client: 10 HTTP requests to {_vs(vip)}")
        served: collections.Counter[str] = collections.Counter()
        for _ in range(10):
            try:
                reply = peers.http_get(vip)
            except OSError as exc:
                failures += 1
                print(f"  request failed: {exc}")
                continue
            served[reply.server] += 1
        for name, count in sorted(served.items()):
            print(f"  {name}: {count} replies")

    # IPVS 6.1 folds its per-CPU counters into the totals on a 2 s estimator
    # tick: wait one so the statistics include the requests just made.
    time.sleep(2.5)
    _say("balancer: per-service statistics")
    print(_ipvsadm("-L", "-n", "--stats"), end="")
    _say("balancer: connection table")
    print(_ipvsadm("-L", "-n", "-c"), end="")

    for s in servers:
        s.close()
    _say("done" if not failures else f"done, {failures} requests failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
