"""Counters: snapshots, extended-counter rates, table and JSON output."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ipvs_synproxy.build import paths
from ipvs_synproxy.cli import main as cli
from ipvs_synproxy.config.state import ServiceState, State
from ipvs_synproxy.kernel import stats
from ipvs_synproxy.kernel.model import Dest, Service, Stats, make_dest, make_service
from tests.unit.fake_ipvs import FakeKernel

VIP4 = "198.51.100.10"


def _snap(t: float = 100.0, ext: dict[str, int] | None = None) -> stats.Snapshot:
    svc = make_service(source="t", addr=VIP4, port=80, scheduler="wrr", synproxy=True)
    svc = Service(**{**svc.__dict__, "stats": Stats(conns=12345, inpkts=20, outpkts=18,
                                                     inbytes=1_234_567, outbytes=99,
                                                     cps=3, inbps=45678)})
    d = make_dest(source="t", addr="192.0.2.11", port=80, weight=2)
    d = Dest(**{**d.__dict__, "active_conns": 4, "inact_conns": 1,
                "stats": Stats(conns=12000, inpkts=19)})
    return stats.Snapshot(t, 1_700_000_000.0, (stats.ServiceStats(svc, (d,)),), ext)


@pytest.mark.parametrize(("n", "text"), [(0, "0"), (999, "999"), (9999, "9999"),
                                         (12345, "12.3K"), (12_345_678, "12.3M"),
                                         (45_000_000_000, "45.0G"), (2.5, "2.5")])
def test_human_numbers(n: float, text: str) -> None:
    assert stats.human(n) == text


def test_table_rows_for_services_and_real_servers() -> None:
    lines = list(stats.format_table(_snap(ext={"fullnat_conn_new": 5})))
    assert lines[0].split() == ["Service", "/", "real", "server", "Conns", "InPkts",
                                "OutPkts", "InBytes", "OutBytes", "CPS", "InPPS", "OutPPS",
                                "InBPS", "OutBPS", "ActConn", "InActConn"]
    assert lines[1].split() == ["TCP", f"{VIP4}:80", "wrr", "synproxy", "12.3K", "20", "18",
                                "1.2M", "99", "3", "0", "0", "45.7K", "0", "4", "1"]
    assert lines[2].split()[:5] == ["->", "192.0.2.11:80", "masq", "w2", "12.0K"]
    assert lines[4].split() == ["Extended", "counter", "Total"]
    assert lines[5].split() == ["fullnat_conn_new", "5"]
    exact = list(stats.format_table(_snap(), exact=True))
    assert exact[1].split()[4:8] == ["12345", "20", "18", "1234567"]


def test_stock_modules_have_no_extended_counters() -> None:
    lines = list(stats.format_table(_snap(ext=None)))
    assert lines[-1] == "extended counters: not available (stock IPVS modules)"
    assert stats.to_json(_snap(ext=None))["ext_stats"] is None
    empty = stats.Snapshot(0, 0, (), None)
    assert next(iter(stats.format_table(empty))) == "no services"


def test_ext_rates_are_per_second_increases() -> None:
    a = _snap(100.0, {"fullnat_conn_new": 10, "fullnat_no_laddr": 4})
    b = _snap(102.0, {"fullnat_conn_new": 30, "fullnat_no_laddr": 4, "new_one": 8})
    assert stats.ext_rates(a, b) == {"fullnat_conn_new": 10.0, "fullnat_no_laddr": 0.0,
                                     "new_one": 0.0}
    assert stats.ext_rates(a, _snap(102.0, None)) is None
    assert stats.ext_rates(b, b) is None
    lines = list(stats.format_ext(b.ext or {}, stats.ext_rates(a, b)))
    assert lines[0].split() == ["Extended", "counter", "Total", "Per", "second"]
    assert lines[1].split() == ["fullnat_conn_new", "30", "10.0"]


def test_json_shape() -> None:
    got = stats.to_json(_snap(ext={"fullnat_conn_new": 5}), {"fullnat_conn_new": 1.23456})
    assert got["time"] == 1_700_000_000.0
    (svc,) = got["services"]
    assert svc["service"] == f"{VIP4}:80/tcp" and svc["synproxy"] is True
    assert svc["stats"]["conns"] == 12345 and svc["stats"]["inbps"] == 45678
    (rs,) = svc["real_servers"]
    assert rs == {"addr": "192.0.2.11", "port": 80, "forward": "masq", "weight": 2,
                  "active_conns": 4, "inact_conns": 1, "persist_conns": 0,
                  "stats": {**Stats(conns=12000, inpkts=19).__dict__}}
    assert got["ext_stats"] == {"fullnat_conn_new": 5}
    assert got["ext_rates"] == {"fullnat_conn_new": 1.235}
    json.dumps(got)


def test_cli_stats_watch_prints_each_sample(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    svc = make_service(source="t", addr=VIP4, port=80)
    k = FakeKernel.from_state(State((ServiceState(svc, (make_dest(source="t",
                                                                  addr="192.0.2.11"),)),)))
    monkeypatch.setattr("ipvs_synproxy.cli.config._connect", lambda netns: k)
    monkeypatch.setattr("ipvs_synproxy.cli.config.time.sleep", lambda s: None)
    assert cli.main(["stats", "--watch", "1", "--count", "3", "--json"]) == 0
    samples = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert len(samples) == 3
    assert "ext_rates" not in samples[0] and "ext_rates" in samples[1]
    assert samples[2]["ext_stats"] == {"fullnat_conn_new": 7, "fullnat_no_laddr": 0}
    assert cli.main(["stats"]) == 0
    out = capsys.readouterr().out
    assert f"TCP {VIP4}:80 wlc" in out and "fullnat_conn_new" in out
    assert cli.main(["stats", "--watch", "0"]) == 2


def test_every_extended_counter_of_the_series_has_a_troubleshooting_row() -> None:
    names: set[str] = set()
    # in series order: a later patch may remove what an earlier one added
    for patch in sorted((paths.patches_dir() / "linux-6.1").glob("*.patch")):
        text = patch.read_text()
        names -= set(re.findall(r'^-\s*\[IP_VS_EXT_\w+\]\s*=\s*"(\w+)"', text, re.MULTILINE))
        names |= set(re.findall(r'^\+\s*\[IP_VS_EXT_\w+\]\s*=\s*"(\w+)"', text, re.MULTILINE))
    assert "fullnat_conn_new" in names
    guide = (Path(__file__).resolve().parents[2] / "docs" / "operator-guide.md").read_text()
    section = guide.split("## 6. Troubleshooting by counter", 1)[1]
    missing = [n for n in sorted(names) if f"| `{n}` |" not in section]
    assert missing == []
