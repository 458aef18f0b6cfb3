"""The XDP piece: "(a) + XDP" against the module's own answer, on real NICs.

On the standard topology client and lb meet through veths, and a veth starts
every packet as an skb: XDP on it runs on a copy of that skb, so what XDP
saves on a NIC (the skb, the stack) cannot show there (measured 2026-12-07:
native XDP on lb's veth cost twice the module's answer per SYN). This piece
therefore swaps client's and lb's eth0 for two virtio NICs joined by a QEMU
hub (ipvs_synproxy_testbed.nicpair, ``vm exec --nic-pair``): lb's NIC
interrupts go to LB_CPU, the client's and the generator to FLOOD_CPU.

Per round, all on the NIC pair, a flat-out SYN flood in alternating pieces:
the baseline (dropped in lb's raw PREROUTING), the module's answer ("(a)",
SYN proxy, NAT), and the XDP program's (native, on lb's NIC); then, on the
distribution's modules, the baseline and netfilter SYNPROXY ("(b)"); then
legitimate connections during a flat-out flood answered by XDP. The
balancer's cost is LB_CPU's softirq time, as in the main table; the XDP
program's own run time per SYN comes from the kernel's BPF statistics.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from bench import measure
from bench.contenders import CONTENDERS, NF, Contender, add_drop, del_drop, load_ipvs
from ipvs_synproxy.build import xdp as xdp_build
from ipvs_synproxy.kernel import xdp
from ipvs_synproxy.kernel.netlink import IPVS
from ipvs_synproxy_testbed import hostflood, netns, nicpair
from ipvs_synproxy_testbed.flood import Flood, ReplySink

AFFINITY = {"lb": measure.LB_CPU, "client": measure.FLOOD_CPU}
MODULE = "ipvs-synproxy-nat"
XDP = "ipvs-synproxy-xdp"
DEV = "eth0"
# A virtio NIC keeps a sent frame until the device is done with it: trafgen's
# socket needs room for many in flight, or its ring flush fails with EAGAIN.
WMEM = 32 * 1024 * 1024
PASSES = ("baseline", MODULE, XDP)


@contextmanager
def nic_pair() -> Iterator[None]:
    """client's and lb's eth0 as the NIC pair, trafgen's socket memory raised."""
    keys = ("net.core.wmem_default", "net.core.wmem_max")
    saved = {k: netns.read_sysctl(None, k) for k in keys}
    nicpair.swap_in(AFFINITY)
    try:
        for k in keys:
            netns.write_sysctl(None, k, str(WMEM))
        yield
    finally:
        for k, v in saved.items():
            netns.write_sysctl(None, k, v)
        nicpair.swap_out()


def _prog_time() -> tuple[int, int]:
    """Run time (ns) and runs of the loaded ipvs_synproxy_xdp programs."""
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True,
                         check=True).stdout
    progs = [p for p in json.loads(out) if p.get("name") == "ipvs_synproxy_xdp"]
    return (sum(p.get("run_time_ns", 0) for p in progs), sum(p.get("run_cnt", 0) for p in progs))


def _host_flood(seconds: float) -> tuple[int, float, int | None]:
    """The host's flood (hostflood): sent, seconds, lb's answers."""
    with ReplySink(4) as sink:
        res = hostflood.flood(seconds)
        time.sleep(0.2)   # answers still on their way to the client
        return int(res["sent"]), float(res["seconds"]), sink.replies()


def _trafgen_flood(seconds: float) -> tuple[int, float, int | None]:
    res = measure.start_flood(Flood("syn", duration=seconds)).wait()
    return res.sent, res.seconds, res.replies


# The flood's source: trafgen in the client (default), or the host
# (hostflood, bench.run --host-flood; bench/README.md says why not by default).
HOST_FLOOD = {"on": False}


def _from_host() -> bool:
    return HOST_FLOOD["on"] and hostflood.available()


def _no_answers() -> int:
    return 0


def flood_once(seconds: float, answers: Callable[[], int] = _no_answers) -> dict[str, Any]:
    """A flat-out flood (trafgen on FLOOD_CPU, or the host's) and LB_CPU's
    softirq time over it; ``answers`` reads the answering code's own count of
    SYN/ACKs sent."""
    t0, a0 = _prog_time(), answers()
    lb0, cpu0 = measure.softirq_seconds(measure.LB_CPU), measure.cpu_busy_seconds()
    host = _from_host()
    sent, secs, replies = (_host_flood if host else _trafgen_flood)(seconds)
    lb1, cpu1 = measure.softirq_seconds(measure.LB_CPU), measure.cpu_busy_seconds()
    t1, a1 = _prog_time(), answers()
    return {"sent": sent, "seconds": secs, "pps": sent / secs if secs else 0.0,
            "replies": replies, "kernel_synacks": a1 - a0,
            "generator": "host" if host else "trafgen",
            "lb_softirq_s": lb1 - lb0, "cpu_busy_s": cpu1 - cpu0,
            "prog_ns": t1[0] - t0[0], "prog_runs": t1[1] - t0[1]}


def _merged(parts: list[dict[str, Any]]) -> dict[str, Any]:
    return {**measure.merged(parts, ("prog_ns", "prog_runs")),
            "generator": parts[0]["generator"]}


class Program:
    """The XDP program on lb's NIC, attached and detached between pieces."""

    def __init__(self, ipvs: IPVS) -> None:
        self.ipvs = ipvs
        self.obj = xdp_build.build()
        self.secret = os.urandom(16)

    def on(self) -> None:
        st = xdp.attach(self.obj, DEV, "lb", self.ipvs, self.secret, "native")
        if st.attached != "native":
            raise RuntimeError(f"XDP not native on lb's NIC: {st}")

    def off(self) -> None:
        xdp.detach(DEV, "lb")

    def answered(self) -> int:
        """The program's syn_answered (0 when it is not attached)."""
        try:
            return xdp.read_stats(DEV, "lb")["syn_answered"]
        except (xdp.XdpError, OSError):
            return 0


Pass = tuple[Callable[[], None], Callable[[], None], Callable[[], int]]


def _alternate(passes: dict[str, Pass], seconds: float, chunks: int
               ) -> dict[str, dict[str, Any]]:
    """Each pass (set up, torn down around its piece, its count of answers)
    ``seconds`` in all, in ``chunks`` alternating pieces: the host's speed
    moves within seconds."""
    parts: dict[str, list[dict[str, Any]]] = {name: [] for name in passes}
    for _ in range(chunks):
        for name, (up, down, answers) in passes.items():
            up()
            try:
                parts[name].append(flood_once(seconds / chunks, answers))
            finally:
                down()
    return {name: _merged(p) for name, p in parts.items()}


LEGIT_FLOOD_S = 15.0   # the host's flood while legitimate clients connect
LEGIT_BUDGET_S = 12.0


def legit_during_flood(n: int, timeout: float) -> dict[str, Any]:
    """``n`` connections from the client while a flat-out flood runs (trafgen's
    or the host's); with the flood's own rate."""
    if not _from_host():
        return measure.legit_during_flood(n, timeout)
    with ReplySink(4):
        handle = hostflood.start(LEGIT_FLOOD_S)
        time.sleep(0.5)
        ts = measure.connections(n, timeout, budget=LEGIT_BUDGET_S)
        res = hostflood.wait(handle)
    out = measure.timings(ts)
    out.update({"flood_sent": res["sent"], "flood_seconds": res["seconds"],
                "flood_pps": res["sent"] / res["seconds"] if res["seconds"] else 0.0})
    return out


def _nothing() -> None:
    pass


def measure_patched(seconds: float, chunks: int, legit: int,
                    timeout: float) -> dict[str, Any]:
    """Baseline, the module's answer and XDP's, alternating; then legitimate
    connections while a flat-out flood is answered by XDP."""
    load_ipvs("patched")
    c: Contender = CONTENDERS[MODULE]
    c.setup()
    bpf_stats(True)
    try:
        with IPVS("lb") as ipvs:
            prog = Program(ipvs)
            rec = _alternate({
                "baseline": (add_drop, del_drop, _no_answers),
                MODULE: (_nothing, _nothing, lambda: measure.kernel_synacks(c)),
                XDP: (prog.on, prog.off, prog.answered)}, seconds, chunks)
            prog.on()
            try:
                rec["legit_xdp"] = legit_during_flood(legit, timeout)
            finally:
                prog.off()
    finally:
        bpf_stats(False)
        c.teardown()
    return rec


def measure_stock(seconds: float, chunks: int) -> dict[str, Any]:
    """The baseline and netfilter SYNPROXY, alternating, on the distribution's
    modules."""
    load_ipvs("stock")
    c = CONTENDERS[NF]
    c.setup()
    try:
        rec = _alternate({"baseline_nf": (add_drop, del_drop, _no_answers),
                          NF: (_nothing, _nothing, lambda: measure.kernel_synacks(c))},
                         seconds, chunks)
    finally:
        c.teardown()
    return rec


def measure_fastpath(seconds: float, chunks: int, legit: int,
                     timeout: float) -> dict[str, Any]:
    """One round of the piece, on the NIC pair."""
    with nic_pair():
        rec = measure_patched(seconds, chunks, legit, timeout)
        rec.update(measure_stock(seconds, chunks))
    return rec


def have_nic_pair() -> bool:
    """Was the guest booted with ``vm exec --nic-pair``?"""
    try:
        nicpair.nic_names(timeout=5.0)
    except RuntimeError:
        return False
    return True


def bpf_stats(on: bool) -> None:
    """The kernel's run time accounting of BPF programs (kernel.bpf_stats_enabled)."""
    netns.write_sysctl(None, "kernel.bpf_stats_enabled", "1" if on else "0")
