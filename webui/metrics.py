"""``/metrics`` for Prometheus (no login: scrapers cannot log in; it only reads).

Standard counters under node_exporter's ipvs collector names and labels, so
dashboards and alerts written for node_exporter work unchanged:
``node_ipvs_{connections,incoming_packets,outgoing_packets,incoming_bytes,
outgoing_bytes}_total`` and ``node_ipvs_backend_{connections_active,
connections_inactive,weight}`` with labels local_address, local_port,
remote_address, remote_port, proto, local_mark. The extensions are
``ipvs_synproxy_*``: every extended counter as ``ipvs_synproxy_<name>_total``,
plus the SYN-proxy flag per service, laddr pool counters and a scrape-success
gauge.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import cast

from flask import Blueprint, Response, current_app
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from ipvs_synproxy.kernel.model import Dest, Service
from webui.service import ConsoleError, ConsoleService

bp = Blueprint("metrics", __name__)

BACKEND_LABELS = ["local_address", "local_port", "remote_address", "remote_port", "proto",
                  "local_mark"]
SERVICE_LABELS = ["local_address", "local_port", "proto", "local_mark"]
_TOTALS = (("connections", "conns", "The total number of connections made."),
           ("incoming_packets", "inpkts", "The total number of incoming packets."),
           ("outgoing_packets", "outpkts", "The total number of outgoing packets."),
           ("incoming_bytes", "inbytes", "The total amount of incoming data."),
           ("outgoing_bytes", "outbytes", "The total amount of outgoing data."))
_METRIC_NAME = re.compile(r"[^a-zA-Z0-9_]")


def service_labels(svc: Service) -> list[str]:
    """node_exporter's spelling: proto TCP/UDP/SCTP or FWM; local_mark only for FWM."""
    if svc.fwmark:
        return ["", "0", "FWM", str(svc.fwmark)]
    return [str(svc.addr), str(svc.port), svc.protocol.value.upper(), ""]


def backend_labels(svc: Service, dest: Dest) -> list[str]:
    la, lp, proto, mark = service_labels(svc)
    return [la, lp, str(dest.addr), str(dest.port), proto, mark]


class IpvsCollector(Collector):
    def __init__(self, service: ConsoleService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("ipvs_synproxy_up", "1 if IPVS could be read.")
        try:
            table = self.service.table()
        except ConsoleError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        totals = table.totals
        if totals is None:  # /proc not readable: the sum over services
            totals = {key: sum(getattr(s.stats, key) if s.stats else 0
                               for s, _, _ in table.services) for _, key, _ in _TOTALS}
        for name, key, text in _TOTALS:
            c = CounterMetricFamily(f"node_ipvs_{name}", text)
            c.add_metric([], totals[key])
            yield c
        active = GaugeMetricFamily("node_ipvs_backend_connections_active",
                                   "The current active connections by local and remote "
                                   "address.", labels=BACKEND_LABELS)
        inactive = GaugeMetricFamily("node_ipvs_backend_connections_inactive",
                                     "The current inactive connections by local and remote "
                                     "address.", labels=BACKEND_LABELS)
        weight = GaugeMetricFamily("node_ipvs_backend_weight",
                                   "The current backend weight by local and remote address.",
                                   labels=BACKEND_LABELS)
        synproxy = GaugeMetricFamily("ipvs_synproxy_service_synproxy_enabled",
                                     "1 if the SYN proxy is on for the service.",
                                     labels=SERVICE_LABELS)
        laddr_conns = GaugeMetricFamily("ipvs_synproxy_laddr_connections",
                                        "Connections using a FULLNAT local address.",
                                        labels=[*SERVICE_LABELS, "laddr"])
        laddr_conflicts = CounterMetricFamily("ipvs_synproxy_laddr_port_conflicts",
                                              "Local-port allocation conflicts of a FULLNAT "
                                              "local address.",
                                              labels=[*SERVICE_LABELS, "laddr"])
        for svc, dests, laddrs in table.services:
            synproxy.add_metric(service_labels(svc), 1 if svc.synproxy else 0)
            for d in dests:
                labels = backend_labels(svc, d)
                active.add_metric(labels, d.active_conns)
                inactive.add_metric(labels, d.inact_conns)
                weight.add_metric(labels, d.weight)
            for la in laddrs:
                labels = [*service_labels(svc), str(la.addr)]
                laddr_conns.add_metric(labels, la.conn_counts)
                laddr_conflicts.add_metric(labels, la.port_conflict)
        yield from (active, inactive, weight, synproxy, laddr_conns, laddr_conflicts)
        for name, value in sorted((table.ext or {}).items()):
            metric = _METRIC_NAME.sub("_", name)
            c = CounterMetricFamily(f"ipvs_synproxy_{metric}",
                                    f"Extended IPVS counter {name} "
                                    "(/proc/net/ip_vs_ext_stats).")
            c.add_metric([], value)
            yield c


def make_registry(service: ConsoleService) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(IpvsCollector(service))
    return registry


@bp.route("/metrics")
def metrics() -> Response:
    registry = cast(CollectorRegistry, current_app.extensions["ipvs_metrics"])
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)
