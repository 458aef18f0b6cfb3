"""The console's XDP fast path view: per interface its mode and the program's
counters with per-second rates, on the page, in /api/xdp and in /metrics, from
fake counters (the console reads them through ipvs_synproxy.kernel.xdp)."""

from __future__ import annotations

from flask.testing import FlaskClient

from ipvs_synproxy.kernel import xdp
from tests.unit.webui.support import Clock

ETH0 = xdp.DeviceStats("eth0", "native", {"syn_answered": 100, "syn_malformed": 2,
                                          "passed": 10, "not_ready": 0, "no_room": 0,
                                          "syn_known": 0})


def test_api_lists_each_device_with_rates(admin: FlaskClient, clock: Clock,
                                          xdp_devices: list[xdp.DeviceStats]) -> None:
    assert admin.get("/api/xdp").get_json()["devices"] == []
    xdp_devices.append(ETH0)
    (first,) = admin.get("/api/xdp").get_json()["devices"]
    assert first == {"device": "eth0", "mode": "native", "counters": ETH0.stats,
                     "rates": dict.fromkeys(xdp.STATS, 0.0)}
    xdp_devices[0] = xdp.DeviceStats("eth0", "native", {**ETH0.stats, "syn_answered": 300})
    xdp_devices.append(xdp.DeviceStats("eth1", None, dict.fromkeys(xdp.STATS, 0)))
    clock.t += 2.0
    eth0, eth1 = admin.get("/api/xdp").get_json()["devices"]
    assert eth0["rates"]["syn_answered"] == 100.0 and eth0["rates"]["passed"] == 0.0
    assert eth1["mode"] is None and eth1["rates"]["passed"] == 0.0


def test_page_shows_the_devices_or_says_none(admin: FlaskClient,
                                             xdp_devices: list[xdp.DeviceStats]) -> None:
    html = admin.get("/synproxy").get_data(as_text=True)
    assert 'data-src="/api/xdp"' in html
    assert '<p class="note" id="xdp-none">' in html  # shown: no device
    xdp_devices.append(ETH0)
    html = admin.get("/synproxy").get_data(as_text=True)
    assert '<table class="grid xdp" data-device="eth0">' in html
    assert "<caption>eth0 (native)</caption>" in html
    assert '<tr data-counter="syn_answered"><td>syn_answered</td><td class="num total">100' \
        in html
    assert 'id="xdp-none" hidden' in html


def test_metrics_serve_the_xdp_series(client: FlaskClient,
                                      xdp_devices: list[xdp.DeviceStats]) -> None:
    xdp_devices.append(ETH0)
    text = client.get("/metrics").get_data(as_text=True)
    assert 'ipvs_synproxy_xdp_packets_total{device="eth0",result="syn_answered"} 100.0' \
        in text
    assert 'ipvs_synproxy_xdp_attached{device="eth0",mode="native"} 1.0' in text
