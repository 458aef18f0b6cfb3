"""The XDP fast path's counters (issue 22) per interface: as the kernel layer
collects them (never an error when there is nothing to read), as ``stats``
prints them (table and JSON) and as the exporter serves them, from fake
counters. The real program's counters reaching the same readers is
tests/vm/test_xdp_counters.py; the console's view is
tests/unit/webui/test_xdp_view.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ipvs_synproxy.cli import main as cli
from ipvs_synproxy.config.state import ServiceState, State
from ipvs_synproxy.exporter import collector, series
from ipvs_synproxy.kernel import stats, xdp
from ipvs_synproxy.kernel.model import make_dest, make_service
from tests.unit.fake_ipvs import FakeKernel
from tests.unit.test_exporter import key, reading, scrape

ETH0 = xdp.DeviceStats("eth0", "native", {"syn_answered": 1200, "syn_malformed": 3,
                                          "passed": 45, "not_ready": 0, "no_room": 1})
ETH2 = xdp.DeviceStats("eth2", None, dict.fromkeys(xdp.STATS, 0))  # pinned, not attached
DEVS = (ETH0, ETH2)


def _snap(t: float = 100.0, devs: tuple[xdp.DeviceStats, ...] = DEVS) -> stats.Snapshot:
    return stats.Snapshot(t, 1_700_000_000.0, (), {"fullnat_conn_new": 5}, devs)


# -- the kernel layer: every program of a namespace, or nothing


def test_nothing_pinned_is_an_empty_list(monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    monkeypatch.setattr(xdp, "PIN_ROOT", tmp_path / "no-bpffs")
    assert xdp.all_stats(None) == [] and xdp.all_stats("lb") == []


def test_pins_that_cannot_be_read_are_left_out(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    """A device directory without its maps (detached while listed), a pin
    directory the reader may not list: no entry, no error."""
    monkeypatch.setattr(xdp, "PIN_ROOT", tmp_path)
    (tmp_path / "init" / "eth0").mkdir(parents=True)
    assert xdp.all_stats(None) == []

    def denied(netns: str | None) -> list[str]:
        raise PermissionError(13, "Permission denied", "/sys/fs/bpf")

    monkeypatch.setattr(xdp, "attached_devices", denied)
    assert xdp.all_stats(None) == []


def test_each_device_has_its_counters_and_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    counters = dict(ETH0.stats)
    monkeypatch.setattr(xdp, "attached_devices", lambda netns: ["eth0", "gone"])
    monkeypatch.setattr(xdp, "read_stats", lambda dev, netns: counters)

    def link_state(dev: str, netns: str | None) -> tuple[str | None, int | None]:
        if dev == "gone":  # the interface was deleted; its pins were not
            raise xdp.XdpError("no device gone")
        return "generic", 7

    monkeypatch.setattr(xdp, "device_state", link_state)
    assert xdp.all_stats("lb") == [xdp.DeviceStats("eth0", "generic", counters),
                                   xdp.DeviceStats("gone", None, counters)]


# -- stats


def test_snapshot_reads_the_namespaces_programs() -> None:
    k = FakeKernel(netns="lb")
    asked: list[str | None] = []

    def read(netns: str | None) -> list[xdp.DeviceStats]:
        asked.append(netns)
        return [ETH0]

    assert stats.snapshot(k, read).xdp == (ETH0,)  # type: ignore[arg-type]
    assert asked == ["lb"]


def test_table_has_a_section_per_device_after_the_extended_counters() -> None:
    lines = list(stats.format_table(_snap()))
    (start,) = [i for i, ln in enumerate(lines)
                if ln.split() == ["XDP", "on", "eth0", "(native)", "Total"]]
    assert lines[start - 1] == "" and "fullnat_conn_new" in lines[start - 2]
    assert [ln.split() for ln in lines[start + 1:start + 6]] == [
        ["syn_answered", "1200"], ["syn_malformed", "3"], ["passed", "45"],
        ["not_ready", "0"], ["no_room", "1"]]
    assert lines[start + 7].split() == ["XDP", "on", "eth2", "(not", "attached)", "Total"]


def test_no_program_no_section() -> None:
    lines = list(stats.format_table(_snap(devs=())))
    assert not [ln for ln in lines if "XDP" in ln]
    assert lines[-1].split() == ["fullnat_conn_new", "5"]
    assert stats.to_json(_snap(devs=()))["xdp"] == []


def test_rates_per_device() -> None:
    later = xdp.DeviceStats("eth0", "native", {**ETH0.stats, "syn_answered": 1300,
                                               "passed": 55})
    new = xdp.DeviceStats("eth1", "generic", dict.fromkeys(xdp.STATS, 4))
    rates = stats.xdp_rates(_snap(100.0), _snap(102.0, (later, new)))
    assert rates is not None
    assert rates["eth0"] == {"syn_answered": 50.0, "syn_malformed": 0.0, "passed": 5.0,
                             "not_ready": 0.0, "no_room": 0.0}
    assert rates["eth1"]["passed"] == 2.0  # attached since: counted from 0
    assert stats.xdp_rates(_snap(100.0), _snap(100.0)) is None
    reattached = xdp.DeviceStats("eth0", "native", dict.fromkeys(xdp.STATS, 0))
    assert set(stats.xdp_rates(_snap(100.0), _snap(101.0, (reattached,)))["eth0"]
               .values()) == {0.0}  # type: ignore[index]
    lines = list(stats.format_xdp(later, rates["eth0"]))
    assert lines[0].split()[-3:] == ["Total", "Per", "second"]
    assert lines[1].split() == ["syn_answered", "1300", "50.0"]


def test_json_lists_devices_with_mode_counters_and_rates() -> None:
    got = stats.to_json(_snap(), xrates={"eth0": {"syn_answered": 1 / 3}})
    assert got["xdp"] == [
        {"device": "eth0", "mode": "native", "counters": ETH0.stats,
         "rates": {"syn_answered": 0.333}},
        {"device": "eth2", "mode": None, "counters": ETH2.stats, "rates": {}}]
    assert "rates" not in stats.to_json(_snap())["xdp"][0]
    json.dumps(got)


def test_cli_stats_prints_the_xdp_section(monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    svc = make_service(source="t", addr="198.51.100.10", port=80)
    k = FakeKernel.from_state(State((ServiceState(svc, (make_dest(source="t",
                                                                  addr="192.0.2.11"),)),)))
    monkeypatch.setattr("ipvs_synproxy.cli.config._connect", lambda netns: k)
    monkeypatch.setattr("ipvs_synproxy.cli.config.time.sleep", lambda s: None)
    monkeypatch.setattr(stats, "all_stats", lambda netns: list(DEVS))
    assert cli.main(["stats"]) == 0
    out = capsys.readouterr().out
    assert "XDP on eth0 (native)" in out and "XDP on eth2 (not attached)" in out
    assert cli.main(["stats", "--watch", "1", "--count", "2", "--json"]) == 0
    first, second = (json.loads(ln) for ln in capsys.readouterr().out.splitlines())
    assert first["xdp"][0]["counters"]["syn_answered"] == 1200
    assert "rates" not in first["xdp"][0] and "rates" in second["xdp"][0]
    monkeypatch.setattr(stats, "all_stats", lambda netns: [])
    assert cli.main(["stats", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["xdp"] == []


# -- the exporter


def test_each_device_is_served_by_result_and_mode() -> None:
    s = scrape(reading(xdp=DEVS))
    for result, value in ETH0.stats.items():
        assert s[key("ipvs_synproxy_xdp_packets_total", device="eth0", result=result)] == value
    assert s[key("ipvs_synproxy_xdp_packets_total", device="eth2", result="passed")] == 0
    assert s[key("ipvs_synproxy_xdp_attached", device="eth0", mode="native")] == 1
    assert s[key("ipvs_synproxy_xdp_attached", device="eth2", mode="none")] == 0


def test_no_program_no_xdp_samples() -> None:
    assert not [k for k in scrape(reading()) if "_xdp_" in k]


def test_the_results_are_the_programs_counters_and_documented() -> None:
    assert "result" in series.BY_NAME["ipvs_synproxy_xdp_packets_total"].labels
    doc = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
    for name in xdp.STATS:
        assert f"`{name}`" in doc, name


def test_read_takes_the_programs_counters() -> None:
    k = FakeKernel()
    r = collector.read(lambda: k, k, clock=lambda: 1.0, xdp=lambda: [ETH0])
    assert r.xdp == (ETH0,)
    assert collector.read(lambda: k, k).xdp == ()
