"""net.ipv4.vs.* knobs: the documented table, validation, reading/writing, the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ipvs_synproxy.build import paths
from ipvs_synproxy.cli import main as cli
from ipvs_synproxy.kernel import sysctl

REPO = Path(__file__).resolve().parents[2]


def _procnames_added_by_patches() -> set[str]:
    names = set()
    for patch in sorted((paths.patches_dir() / "linux-6.1").glob("*.patch")):
        for line in patch.read_text().splitlines():
            m = re.match(r'^([+-])\s*\.procname\s*=\s*"([a-z0-9_]+)"', line)
            if m and m.group(1) == "+":
                names.add(m.group(2))
            elif m:     # a later patch of the series removed it
                names.discard(m.group(2))
    return names


def test_every_knob_the_patch_series_adds_is_documented() -> None:
    added = _procnames_added_by_patches()
    assert {"fullnat_lport_min", "fullnat_lport_max", "fullnat_lport_tries"} <= added
    assert added - set(sysctl.KNOBS) == set()


def test_every_knob_is_in_the_operator_guide_with_its_default() -> None:
    guide = (REPO / "docs" / "operator-guide.md").read_text()
    for name, knob in sysctl.KNOBS.items():
        row = next((ln for ln in guide.splitlines() if ln.startswith(f"| `{name}` ")), None)
        assert row is not None, f"{name} missing from the sysctl tables of the guide"
        default = knob.default.replace("\t", " ") or "computed"
        assert default in row, (name, row)


@pytest.mark.parametrize(("name", "value", "expected"), [
    ("conn_reuse_mode", 2, ("conn_reuse_mode", (2,))),
    ("net.ipv4.vs.conn_reuse_mode", "0", ("conn_reuse_mode", (0,))),
    ("net/ipv4/vs/sloppy_tcp", 1, ("sloppy_tcp", (1,))),
    ("sync_threshold", "3 50", ("sync_threshold", (3, 50))),
    ("sync_threshold", [0, 0], ("sync_threshold", (0, 0))),
    ("sync_ports", 4, ("sync_ports", (4,))),
    ("fullnat_lport_max", "65535", ("fullnat_lport_max", (65535,))),
    ("fullnat_lport_tries", 1, ("fullnat_lport_tries", (1,))),
    ("fullnat_lport_tries", "65536", ("fullnat_lport_tries", (65536,))),
    ("sync_qlen_max", 2**40, ("sync_qlen_max", (2**40,))),
])
def test_good_values(name: str, value: object, expected: tuple[str, sysctl.Value]) -> None:
    assert sysctl.validate(name, value) == expected


@pytest.mark.parametrize(("name", "value", "message"), [
    ("nosuch", 1, "unknown IPVS sysctl"),
    ("conn_reuse_mode", 4, "4 out of range 0-3"),
    ("sloppy_tcp", 2, "2 out of range 0-1"),
    ("sloppy_tcp", True, "not an integer: True"),
    ("drop_entry", "x", "not an integer: 'x'"),
    ("drop_entry", "", "empty value"),
    ("drop_entry", 1.0, "not an integer: 1.0"),
    ("sync_ports", 6, "6 is not a power of two"),
    ("sync_ports", 0, "0 out of range"),
    ("sync_threshold", "60 50", "threshold 60 must be below the period 50"),
    ("sync_threshold", "3", "takes 2 integers, got 1"),
    ("fullnat_lport_min", 0, "0 out of range 1-65535"),
    ("fullnat_lport_tries", 0, "0 out of range 1-65536"),
    ("fullnat_lport_tries", 65537, "65537 out of range 1-65536"),
    ("fullnat_toa", 2, "2 out of range 0-1"),
])
def test_bad_values(name: str, value: object, message: str) -> None:
    with pytest.raises(sysctl.SysctlError) as info:
        sysctl.validate(name, value)
    assert message in info.value.message
    assert str(info.value).startswith(f"net.ipv4.vs.{sysctl.short_name(name)}: ")


def test_assignments_accept_live_only_knobs_with_any_integer() -> None:
    assert sysctl.parse_assignments(["synproxy_future=7", "sloppy_tcp=1"],
                                    live={"synproxy_future", "sloppy_tcp"}) == [
        ("synproxy_future", (7,)), ("sloppy_tcp", (1,))]
    with pytest.raises(sysctl.SysctlError, match="expected NAME=VALUE"):
        sysctl.parse_assignments(["sloppy_tcp"])
    with pytest.raises(sysctl.SysctlError, match="unknown IPVS sysctl"):
        sysctl.parse_assignments(["synproxy_future=7"], live={"sloppy_tcp"})
    with pytest.raises(sysctl.SysctlError, match="not an integer"):
        sysctl.parse_assignments(["synproxy_future=x"], live={"synproxy_future"})


@pytest.fixture
def procdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "vs"
    d.mkdir()
    for name, value in (("conn_reuse_mode", "1"), ("sync_threshold", "3\t50"),
                        ("sloppy_tcp", "0"), ("synproxy_future", "5")):
        (d / name).write_text(value + "\n")
    monkeypatch.setattr(sysctl, "PROC_DIR", str(d))
    return d


def test_read_write_and_missing_knobs(procdir: Path) -> None:
    sc = sysctl.Sysctls()
    assert sc.names() == ["conn_reuse_mode", "sloppy_tcp", "sync_threshold", "synproxy_future"]
    assert sc.read("net.ipv4.vs.sync_threshold") == (3, 50)
    sc.write("sync_threshold", (4, 60))
    assert (procdir / "sync_threshold").read_text() == "4\t60\n"
    with pytest.raises(sysctl.SysctlMissing, match="load the ipvs-synproxy IPVS modules"):
        sc.read("fullnat_toa")
    with pytest.raises(sysctl.SysctlMissing, match="load ip_vs_lblc"):
        sc.read("lblc_expiration")
    with pytest.raises(sysctl.SysctlMissing, match="no such sysctl"):
        sc.write("nosuch", (1,))
    assert sysctl.Sysctls(root=str(procdir / "absent")).names() == []


def test_cli_get_all_one_and_json(procdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["sysctl", "get"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "net.ipv4.vs.conn_reuse_mode = 1", "net.ipv4.vs.sloppy_tcp = 0",
        "net.ipv4.vs.sync_threshold = 3 50", "net.ipv4.vs.synproxy_future = 5"]
    assert cli.main(["sysctl", "get", "sloppy_tcp", "synproxy_future", "--describe"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "net.ipv4.vs.sloppy_tcp = 0  # default 0: " + sysctl.KNOBS["sloppy_tcp"].meaning,
        "net.ipv4.vs.synproxy_future = 5  # undocumented"]
    assert cli.main(["sysctl", "get", "sync_threshold", "fullnat_toa", "--json"]) == 1
    got = json.loads(capsys.readouterr().out)
    assert got[0] == {"name": "net.ipv4.vs.sync_threshold", "value": "3 50", "present": True,
                      "default": "3 50", "meaning": sysctl.KNOBS["sync_threshold"].meaning,
                      "origin": "stock"}
    assert got[1]["present"] is False and got[1]["origin"] == "ipvs-synproxy (FULLNAT)"
    assert cli.main(["sysctl", "get", "nosuch"]) == 2
    assert "unknown IPVS sysctl: nosuch" in capsys.readouterr().err


def test_cli_set_validates_everything_before_writing(
        procdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["sysctl", "set", "sloppy_tcp=1", "conn_reuse_mode=7"]) == 2
    assert "net.ipv4.vs.conn_reuse_mode: 7 out of range 0-3" in capsys.readouterr().err
    assert (procdir / "sloppy_tcp").read_text() == "0\n"
    assert cli.main(["sysctl", "set", "sloppy_tcp=1", "net.ipv4.vs.sync_threshold=2 40",
                     "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [(k["name"], k["value"]) for k in got] == [("net.ipv4.vs.sloppy_tcp", "1"),
                                                     ("net.ipv4.vs.sync_threshold", "2 40")]
    assert (procdir / "sync_threshold").read_text() == "2\t40\n"


def test_cli_set_failure_restores_the_knobs_already_set(
        procdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # fullnat_toa is documented (so it validates) but absent here: the write fails
    assert cli.main(["sysctl", "set", "sloppy_tcp=1", "fullnat_toa=0"]) == 1
    err = capsys.readouterr().err
    assert "net.ipv4.vs.fullnat_toa: not present" in err and "restored 1 knob" in err
    assert (procdir / "sloppy_tcp").read_text() == "0\n"


@pytest.mark.parametrize(("text", "cpus", "canonical"), [
    ("0-1", (0, 1), "0-1"), ("0-3,6", (0, 1, 2, 3, 6), "0-3,6"), ("5", (5,), "5"),
    ("3,1,2", (1, 2, 3), "1-3"), (" 0-1\n", (0, 1), "0-1"),
])
def test_a_cpu_list_knob_reads_and_writes_the_kernels_syntax(
        text: str, cpus: tuple[int, ...], canonical: str) -> None:
    assert sysctl.parse_value("est_cpulist", text) == cpus
    assert sysctl.format_value(cpus, "est_cpulist") == canonical
    assert sysctl.display("net.ipv4.vs.est_cpulist", cpus) == canonical
    assert sysctl.validate("est_cpulist", text) == ("est_cpulist", cpus)


@pytest.mark.parametrize("bad", ["", "a", "1-", "3-1", "0-99999", "1,,2", "8192"])
def test_a_bad_cpu_list_is_refused(bad: str) -> None:
    with pytest.raises(sysctl.SysctlError):
        sysctl.validate("est_cpulist", bad)


def test_est_nice_is_a_nice_value() -> None:
    assert sysctl.validate("est_nice", "-5") == ("est_nice", (-5,))
    with pytest.raises(sysctl.SysctlError, match="out of range -20-19"):
        sysctl.validate("est_nice", "20")
