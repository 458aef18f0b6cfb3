"""``ipvs-synproxy exporter`` against the real modules: a scrape, parsed with
prometheus-client's own parser, shows each VIP's series, moves the flooded
VIP's and no other's, and serves every series the Grafana dashboard and the
alert rules (monitoring/) ask for."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ipvs_synproxy.exporter import series
from ipvs_synproxy.kernel.model import FwdMethod
from ipvs_synproxy.kernel.netlink import IPVS
from ipvs_synproxy_testbed import flood, netns, peers
from tests import monitoring_queries
from tests.vm.helpers import NETS, synproxy_service, wait_for

LISTEN = "127.0.0.1:10963"
_GET = ("import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
        f"'http://{LISTEN}/metrics', timeout=30).read().decode())")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape() -> tuple[str, Samples]:
    text = netns.run("lb", [sys.executable, "-c", _GET]).stdout
    samples: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


@pytest.fixture
def exporter() -> Iterator[None]:
    proc = subprocess.Popen(["ip", "netns", "exec", "lb", sys.executable, "-m",
                             "ipvs_synproxy.cli", "exporter", "--listen", LISTEN],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def serving() -> bool:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        return netns.run("lb", [sys.executable, "-c", _GET], check=False).returncode == 0

    try:
        assert wait_for(serving, 60), "the exporter did not start"
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_scrape_shows_each_vip_and_the_flooded_one_moves(
        ipvs: IPVS, real_servers: object, exporter: None) -> None:
    v4, v6 = NETS["ipv4"], NETS["ipv6"]
    nat = {"vip": v4.vip, "port": "80", "protocol": "tcp"}
    fnat6 = {"vip": v6.vip, "port": "80", "protocol": "tcp"}
    synproxy_service(ipvs, v4, FwdMethod.MASQ, port=80)
    synproxy_service(ipvs, v6, FwdMethod.FULLNAT, port=80)
    synproxy_service(ipvs, v4, FwdMethod.MASQ, port=8081, rs_port=80, synproxy=False)

    _, before = scrape()
    assert value(before, "ipvs_synproxy_up") == 1
    assert value(before, "ipvs_synproxy_syns_received_total", **nat) == 0
    sent = flood.run_flood("syn", target=v4.vip, port=80, count=200, rate_pps=300,
                           family=v4.version)
    peers.http_get(v6.vip, 80)
    text, after = scrape()

    syns = "ipvs_synproxy_syns_received_total"
    assert value(after, syns, **nat) == sent.sent == 200
    assert value(after, "ipvs_synproxy_cookies_sent_total", **nat) == 200
    assert value(after, "ipvs_synproxy_cookie_acks_total", **nat, result="valid") == 0
    # the other VIP counts its one real client, and nothing of the flood
    assert value(after, syns, **fnat6) == 1
    # The client's handshake ACK, and its request when a second CPU sends it
    # before the first made the connection (0019 lets that one find it)
    assert value(after, "ipvs_synproxy_cookie_acks_total", **fnat6, result="valid") in (1, 2)
    assert value(after, "ipvs_synproxy_connections_proxied_total", **fnat6) == 1
    # the service without the SYN proxy has traffic series but no SYN-proxy ones
    plain = {"vip": v4.vip, "port": "8081", "protocol": "tcp"}
    assert value(after, "ipvs_synproxy_service_info", **plain, scheduler="rr",
                 syn_proxy="off") == 1
    assert not [k for k in after if k[0] == syns and ("port", "8081") in k[1]]
    # Per real server: IPVS's traffic counters reach readers through its rate
    # estimator, which sums the per-CPU counters every 2 seconds.
    def served_by() -> float:
        _, now = scrape()
        return sum(value(now, "ipvs_synproxy_real_server_connections_total", **fnat6,
                         real_server=rs, real_port="80") for rs in v6.rs.values())

    assert wait_for(lambda: served_by() == 1, 20), served_by()
    for laddr in v6.laddrs:
        ll = {**fnat6, "laddr": laddr}
        assert value(after, "ipvs_synproxy_fullnat_lports_free", **ll) + \
            value(after, "ipvs_synproxy_fullnat_lports_used", **ll) > 1000
    assert value(after, "ipvs_synproxy_cookie_key_period_seconds") > 0
    assert value(after, "ipvs_synproxy_sync_daemon_running", state="master") == 0

    names = {name for name, _ in after}
    assert not [n for n in names if not n.startswith("ipvs_synproxy_")], names
    assert "node_ipvs" not in text and "synproxy_synproxy" not in text
    assert names <= set(series.BY_NAME), names - set(series.BY_NAME)

    # Every series the dashboard and the alert rules query is served.
    queries = (monitoring_queries.dashboard_queries() + monitoring_queries.variable_queries()
               + monitoring_queries.rule_exprs())
    assert queries
    served = monitoring_queries.scraped_names(text)
    assert served == names
    # the XDP series exist only while a program is attached (test_xdp_counters)
    xdp_only = {"ipvs_synproxy_xdp_attached", "ipvs_synproxy_xdp_packets_total"}
    assert monitoring_queries.unknown_names(
        queries, served | xdp_only | monitoring_queries.PROMETHEUS_OWN) == set()
