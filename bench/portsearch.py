"""The port search piece: new connections per second through a FULLNAT service
(no SYN proxy) whose local ports are 90% taken, alternating with one whose
ports are all free (bench/README.md, "Port search").

Both services send to rs1 from the testbed's four laddrs, with the local port
range narrowed to WINDOW ports. Their real server ports differ, so each has a
port space of its own (a local port is taken per real server address and
port). The held connections are spoofed SYNs from the client (trafgen, as the
floods), each an IPVS connection in SYN_RECV that holds a port for 60 s.

A laddr hands out ports in order from a cursor: SYNs sent into an empty range
take one block of ports and leave the cursor facing the free rest, so new
connections would never meet a taken port. The fill therefore goes once around
every laddr's range: first the held 90% (rs1 drops those SYNs: nothing
answers, the connections stay in SYN_RECV and rs1 keeps no state for them),
then the rest (rs1 resets those: their connections go to CLOSE and free their
ports 10 s later). Every cursor then faces the held block, and the search of
a new connection meets taken ports before it finds a free one.
"""

from __future__ import annotations

import contextlib
import time
from ipaddress import ip_address
from typing import Any

from bench import measure
from bench.contenders import delete_nft_table, run_nft
from ipvs_synproxy.kernel.model import Dest, FwdMethod, Service
from ipvs_synproxy.kernel.netlink import IPVS
from ipvs_synproxy_testbed import netns, topology
from ipvs_synproxy_testbed.flood import Flood

FULL_PORT, FREE_PORT = 82, 83   # VIP ports, and rs1's ports behind them
RS = "rs1"
WINDOW = 4096                   # local ports per laddr (fullnat_lport_min..max)
LPORT_MIN = 20000
TAKEN = 0.9                     # share of the full service's ports held
HOLD_S = 60.0                   # IPVS's SYN_RECV timeout: how long a held port stays so
CLOSE_S = 10.0                  # IPVS's CLOSE timeout: when the reset ones are free
SYSCTLS = {"fullnat_lport_min": LPORT_MIN, "fullnat_lport_max": LPORT_MIN + WINDOW - 1}
RS_TABLE = "ip bench_ports"


def server_specs() -> list[str]:
    return [f"conn:{RS}:{topology.RS4[RS]}:{p}" for p in (FULL_PORT, FREE_PORT)]


def services() -> tuple[Service, Service]:
    full, free = (Service(addr=ip_address(topology.VIP4), port=p, scheduler="rr")
                  for p in (FULL_PORT, FREE_PORT))
    return full, free


def lb_sysctls(values: dict[str, int]) -> contextlib.AbstractContextManager[None]:
    return netns.sysctls(("lb",), {f"net.ipv4.vs.{k}": v for k, v in values.items()})


def _rs_answer(verdict: str | None) -> None:
    """What rs1 does with SYNs to FULL_PORT: ``drop``, ``reject with tcp reset``,
    or (None) let its listener answer."""
    delete_nft_table(RS, RS_TABLE)
    if verdict is not None:
        run_nft(RS, f"""
table {RS_TABLE} {{
  chain input {{
    type filter hook input priority filter; policy accept;
    tcp dport {FULL_PORT} {verdict}
  }}
}}
""")


def _taken(ipvs: IPVS, svc: Service) -> int:
    """Local ports the service's connections hold, over all its laddrs."""
    return sum(la.conn_counts for la in ipvs.laddrs(svc))


def _send_syns(n: int) -> int:
    if n <= 0:
        return 0
    return measure.start_flood(Flood("syn", port=FULL_PORT, count=n)).wait().sent


def fill(ipvs: IPVS, svc: Service) -> dict[str, Any]:
    """Take TAKEN of the service's ports with held connections, every laddr's
    cursor facing them (the module's text)."""
    size = WINDOW * len(topology.LADDRS4)
    target = round(TAKEN * size)
    t0 = time.monotonic()
    _rs_answer("drop")
    # A few SYNs make no connection (a spoofed tuple drawn twice): top up.
    sent = 0
    for _ in range(3):
        sent += _send_syns(target - _taken(ipvs, svc))
    held = _taken(ipvs, svc)
    # The rest of every range, and a little more (refused: the ranges are full).
    _rs_answer("reject with tcp reset")
    sent += _send_syns(size - held + size // 100)
    _rs_answer(None)
    full = _taken(ipvs, svc)
    # The reset ones free their ports CLOSE_S after their reset.
    deadline = time.monotonic() + CLOSE_S + 15
    time.sleep(CLOSE_S)
    while _taken(ipvs, svc) > held + size // 1000 and time.monotonic() < deadline:
        time.sleep(0.5)
    return {"ports": size, "target": target, "syns_sent": sent, "held": held,
            "full": full, "taken": _taken(ipvs, svc), "seconds": time.monotonic() - t0}


def _setup(ipvs: IPVS) -> tuple[Service, Service]:
    ipvs.flush()
    for svc in services():
        ipvs.add_service(svc)
        ipvs.add_dest(svc, Dest(addr=ip_address(topology.RS4[RS]), port=svc.port,
                                fwd=FwdMethod.FULLNAT, weight=1))
        for laddr in topology.LADDRS4:
            ipvs.add_laddr(svc, ip_address(laddr))
    return services()


def _tries() -> int | None:
    """fullnat_lport_tries, None on a series without it (the linear search)."""
    try:
        return int(netns.read_sysctl("lb", "net.ipv4.vs.fullnat_lport_tries"))
    except OSError:
        return None


def _merged(parts: list[dict[str, Any]]) -> dict[str, Any]:
    ok = sum(p["ok"] for p in parts)
    seconds = sum(p["seconds"] for p in parts)
    return {"ok": ok, "failed": sum(p["failed"] for p in parts), "seconds": seconds,
            "per_s": ok / seconds if seconds else 0.0, "chunks": len(parts)}


def measure_port_search(seconds: float, chunks: int) -> dict[str, Any]:
    """New connections per second through the full service and the free one,
    ``seconds`` each, alternating in ``chunks`` pieces (as bench.measure.conn_rates),
    after the fill. Needs the patched modules loaded and rs1's servers from
    :func:`server_specs` listening."""
    rec: dict[str, Any] = {"window": WINDOW, "laddrs": len(topology.LADDRS4),
                           "taken_share": TAKEN, "tries": _tries(), "hold_s": HOLD_S}
    with lb_sysctls(SYSCTLS), IPVS("lb") as ipvs:
        try:
            full, free = _setup(ipvs)
            t0 = time.monotonic()
            rec["fill"] = fill(ipvs, full)
            before = ipvs.ext_stats()
            parts: dict[str, list[dict[str, Any]]] = {"free": [], "full": []}
            for _ in range(chunks):
                parts["free"].append(measure.conn_rate(seconds / chunks,
                                                       target=(topology.VIP4, FREE_PORT)))
                parts["full"].append(measure.conn_rate(seconds / chunks,
                                                       target=(topology.VIP4, FULL_PORT)))
            after = ipvs.ext_stats()
            rec["free"], rec["full"] = _merged(parts["free"]), _merged(parts["full"])
            rec["taken_after"] = _taken(ipvs, full)
            rec["free_taken_after"] = _taken(ipvs, free)
            # from the first held SYN to the end: beyond HOLD_S, held ports had expired
            rec["held_for_s"] = time.monotonic() - t0
            rec["counters"] = {k: after.get(k, 0) - before.get(k, 0) for k in (
                "fullnat_conn_new", "fullnat_lport_give_up", "fullnat_lport_exhausted")}
        finally:
            _rs_answer(None)
            ipvs.flush()
    return rec
