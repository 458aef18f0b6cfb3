"""The XDP program's real counters (issue 22) reach ``ipvs-synproxy stats``
(table and JSON) and the exporter's /metrics text, per interface with its
mode; with the program gone, both show an empty XDP section and no error.

Generic mode: it needs nothing of lb's peer (tests/vm/test_xdp.py covers
native mode and what the program answers).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ipvs_synproxy.build import xdp as xdp_build
from ipvs_synproxy.cli import main as cli
from ipvs_synproxy.kernel import xdp
from ipvs_synproxy.kernel.model import FwdMethod
from ipvs_synproxy.kernel.netlink import IPVS
from ipvs_synproxy_testbed import flood
from tests.vm.helpers import NETS, synproxy_service, wait_for

DEV = "eth0"
SYNS = 20


@pytest.fixture
def attached(ipvs: IPVS) -> Iterator[None]:
    """The program on lb's eth0 in generic mode; detached afterwards."""
    try:
        st = xdp.attach(xdp_build.build(), DEV, "lb", ipvs, os.urandom(16), "generic")
        assert st.attached == "generic", st
        yield
    finally:
        xdp.detach(DEV, "lb")


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert cli.main(list(argv)) == 0
    return capsys.readouterr().out


def _xdp_samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples
            if "_xdp_" in s.name}


def test_real_counters_reach_stats_and_metrics(ipvs: IPVS, attached: None,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    net = NETS["ipv4"]
    synproxy_service(ipvs, net, FwdMethod.MASQ)
    xdp.mirror(ipvs)
    before = xdp.read_stats(DEV, "lb")["syn_answered"]
    flood.run_flood("syn", target=net.vip, port=80, count=SYNS, rate_pps=400,
                    family=net.version)
    assert wait_for(lambda: xdp.read_stats(DEV, "lb")["syn_answered"] == before + SYNS, 10)
    truth = xdp.read_stats(DEV, "lb")

    (dev,) = json.loads(_cli(capsys, "stats", "--netns", "lb", "--json"))["xdp"]
    assert (dev["device"], dev["mode"]) == (DEV, "generic")
    assert set(dev["counters"]) == set(xdp.STATS)
    assert dev["counters"]["syn_answered"] == truth["syn_answered"]
    table = _cli(capsys, "stats", "--netns", "lb").splitlines()
    head = table.index(next(ln for ln in table if ln.startswith(f"XDP on {DEV} (generic)")))
    assert table[head + 1].split() == ["syn_answered", str(truth["syn_answered"])]

    samples = _xdp_samples(_cli(capsys, "exporter", "--once", "--netns", "lb"))
    packets = {dict(labels)["result"]: v for (name, labels), v in samples.items()
               if name == "ipvs_synproxy_xdp_packets_total" and ("device", DEV) in labels}
    assert set(packets) == set(xdp.STATS)
    assert packets["syn_answered"] == truth["syn_answered"]
    assert samples[("ipvs_synproxy_xdp_attached",
                    frozenset({("device", DEV), ("mode", "generic")}))] == 1

    xdp.detach(DEV, "lb")
    assert json.loads(_cli(capsys, "stats", "--netns", "lb", "--json"))["xdp"] == []
    assert _xdp_samples(_cli(capsys, "exporter", "--once", "--netns", "lb")) == {}
