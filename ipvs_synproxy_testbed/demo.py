"""``make demo``: the testbed serving real clients through IPVS, step by step.

Runs inside the guest (``ipvs-synproxy vm exec --topology [--forward PORT] --
python -m ipvs_synproxy_testbed.demo [--console-port PORT] [--hold SECONDS]``).
It shows what the patched modules do today: FULLNAT services (IPv4 and IPv6,
with the SYN-proxy flag, see :data:`SYNPROXY`) configured through this
project's own control plane, real servers with no route back to the clients,
the client's address recovered on the real servers by toa.ko, and the counters.

Then it holds: the ops console serves the balancer on the forwarded port (the
host's ``http://127.0.0.1:PORT/``; a fresh admin password is printed), clients
keep requesting through both VIPs, a small spoofed SYN flood
(:mod:`ipvs_synproxy_testbed.flood`) hits the IPv4 VIP, and every
:data:`STATUS_EVERY` seconds one line says how the clients fare, how many SYNs
the flood landed on the balancer and how many reached the real servers, and
the balancer's ``synproxy_*`` counters. It ends after ``--hold`` seconds
(default: ``$DEMO_HOLD``, else until interrupted: Ctrl-C on ``make demo``
reaches the guest as ``vm exec``'s stop file) and tears everything down.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ipaddress
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from types import FrameType

from ipvs_synproxy.adm import execute as adm
from ipvs_synproxy.build import kmod
from ipvs_synproxy.kernel.model import make_dest, make_service
from ipvs_synproxy.kernel.netlink import IPVS
from ipvs_synproxy_testbed import flood, netns, peers, topology, vm
from ipvs_synproxy_testbed.guestnic import nic_up

REQUESTS = 10
# The FULLNAT services' SYN-proxy flag: the one switch for the whole demo.
SYNPROXY = True
FLOOD_PPS = 300          # small, so TCG keeps up; trafgen's pacing lands ~200-250 pps
STATUS_EVERY = 10.0      # seconds between status lines while the demo holds
CONSOLE_USER = "admin"
RS_NAMES = ("rs1", "rs2")


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


def steps() -> tuple[int, list[peers.HttpServer]]:
    """The step-by-step part; returns the failed requests and the running servers."""
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

    _say("balancer: FULLNAT services with local-address pools"
         f"{' and the SYN-proxy flag' if SYNPROXY else ''}, via ipvs_synproxy.kernel.netlink")
    with IPVS("lb") as ipvs:
        plan: list[tuple[str, dict[str, str], tuple[str, ...]]] = [
            (topology.VIP4, topology.RS4, topology.LADDRS4),
            (topology.VIP6, topology.RS6, topology.LADDRS6)]
        for vip, rs_addrs, laddrs in plan:
            svc = make_service(source="demo", addr=vip, port=80, scheduler="rr",
                               synproxy=SYNPROXY)
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
    subprocess.run(["insmod", str(_toa_ko()), f"trusted_sources={topology.TOA_TRUSTED}"],
                   check=True)
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

    return failures, servers


class Traffic:
    """Legitimate clients: HTTP requests to both VIPs, one after another, counted."""

    def __init__(self) -> None:
        self.ok = self.failed = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="demo-clients", daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            for vip in (topology.VIP4, topology.VIP6):
                try:
                    peers.http_get(vip, timeout=5)
                    self.ok += 1
                except OSError:
                    self.failed += 1
            self.stop.wait(0.2)

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(15)


# SYN counters (nftables, one table per namespace): SYNs reaching each real
# server, and the flood's SYNs (sources from the spoofed pools) reaching lb.
_SYN = "tcp flags & (syn|ack) == syn"
COUNTERS = {
    **{rs: f"chain input {{ type filter hook input priority 0; policy accept; "
           f"tcp dport 80 {_SYN} counter; }}" for rs in RS_NAMES},
    "lb": f"chain prerouting {{ type filter hook prerouting priority raw - 1; "
          f"policy accept; ip saddr {flood.SPOOF_NET4} {_SYN} counter; "
          f"ip6 saddr {flood.SPOOF_NET6} {_SYN} counter; }}",
}
COUNTER_TABLE = "ipvs_sp_demo"


def counters_up() -> None:
    for ns, chain in COUNTERS.items():
        res = netns.run(ns, ["nft", "-f", "-"], check=False,
                        input=f"add table inet {COUNTER_TABLE}\ndelete table inet {COUNTER_TABLE}\n"
                              f"table inet {COUNTER_TABLE} {{\n{chain}\n}}\n")
        if res.returncode != 0:
            raise RuntimeError(f"nft in {ns}: {res.stderr.strip()}")


def counters_down() -> None:
    for ns in COUNTERS:
        netns.run(ns, ["nft", "delete", "table", "inet", COUNTER_TABLE], check=False)


def syn_count(ns: str) -> int:
    res = netns.run(ns, ["nft", "-j", "list", "table", "inet", COUNTER_TABLE], check=False)
    return flood.nft_counter(res.stdout) if res.returncode == 0 else -1


def synproxy_counters() -> dict[str, int]:
    with IPVS("lb") as ipvs:
        return {k: v for k, v in sorted(ipvs.ext_stats().items())
                if k.startswith("synproxy_")}


def status_line(elapsed: float, traffic: Traffic) -> str:
    rs = " ".join(f"{n} {syn_count(n)}" for n in RS_NAMES)
    sp = synproxy_counters()
    if sp:
        zero = sum(1 for v in sp.values() if not v)
        sp_text = " ".join(f"{k}={v}" for k, v in sp.items() if v) + \
            (f" ({zero} more synproxy_* at 0)" if zero else "")
    else:
        sp_text = "(no synproxy_* counters in this kernel yet)"
    return (f"[{elapsed:5.0f} s] requests ok {traffic.ok} failed {traffic.failed} | "
            f"flood SYNs at lb {syn_count('lb')} | SYNs at real servers: {rs} | {sp_text}")


class Console:
    """The ops console in the guest's root namespace, acting on lb's IPVS."""

    def __init__(self, port: int) -> None:
        from werkzeug.security import generate_password_hash

        self.port = port
        self.password = secrets.token_urlsafe(12)
        self.dir = tempfile.TemporaryDirectory(prefix="demo-console-")
        self.config = Path(self.dir.name) / "console.yaml"
        self.config.write_text(
            "secret_key_file: secret.key\naudit_log: audit.log\nusers:\n"
            f"  - name: {CONSOLE_USER}\n    role: admin\n"
            f"    password_hash: '{generate_password_hash(self.password)}'\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        nic_up()
        self.proc = subprocess.Popen(
            # plain HTTP on the guest's NIC: its only peer is QEMU's forward
            # from the host's loopback
            [sys.executable, "-m", "ipvs_synproxy.cli", "webui", "--config",
             str(self.config), "--listen", f"0.0.0.0:{self.port}", "--insecure-listen",
             "--netns", "lb"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.dir.name)
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics",
                                            timeout=10):
                    return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("the console did not come up") from None
                time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.dir.cleanup()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def hold(console_port: int | None, seconds: float | None) -> int:
    """Console, clients and a small SYN flood until ``seconds`` pass or a stop."""
    signal.signal(signal.SIGTERM, _interrupt)
    console = Console(console_port) if console_port else None
    traffic = Traffic()
    syn_flood = flood.Flood("syn", target=topology.VIP4, rate_pps=FLOOD_PPS)
    start = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            stack.callback(counters_down)
            counters_up()
            if console:
                _say("ops console: the web console on the host's forwarded port")
                stack.callback(console.stop)
                console.start()
                print(f"  URL:   http://127.0.0.1:{console.port}/\n"
                      f"  login: user {CONSOLE_USER}, password {console.password}\n"
                      f"  (metrics without login: http://127.0.0.1:{console.port}/metrics)",
                      flush=True)
            _say(f"clients: HTTP requests to {topology.VIP4} and {topology.VIP6} in a loop")
            stack.enter_context(traffic)
            _say(f"flood: spoofed SYNs from {flood.SPOOF_NET4} to {topology.VIP4}:80 at "
                 f"~{FLOOD_PPS} pps (trafgen in the client namespace)")
            stack.enter_context(syn_flood)
            until = f"for {seconds:.0f} s" if seconds else "until interrupted (Ctrl-C)"
            _say(f"holding {until}; status every {STATUS_EVERY:.0f} s")
            start = time.monotonic()
            next_status = start + STATUS_EVERY
            try:
                while not vm.stop_requested():
                    now = time.monotonic()
                    if seconds is not None and now - start >= seconds:
                        break
                    if now >= next_status:
                        print(status_line(now - start, traffic), flush=True)
                        next_status += STATUS_EVERY
                    time.sleep(0.25)
            except KeyboardInterrupt:
                print("  interrupted", flush=True)
            _say("stopping: flood, clients, console")
            res = syn_flood.stop()
            traffic.close()
            print(status_line(time.monotonic() - start, traffic), flush=True)
            print(f"  flood: {res.sent} SYNs in {res.seconds:.1f} s ({res.pps:.0f} pps), "
                  f"{res.replies} replies from lb to the spoofed sources", flush=True)
    except KeyboardInterrupt:
        print("  interrupted during tear-down", flush=True)
    return 0 if traffic.ok > 0 else 1


def _hold_default() -> float | None:
    text = os.environ.get("DEMO_HOLD", "").strip()
    return float(text) if text else None


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m ipvs_synproxy_testbed.demo",
                                 description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--console-port", type=int, default=None, metavar="PORT",
                    help="serve the ops console on the guest's PORT (vm exec --forward PORT)")
    ap.add_argument("--hold", type=float, default=_hold_default(), metavar="SECONDS",
                    help="hold with clients and a SYN flood for SECONDS (default: "
                         "$DEMO_HOLD, else until interrupted; 0: do not hold)")
    args = ap.parse_args(argv)

    failures, servers = steps()
    try:
        held = 0 if args.hold == 0 else hold(args.console_port, args.hold)
    finally:
        for s in servers:
            s.close()
    _say("done" if not failures else f"done, {failures} requests failed")
    return 1 if failures or held else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
