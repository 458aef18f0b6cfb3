"""Everyday mistakes must not empty a balancer: apply's deletion guard, its lock,
the state saved before each apply and ``restore``; keepalived render's refusals.
Over the fake kernel of test_config (the real kernel: tests/vm/test_apply.py)."""

from __future__ import annotations

import ipaddress
import json
import random
import threading
from pathlib import Path

import pytest

from ipvs_synproxy.cli import guard
from ipvs_synproxy.cli import main as cli
from ipvs_synproxy.config.state import ServiceState, State
from ipvs_synproxy.kernel import sysctl
from ipvs_synproxy.kernel.model import Dest, FwdMethod, Laddr, Service
from tests.unit.fake_ipvs import FakeKernel
from tests.unit.test_config import EXAMPLE, _canon

VIP = "198.51.100.10"


def _service(port: int, fullnat: bool = False) -> ServiceState:
    svc = Service(addr=ipaddress.ip_address(VIP), port=port, scheduler="rr", synproxy=fullnat)
    fwd = FwdMethod.FULLNAT if fullnat else FwdMethod.MASQ
    dests = (Dest(addr=ipaddress.ip_address("192.0.2.11"), port=port, fwd=fwd, weight=3),
             Dest(addr=ipaddress.ip_address("192.0.2.12"), port=port, fwd=fwd, weight=70000))
    laddrs = (Laddr(ipaddress.ip_address("192.0.2.100")),) if fullnat else ()
    return ServiceState(svc, dests, laddrs)


def _yaml(ports: list[int]) -> str:
    out = "services:\n"
    for p in ports:
        out += (f"  - vip: {VIP}:{p}\n    scheduler: rr\n    real_servers:\n"
                f"      - {{addr: 192.0.2.11, weight: 3}}\n"
                f"      - {{addr: 192.0.2.12, weight: 70000}}\n")
    return out


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> FakeKernel:
    live = State((*(_service(p) for p in (80, 81, 82, 83)), _service(443, True)),
                 {"conn_reuse_mode": (1,), "sync_threshold": (3, 50),
                  "fullnat_lport_min": (1024,)})
    k = FakeKernel.from_state(live)
    monkeypatch.setattr("ipvs_synproxy.cli.config._connect", lambda netns: k)
    monkeypatch.setattr(sysctl, "Sysctls", lambda netns=None: k)
    return k


def _run(*argv: str) -> int:
    return cli.main(list(argv))


@pytest.mark.parametrize("text", ["", "# nothing here\n", "services:\n", "services: []\n",
                                  "sysctl:\n  conn_reuse_mode: 0\n"])
def test_a_file_without_services_deletes_nothing(kernel: FakeKernel, tmp_path: Path,
                                                 text: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    before = kernel.state()
    f = tmp_path / "lb.yaml"
    f.write_text(text)
    assert _run("apply", str(f)) == 2
    err = capsys.readouterr().err
    assert "declares no service: applying it would delete all 5 live service(s)" in err
    assert "nothing was changed" in err and "Traceback" not in err
    assert kernel.state() == before and not guard.saved_states(guard.state_dir())


def test_a_truncated_file_that_drops_most_services_is_refused(
        kernel: FakeKernel, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = kernel.state()
    f = tmp_path / "lb.yaml"
    f.write_text(_yaml([80, 81]))       # 3 of 5 services gone: 60 %
    assert _run("apply", str(f)) == 2
    assert "would delete 3 of the 5 live services, more than 50%" in capsys.readouterr().err
    assert kernel.state() == before
    assert _run("apply", "--max-delete", "60", str(f)) == 0
    assert len(kernel.state().services) == 2


def test_prune_allows_it_and_one_deletion_is_always_allowed(
        kernel: FakeKernel, tmp_path: Path) -> None:
    f = tmp_path / "lb.yaml"
    f.write_text(_yaml([80, 81, 82, 83]))   # only the FULLNAT service goes
    assert _run("apply", str(f)) == 0
    assert len(kernel.state().services) == 4
    f.write_text("services: []\n")
    assert _run("apply", "--prune", str(f)) == 0
    assert kernel.state().services == ()


@pytest.mark.parametrize("bad", ["-1", "101", "x", ""])
def test_max_delete_takes_a_percentage(kernel: FakeKernel, tmp_path: Path, bad: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        _run("apply", "--max-delete", bad, str(tmp_path / "x.yaml"))
    assert info.value.code == 2
    assert "percentage" in capsys.readouterr().err


def test_each_apply_saves_the_live_table_and_restore_puts_it_back(
        kernel: FakeKernel, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    original = kernel.state()
    f = tmp_path / "lb.yaml"
    f.write_text(EXAMPLE)
    assert _run("apply", "--prune", str(f)) == 0
    out = capsys.readouterr().out
    saved = guard.saved_states(guard.state_dir())
    assert len(saved) == 1 and f"saved the live table to {saved[0].dump}" in out
    text = saved[0].dump.read_text()
    assert "-A -t 198.51.100.10:443 -s rr --synproxy" in text
    assert "--laddr-add 192.0.2.100 -t 198.51.100.10:443" in text
    assert json.loads(saved[0].state.read_text())["sysctls"] == {
        "conn_reuse_mode": [1], "sync_threshold": [3, 50], "fullnat_lport_min": [1024]}
    applied = kernel.state()
    assert applied != original
    assert _run("apply", str(f)) == 0          # nothing to change: nothing saved
    assert len(guard.saved_states(guard.state_dir())) == 1
    assert _run("restore") == 0
    assert _canon(State(kernel.state().services)) == _canon(State(original.services))
    assert kernel.knobs["conn_reuse_mode"] == (1,)
    assert kernel.knobs["sync_threshold"] == (3, 50)
    # restore saved what it replaced: restoring that undoes the restore
    names = [s.name for s in guard.saved_states(guard.state_dir())]
    assert len(names) == 2
    assert _run("restore", names[0]) == 0
    assert _canon(State(kernel.state().services)) == _canon(State(applied.services))


def test_restore_with_nothing_saved_or_a_bad_name_is_a_clear_error(
        kernel: FakeKernel, capsys: pytest.CaptureFixture[str]) -> None:
    before = kernel.state()
    assert _run("restore") == 2
    assert "no saved state" in capsys.readouterr().err
    assert _run("restore", "nonsense") == 2
    assert kernel.state() == before


def test_a_damaged_saved_state_changes_nothing(kernel: FakeKernel,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    before = kernel.state()
    d = guard.state_dir()
    saved = guard.save(d, before)
    good = json.loads(saved.state.read_text())
    damaged = [
        "", "{", "[]", json.dumps({**good, "format": 2}),
        json.dumps({**good, "services": [{"service": {"addr": "not an address"}}]}),
        json.dumps({**good, "services": [{"service": {"colour": "red"}}]}),
        json.dumps({**good, "services": [{"service": good["services"][0]["service"],
                                          "dests": [{"addr": "192.0.2.1", "fwd": 99}]}]}),
        json.dumps({**good, "sysctls": {"conn_reuse_mode": ["x"]}}),
        json.dumps({**good, "services": "none"}),
    ]
    for text in damaged:
        saved.state.write_text(text)
        assert _run("restore") == 1, text
        err = capsys.readouterr().err
        assert str(saved.state) in err and "Traceback" not in err, (text, err)
        assert kernel.state() == before


def test_saved_dumps_read_back_exactly(tmp_path: Path) -> None:
    seed = random.randrange(2**32)
    print(f"seed {seed}")
    rng = random.Random(seed)
    for _ in range(20):
        ports = rng.sample(range(1, 65536), rng.randint(0, 6))
        live = State(tuple(_service(p, rng.random() < 0.5) for p in ports),
                     {"conn_reuse_mode": (rng.randint(0, 1),)})
        saved = guard.save(tmp_path, live)
        back = guard.read_saved(saved)
        assert _canon(back) == _canon(live), f"seed {seed}"
    assert len(guard.saved_states(tmp_path)) == guard.KEEP


def test_a_second_apply_is_refused_while_one_runs(kernel: FakeKernel, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    before = kernel.state()
    f = tmp_path / "lb.yaml"
    f.write_text(EXAMPLE)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with guard.exclusive(guard.state_dir(), "apply other.yaml"):
            held.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert held.wait(10)
        assert _run("apply", "--prune", str(f)) == 1
        err = capsys.readouterr().err
        assert "another apply or restore is running" in err and "apply other.yaml" in err
        assert kernel.state() == before
    finally:
        release.set()
        t.join()
    assert _run("apply", "--prune", str(f)) == 0


def test_render_refuses_a_file_without_services(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    f, out = tmp_path / "lb.yaml", tmp_path / "keepalived.conf"
    f.write_text("")
    assert _run("keepalived", "render", str(f), "-o", str(out)) == 2
    assert "declares no service" in capsys.readouterr().err and not out.exists()
    assert _run("keepalived", "render", str(f), "-o", str(out), "--allow-empty") == 0
    assert out.exists()


def test_render_into_a_missing_directory_is_a_clear_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "lb.yaml"
    f.write_text(_yaml([80]))
    assert _run("keepalived", "render", str(f), "-o", str(tmp_path / "no/dir/k.conf")) == 1
    err = capsys.readouterr().err
    assert "No such file or directory" in err and "nothing was written" in err
    assert "Traceback" not in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        _run("--version")
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("ipvs-synproxy ") and "Linux 6.1" in out and "Linux 6.12" in out


JUNK: list[object] = [None, True, -1, 2**40, 1.5, "", "x", "tcp", "198.51.100.1", [], {}, [1],
                      {"a": 1}]


def _mutate(rng: random.Random, node: object) -> object:
    """``node`` with one value somewhere replaced by junk (or a key dropped)."""
    if isinstance(node, dict) and node and rng.random() < 0.8:
        key = rng.choice(sorted(node))
        copy = dict(node)
        if rng.random() < 0.15:
            del copy[key]
        else:
            copy[key] = _mutate(rng, node[key])
        return copy
    if isinstance(node, list) and node and rng.random() < 0.8:
        i = rng.randrange(len(node))
        return [*node[:i], _mutate(rng, node[i]), *node[i + 1:]]
    return rng.choice(JUNK)


def test_random_damage_to_a_saved_state_is_a_clear_error_or_a_valid_state() -> None:
    seed = random.randrange(2**32)
    print(f"seed {seed}")
    rng = random.Random(seed)
    live = State(tuple(_service(p, p % 2 == 0) for p in (80, 81, 443)),
                 {"conn_reuse_mode": (1,), "sync_threshold": (3, 50)})
    good = guard.encode_state(live)
    for _ in range(3000):
        raw = _mutate(rng, good)
        try:
            back = guard.decode_state(raw, "x.json")
        except guard.GuardError:
            continue
        assert guard.encode_state(back) is not None, f"seed {seed}"


BAD = """\
sysctl:
  conn_reuse_mode: 7
services:
  - vip: 198.51.100.10:80
    synproxy: true
    forward: dr
    real_servers:
      - {addr: 192.0.2.11, weight: heavy}
  - vip: 198.51.100.10:81
    forward: fullnat
    real_servers:
      - {addr: 192.0.2.11}
  - vip: 198.51.100.10:82
    wieght: 3
  - vip: 198.51.100.10:83
"""


def test_check_reports_every_error_with_its_line(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "lb.yaml"
    f.write_text(BAD)
    assert _run("check", str(f)) == 2
    out = capsys.readouterr()
    assert [ln.split(": ")[0:2] for ln in out.out.splitlines()] == [
        [f"{f}:2", "sysctl.conn_reuse_mode"], [f"{f}:8", "services[0].real_servers[0].weight"],
        [f"{f}:10", "services[1].laddrs"], [f"{f}:14", "services[2].wieght"]]
    assert out.err.strip() == f"{f}: 4 error(s)"
    assert _run("check", str(f), "--json") == 2
    got = json.loads(capsys.readouterr().out)
    assert not got["valid"] and len(got["errors"]) == 4
    assert got["errors"][2]["key"] == "services[1].laddrs"
    f.write_text(EXAMPLE)
    assert _run("check", str(f)) == 0
    assert _run("check", str(tmp_path / "missing.yaml")) == 2
    assert "No such file or directory" in capsys.readouterr().out


def test_check_agrees_with_what_apply_loads_on_random_damage(tmp_path: Path) -> None:
    """Lines dropped, duplicated or given a junk value: check finds errors
    exactly when loading fails, and the error loading stops at is among them."""
    from ipvs_synproxy.config import load as config_load
    from ipvs_synproxy.config.reader import ConfigError

    seed = random.randrange(2**32)
    print(f"seed {seed}")
    rng = random.Random(seed)
    lines = EXAMPLE.splitlines()
    junk = ["", "x", "-1", "99999999999", "[]", "{}", "true", "2001:db8::1", "'a: b'", "null"]
    for _ in range(400):
        damaged = list(lines)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(damaged))
            what = rng.random()
            if what < 0.3:
                del damaged[i]
            elif what < 0.5:
                damaged.insert(i, damaged[i])
            elif ":" in damaged[i]:
                key = damaged[i].split(":", 1)[0]
                damaged[i] = f"{key}: {rng.choice(junk)}"
        text = "\n".join(damaged) + "\n"
        errors = config_load.check(text, "lb.yaml")
        try:
            config_load.loads(text, "lb.yaml")
        except ConfigError as exc:
            assert any(str(e) == str(exc) for e in errors), (seed, text, exc, errors)
        else:
            assert errors == [], (seed, text, errors)


def test_diff_exit_code_tells_drift_from_errors(kernel: FakeKernel, tmp_path: Path) -> None:
    f = tmp_path / "lb.yaml"
    f.write_text(_yaml([80, 81, 82, 83]))
    assert _run("diff", "--exit-code", str(f)) == 1          # differs: 443 is extra
    assert _run("apply", str(f)) == 0
    assert _run("diff", "--exit-code", str(f)) == 0          # in sync
    assert _run("diff", str(f)) == 0
    f.write_text("services: [")
    assert _run("diff", "--exit-code", str(f)) == 2          # invalid file
    f.write_text(EXAMPLE.replace("conn_reuse_mode: 0", "conn_reuse_mode: 0\n  sloppy_tcp: 1"))
    assert _run("diff", "--exit-code", str(f)) == 2          # a knob this kernel lacks


def _yaml_blocks(markdown: str) -> list[str]:
    """The ```yaml blocks of a document that hold a whole config file."""
    parts = markdown.split("```yaml\n")[1:]
    return [p.split("```", 1)[0] for p in parts if "services:" in p or "keepalived:" in p]


def test_the_published_schema_is_current_and_accepts_every_example() -> None:
    import jsonschema
    import yaml

    from ipvs_synproxy.config import schema as config_schema

    root = Path(__file__).resolve().parents[2]
    generated = config_schema.schema()
    assert json.loads((root / "docs/ipvs-synproxy.schema.json").read_text()) == generated, \
        "regenerate: ipvs-synproxy check --schema > docs/ipvs-synproxy.schema.json"
    validator = jsonschema.Draft202012Validator(generated)
    examples = [EXAMPLE, (root / "tests/unit/data/keepalived/example.yaml").read_text(),
                *_yaml_blocks((root / "docs/operator-guide.md").read_text())]
    assert len(examples) >= 4
    for text in examples:
        errors = [f"{list(e.path)}: {e.message}" for e in
                  validator.iter_errors(yaml.safe_load(text))]
        assert not errors, (errors, text[:200])
    for bad in ("services:\n  - vip: 198.51.100.10:80\n    wieght: 3\n",
                "services:\n  - vip: 198.51.100.10:80\n    fwmark: 3\n",
                "services:\n  - vip: 198.51.100.10:80\n    real_servers:\n"
                "      - {addr: 192.0.2.11, weight: 2147483648}\n",
                "sysctl: 3\n", "colour: red\n"):
        assert list(validator.iter_errors(yaml.safe_load(bad))), bad


def test_check_schema_prints_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run("check", "--schema") == 0
    assert json.loads(capsys.readouterr().out)["title"].startswith("ipvs-synproxy config")


def test_every_applied_change_goes_to_syslog(kernel: FakeKernel, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    logged: list[tuple[int, str]] = []
    monkeypatch.setattr(guard.syslog, "syslog", lambda prio, msg: logged.append((prio, msg)))
    f = tmp_path / "lb.yaml"
    f.write_text(_yaml([80, 81, 82, 83, 84]))   # adds :84, deletes :443
    assert _run("apply", str(f)) == 0
    assert logged, "nothing logged"
    assert all(m.startswith(f"apply {f}: ") for _, m in logged), logged
    assert any("198.51.100.10:84" in m for _, m in logged), logged
    assert any("198.51.100.10:443" in m for _, m in logged), logged   # its deletion
    logged.clear()
    assert _run("apply", str(f)) == 0                   # no change, no line
    assert logged == []


@pytest.mark.parametrize(("forward", "laddrs", "why"), [
    ("dr", "", "a SYN-proxy service needs NAT (-m) or FULLNAT"),
    ("fullnat", "", "needs the service's local addresses: add 'laddrs'"),
])
def test_render_refuses_what_the_kernel_would_refuse(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], forward: str, laddrs: str,
        why: str) -> None:
    f, out = tmp_path / "lb.yaml", tmp_path / "keepalived.conf"
    f.write_text(f"services:\n  - vip: {VIP}:80\n    synproxy: true\n"
                 f"    forward: {forward}\n{laddrs}"
                 "    real_servers:\n      - {addr: 192.0.2.11}\n")
    assert _run("keepalived", "render", str(f), "-o", str(out)) == 2
    err = capsys.readouterr().err
    assert why in err and "nothing was rendered" in err and not out.exists()
    f.write_text(f.read_text().replace("    real_servers:", "    laddrs: [192.0.2.100]\n"
                                       "    real_servers:"))
    assert (_run("keepalived", "render", str(f), "-o", str(out)) == 0) == (forward == "fullnat")
