"""``/metrics`` for Prometheus (no login: scrapers cannot log in; it only reads).

The console serves the exporter's registry (:mod:`ipvs_synproxy.exporter`),
read through the console's own IPVS connection and namespace: the same
``ipvs_synproxy_*`` series as ``ipvs-synproxy exporter``, listed in
docs/metrics.md. node_exporter's ``node_ipvs_*`` series are not repeated here.
"""

from __future__ import annotations

from typing import cast

from flask import Blueprint, Response, current_app
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ipvs_synproxy.exporter import collector
from webui.service import ConsoleService

bp = Blueprint("metrics", __name__)


def make_registry(service: ConsoleService) -> CollectorRegistry:
    return collector.registry(service.reading)


@bp.route("/metrics")
def metrics() -> Response:
    registry = cast(CollectorRegistry, current_app.extensions["ipvs_metrics"])
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)
