"""The console's attack view (issue 20): per SYN-proxy service rates from the kernel's
per-service counters, drops by reason, and the "under flood" flag with its threshold and
hysteresis, on the kernel stand-in with an injected clock."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from ipvs_synproxy.exporter import series
from ipvs_synproxy.kernel.model import Service
from ipvs_synproxy.kernel.sysctl import Sysctls
from tests.unit.webui.support import (
    BEARER,
    SID,
    SID6,
    SVC,
    SVC6,
    UDP_SID,
    Clock,
    Kernel,
    make_users,
)
from webui import create_app
from webui import settings as settings_mod
from webui.service import DROP_REASONS, ConsoleService, FloodThreshold
from webui.settings import SettingsError

WINDOW, CLEAR = series.FLOOD_WINDOW_S, series.FLOOD_CLEAR_S
FLOOD = {"synproxy_syn_received": 5000, "synproxy_cookie_sent": 5000,
         "synproxy_ack_invalid": 40}  # spoofed: no cookie comes back
LEGIT = {"synproxy_syn_received": 50, "synproxy_cookie_sent": 50, "synproxy_ack_valid": 49,
         "synproxy_conn_proxied": 49}


@pytest.fixture
def sp_kernel(kernel: Kernel) -> Kernel:
    """The console's test table with the SYN proxy on for both TCP VIPs (v4 port 80 and
    v6 port 443); the UDP service has none."""
    kernel.edit_service(dataclasses.replace(SVC, synproxy=True, stats=None))
    return kernel


def console_for(kernel: Kernel, clock: Clock, tmp_path: Path,
                threshold: FloodThreshold | None = None) -> ConsoleService:
    return ConsoleService(lambda: kernel, Sysctls(root=str(tmp_path)), clock=clock,
                          flood=threshold or FloodThreshold())


@pytest.fixture
def console(sp_kernel: Kernel, clock: Clock, tmp_path: Path) -> ConsoleService:
    return console_for(sp_kernel, clock, tmp_path)


def by_id(view: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["id"]: s for s in view["services"]}


def run(console: ConsoleService, kernel: Kernel, clock: Clock, seconds: int,
        per_second: dict[Service, dict[str, int]]) -> dict[str, dict[str, Any]]:
    """``seconds`` of traffic, read once a second as the page polls; the last read."""
    view = by_id(console.attack())
    for _ in range(seconds):
        clock.t += 1
        for svc, counts in per_second.items():
            kernel.bump_sp_stats(svc, **counts)
        view = by_id(console.attack())
    return view


# ---- rates -----------------------------------------------------------------------------------


def test_rates_are_per_second_over_the_flood_window(
        console: ConsoleService, sp_kernel: Kernel, clock: Clock) -> None:
    counts = {"synproxy_syn_received": 300, "synproxy_cookie_sent": 290,
              "synproxy_ack_valid": 240, "synproxy_ack_invalid": 10,
              "synproxy_conn_proxied": 230, "synproxy_drop_csum": 5, "synproxy_no_route": 2}
    v6 = run(console, sp_kernel, clock, 6, {SVC6: counts})[SID6]
    assert v6["rates"] == {"syns": 300, "cookies": 290, "valid_acks": 240, "proxied": 230,
                           "invalid_acks": 10}
    assert v6["totals"] == {"syns": 1800, "cookies": 1740, "valid_acks": 1440,
                            "proxied": 1380, "invalid_acks": 60}
    assert v6["valid_ack_ratio"] == pytest.approx(240 / 290, abs=1e-4)
    assert v6["drops"]["checksum"] == {"rate": 5, "total": 30}
    assert v6["drops"]["no_route"] == {"rate": 2, "total": 12}
    assert v6["drops"]["hold_full"] == {"rate": 0, "total": 0}
    assert (v6["vip"], v6["port"], v6["protocol"]) == ("2001:db8:1::10", 443, "tcp")


def test_a_rate_spans_the_window_not_just_the_last_second(
        console: ConsoleService, sp_kernel: Kernel, clock: Clock) -> None:
    run(console, sp_kernel, clock, 5, {})
    # one second of 3000 SYNs after quiet: averaged over the 3 s window
    view = run(console, sp_kernel, clock, 1, {SVC6: {"synproxy_syn_received": 3000}})
    assert view[SID6]["rates"]["syns"] == 3000 / WINDOW


def test_drop_reasons_are_the_exporters_reason_labels() -> None:
    exported = {labels["reason"] for name, labels in series.SERVICE_EXT.values()
                if name == "ipvs_synproxy_drops_total"}
    assert set(DROP_REASONS.values()) == exported and len(exported) >= 15


def test_reads_within_half_a_second_share_one_sample(
        console: ConsoleService, sp_kernel: Kernel, clock: Clock) -> None:
    first = run(console, sp_kernel, clock, 4, {SVC6: LEGIT})[SID6]["rates"]
    sp_kernel.bump_sp_stats(SVC6, synproxy_syn_received=10**6)
    clock.t += 0.2
    assert by_id(console.attack())[SID6]["rates"] == first


def test_a_service_added_again_starts_from_zero_without_negative_rates(
        console: ConsoleService, sp_kernel: Kernel, clock: Clock) -> None:
    run(console, sp_kernel, clock, 4, {SVC6: FLOOD})
    sp_kernel.del_service(SVC6)
    sp_kernel.add_service(SVC6)
    view = run(console, sp_kernel, clock, 1, {SVC6: LEGIT})[SID6]
    assert all(v >= 0 for v in view["rates"].values())
    assert view["totals"]["syns"] == 50


# ---- the flood flag --------------------------------------------------------------------------


def test_a_flood_flags_the_flooded_vip_and_not_the_other(
        console: ConsoleService, sp_kernel: Kernel, clock: Clock) -> None:
    view = run(console, sp_kernel, clock, 1, {SVC6: FLOOD, SVC: LEGIT})
    assert view[SID6]["under_flood"] and view[SID6]["flooding_now"]
    assert not view[SID]["under_flood"]
    view = run(console, sp_kernel, clock, 5, {SVC6: FLOOD, SVC: LEGIT})
    assert view[SID6]["under_flood"] and view[SID6]["flood_for_s"] == 5
    assert view[SID6]["clears_in_s"] is None  # flooded now
    assert not view[SID]["under_flood"] and view[SID]["flood_for_s"] is None


def test_no_flood_below_the_syn_rate(console: ConsoleService, sp_kernel: Kernel,
                                     clock: Clock) -> None:
    below = {"synproxy_syn_received": int(series.FLOOD_SYN_RATE) - 1,
             "synproxy_cookie_sent": int(series.FLOOD_SYN_RATE) - 1}
    view = run(console, sp_kernel, clock, 10, {SVC6: below})
    assert not view[SID6]["under_flood"]
    view = run(console, sp_kernel, clock, 4, {SVC6: {
        "synproxy_syn_received": int(series.FLOOD_SYN_RATE),
        "synproxy_cookie_sent": int(series.FLOOD_SYN_RATE)}})
    assert view[SID6]["under_flood"]


def test_legitimate_load_at_a_high_rate_is_not_a_flood(
        console: ConsoleService, sp_kernel: Kernel, clock: Clock) -> None:
    busy = {"synproxy_syn_received": 20000, "synproxy_cookie_sent": 20000,
            "synproxy_ack_valid": 19000, "synproxy_conn_proxied": 19000}
    view = run(console, sp_kernel, clock, 10, {SVC6: busy})
    assert view[SID6]["rates"]["syns"] == 20000
    assert not view[SID6]["under_flood"]


@pytest.mark.parametrize(("valid_per_1000_cookies", "flood"), [(499, True), (500, False)])
def test_the_valid_ack_ratio_decides_at_the_threshold(
        console: ConsoleService, sp_kernel: Kernel, clock: Clock,
        valid_per_1000_cookies: int, flood: bool) -> None:
    assert series.FLOOD_VALID_ACK_RATIO == 0.5
    counts = {"synproxy_syn_received": 4000, "synproxy_cookie_sent": 4000,
              "synproxy_ack_valid": 4 * valid_per_1000_cookies}
    assert run(console, sp_kernel, clock, 4, {SVC6: counts})[SID6]["under_flood"] is flood


def test_syns_dropped_before_a_cookie_show_as_drops_not_as_a_flood(
        console: ConsoleService, sp_kernel: Kernel, clock: Clock) -> None:
    """As in the alert rules (monitoring/): no cookie sent, no ratio, no flood."""
    malformed = {"synproxy_syn_received": 5000, "synproxy_drop_options": 5000}
    view = run(console, sp_kernel, clock, 3, {SVC6: malformed})[SID6]
    assert not view["under_flood"] and view["valid_ack_ratio"] is None
    assert view["drops"]["options"]["rate"] == 5000


def test_the_flag_holds_for_the_clear_time_after_the_last_flooded_window(
        console: ConsoleService, sp_kernel: Kernel, clock: Clock) -> None:
    run(console, sp_kernel, clock, 5, {SVC6: FLOOD})
    last_flooded = clock.t
    view = by_id(console.attack())
    while view[SID6]["flooding_now"]:  # the window still holds flood seconds
        last_flooded = clock.t
        view = run(console, sp_kernel, clock, 1, {SVC6: LEGIT})
    assert clock.t - last_flooded <= 1 + WINDOW
    while clock.t < last_flooded + CLEAR:
        assert view[SID6]["under_flood"], f"cleared {clock.t - last_flooded} s after"
        assert 0 < view[SID6]["clears_in_s"] <= CLEAR
        view = run(console, sp_kernel, clock, 1, {SVC6: LEGIT})
    assert clock.t == last_flooded + CLEAR
    assert not view[SID6]["under_flood"]
    assert view[SID6]["clears_in_s"] is None and view[SID6]["flood_for_s"] is None


def test_a_new_flood_within_the_clear_time_keeps_one_episode(
        console: ConsoleService, sp_kernel: Kernel, clock: Clock) -> None:
    run(console, sp_kernel, clock, 3, {SVC6: FLOOD})
    run(console, sp_kernel, clock, 6, {SVC6: LEGIT})
    view = run(console, sp_kernel, clock, 2, {SVC6: FLOOD})[SID6]
    assert view["under_flood"] and view["flood_for_s"] == 10  # from its first second


def test_a_lower_threshold_from_the_settings_applies(
        sp_kernel: Kernel, clock: Clock, tmp_path: Path) -> None:
    moderate = {"synproxy_syn_received": 300, "synproxy_cookie_sent": 300}
    default = console_for(sp_kernel, clock, tmp_path)
    lowered = console_for(sp_kernel, clock, tmp_path, FloodThreshold(syn_rate=200))
    for _ in range(4):
        clock.t += 1
        sp_kernel.bump_sp_stats(SVC6, **moderate)
        flagged = by_id(lowered.attack())[SID6]
        calm = by_id(default.attack())[SID6]
    assert flagged["under_flood"] and not calm["under_flood"]
    assert by_id(lowered.attack()) and lowered.attack()["threshold"]["syn_rate"] == 200


# ---- which services --------------------------------------------------------------------------


def test_only_syn_proxy_services_are_listed(console: ConsoleService) -> None:
    ids = set(by_id(console.attack()))
    assert ids == {SID, SID6} and UDP_SID not in ids


def test_a_service_that_had_the_syn_proxy_keeps_its_counters_when_it_is_off(
        console: ConsoleService, sp_kernel: Kernel, clock: Clock) -> None:
    run(console, sp_kernel, clock, 2, {SVC6: LEGIT})
    sp_kernel.edit_service(dataclasses.replace(SVC6, synproxy=False))
    view = by_id(console.attack())[SID6]
    assert view["synproxy"] is False and view["counters"] is True
    assert view["totals"]["syns"] == 100


def test_services_without_per_service_counters_are_shown_calm_and_empty(
        sp_kernel: Kernel, clock: Clock, tmp_path: Path) -> None:
    sp_kernel.has_sp_stats = False  # modules without 0028/0029
    console = console_for(sp_kernel, clock, tmp_path)
    for _ in range(4):
        clock.t += 1
        sp_kernel.bump_sp_stats(SVC6, **FLOOD)
        view = by_id(console.attack())
    assert set(view) == {SID, SID6}
    for s in view.values():
        assert s["counters"] is False and not s["under_flood"]
        assert set(s["rates"].values()) == {0} and set(s["totals"].values()) == {0}


# ---- settings --------------------------------------------------------------------------------


def _settings_file(tmp_path: Path, extra: str) -> Path:
    f = tmp_path / "console.yaml"
    f.write_text("secret_key_file: key\naudit_log: audit.log\nusers:\n  - name: alice\n"
                 f"    role: admin\n    password_hash: '{make_users()['alice'].password_hash}'"
                 f"\n{extra}")
    return f


def test_settings_default_to_the_exporters_threshold(tmp_path: Path) -> None:
    st = settings_mod.load(str(_settings_file(tmp_path, "")))
    assert (st.flood_syn_rate, st.flood_valid_ack_ratio) == (series.FLOOD_SYN_RATE,
                                                             series.FLOOD_VALID_ACK_RATIO)


def test_settings_override_the_threshold_and_the_console_uses_it(tmp_path: Path) -> None:
    st = settings_mod.load(str(_settings_file(
        tmp_path, "flood_syn_rate: 150\nflood_valid_ack_ratio: 0.25\n")))
    assert (st.flood_syn_rate, st.flood_valid_ack_ratio) == (150.0, 0.25)
    app = create_app(st)
    flood = app.extensions["ipvs_console"].flood
    assert (flood.syn_rate, flood.valid_ack_ratio) == (150.0, 0.25)
    assert (flood.window, flood.clear_after) == (WINDOW, CLEAR)
    app.extensions["ipvs_audit"].close()


@pytest.mark.parametrize(("line", "message"), [
    ("flood_syn_rate: 0", "flood_syn_rate: SYNs per second, a number above 0"),
    ("flood_syn_rate: -5", "flood_syn_rate: SYNs per second"),
    ("flood_syn_rate: fast", "flood_syn_rate: SYNs per second"),
    ("flood_syn_rate: true", "flood_syn_rate: SYNs per second"),
    ("flood_syn_rate: .inf", "flood_syn_rate: SYNs per second"),
    ("flood_valid_ack_ratio: 0", "flood_valid_ack_ratio: the share of cookies"),
    ("flood_valid_ack_ratio: 1.5", "above 0 and at most 1"),
    ("flood_valid_ack_ratio: '0.5'", "flood_valid_ack_ratio: the share of cookies"),
])
def test_bad_threshold_settings_are_refused_naming_the_key(
        tmp_path: Path, line: str, message: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(message)):
        settings_mod.load(str(_settings_file(tmp_path, line + "\n")))


# ---- the API and the page --------------------------------------------------------------------


@pytest.fixture
def sp_app(app: Flask, sp_kernel: Kernel) -> Flask:
    return app


def test_the_api_needs_a_login(client: FlaskClient) -> None:
    r = client.get("/api/attack")
    assert r.status_code == 401 and "login required" in r.get_json()["error"]
    assert client.get("/api/attack", headers={"Authorization": "Bearer bot:wrong"}
                      ).status_code == 401


def test_the_api_serves_the_view_to_readers_and_tokens(
        sp_app: Flask, reader: FlaskClient, sp_kernel: Kernel, clock: Clock) -> None:
    for _ in range(3):
        clock.t += 1
        sp_kernel.bump_sp_stats(SVC6, **FLOOD)
        sp_kernel.bump_sp_stats(SVC, **LEGIT)
        r = reader.get("/api/attack")
    assert r.status_code == 200
    view = r.get_json()
    assert view["threshold"] == {"syn_rate": series.FLOOD_SYN_RATE,
                                 "valid_ack_ratio": series.FLOOD_VALID_ACK_RATIO,
                                 "window_s": WINDOW, "clear_s": CLEAR}
    flags = {s["id"]: s["under_flood"] for s in view["services"]}
    assert flags == {SID: False, SID6: True}
    token = sp_app.test_client().get("/api/attack", headers=BEARER)
    assert token.status_code == 200 and len(token.get_json()["services"]) == 2


def _badge(html: str, sid: str) -> str:
    m = re.search(rf'<span class="badge" data-service="{re.escape(sid)}" '
                  rf'data-vip="[^"]*" data-state="(\w+)">', html)
    assert m, f"no badge for {sid}"
    return m.group(1)


def test_the_page_shows_a_badge_per_vip_the_threshold_and_the_details(
        sp_app: Flask, reader: FlaskClient, sp_kernel: Kernel, clock: Clock) -> None:
    for _ in range(3):
        clock.t += 1
        sp_kernel.bump_sp_stats(SVC6, **FLOOD, synproxy_drop_csum=7)
        sp_kernel.bump_sp_stats(SVC, **LEGIT)
        reader.get("/api/attack")
    clock.t += 1
    html = reader.get("/synproxy").get_data(as_text=True)
    assert _badge(html, SID6) == "flood" and _badge(html, SID) == "calm"
    assert 'data-vip="2001:db8:1::10" data-state="flood"' in html
    assert "at least <strong>1000 SYNs/s</strong>" in html
    assert "<strong>50%</strong>" in html and "clears 10 s after" in html
    assert '<tr data-reason="checksum"><td>checksum</td><td class="num total">21</td>' in html
    # the per-counter charts are under "All extended counters"
    details = html.index('<details id="ext-details">')
    assert html.index('id="attack"') < details < html.index('id="ext-charts"')
    assert "All extended counters" in html


def test_the_page_says_so_when_no_service_has_the_syn_proxy(
        reader: FlaskClient, kernel: Kernel) -> None:
    kernel.edit_service(dataclasses.replace(SVC6, synproxy=False))
    kernel.services_[SVC6.key()] = dataclasses.replace(SVC6, synproxy=False, sp_stats=None)
    html = reader.get("/synproxy").get_data(as_text=True)
    assert 'class="badge"' not in html
    assert re.search(r'<p class="note" id="attack-none">No service', html)
