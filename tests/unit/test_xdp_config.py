"""The config file's ``xdp:`` interfaces (issue 22): validation with file:line,
the plan (what ``diff`` shows, what ``apply`` attaches, re-attaches and
detaches), the cookie secret the programs get, and the keepalived render's
notify scripts. Over the fake kernel of test_config and a fake of the
namespace's XDP programs (the real ones: tests/vm/test_xdp_config.py)."""

from __future__ import annotations

import json
import os
import random
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ipvs_synproxy.build import keepalived as keepalived_build
from ipvs_synproxy.build import xdp as xdp_build
from ipvs_synproxy.cli import main as cli
from ipvs_synproxy.config import keepalived, xdp_settings
from ipvs_synproxy.config import load as config_load
from ipvs_synproxy.config import plan as config_plan
from ipvs_synproxy.config import reader as config_reader
from ipvs_synproxy.config.state import XdpAttachment
from ipvs_synproxy.kernel import sysctl, xdp
from ipvs_synproxy.kernel.model import Service
from tests.unit.fake_ipvs import FakeKernel

VIP = "198.51.100.10"
SVC = f"""\
services:
  - vip: {VIP}:80
    synproxy: true
    real_servers:
      - {{addr: 192.0.2.11}}
"""


def load(text: str) -> config_load.Config:
    return config_load.loads(text, "lb.yaml")


def _line_of(text: str, marker: str) -> int:
    return next(i for i, ln in enumerate(text.splitlines(), 1) if marker in ln)


# ---- the xdp: key ---------------------------------------------------------------------


def test_entries_with_their_modes_in_file_order() -> None:
    cfg = load(SVC + "xdp:\n  - {interface: eth0, mode: native}\n  - eth1\n"
                     "  - interface: bond0.100\n    mode: GENERIC\n")
    assert cfg.xdp == (XdpAttachment("eth0", "native"), XdpAttachment("eth1", "auto"),
                       XdpAttachment("bond0.100", "generic"))


@pytest.mark.parametrize("text", ["", "xdp:\n", "xdp: []\n", "xdp: null\n"])
def test_no_entries_is_no_xdp(text: str) -> None:
    assert load(SVC + text).xdp == ()


XDP_BAD = [
    ("xdp: eth0\n", "xdp:", "xdp", "expected a list, got the string 'eth0'"),
    ("xdp: {interface: eth0}\n", "xdp:", "xdp", "expected a list, got a mapping"),
    ("xdp:\n  - {interface: eth0, mod: native}\n", "mod:", "xdp[0].mod",
     "unknown key 'mod' (expected one of: interface, mode)"),
    ("xdp:\n  - {interface: eth0, mode: turbo}\n", "turbo", "xdp[0].mode",
     "unknown XDP mode 'turbo' (auto, native, generic)"),
    ("xdp:\n  - {interface: eth0, mode: 1}\n", "mode", "xdp[0].mode", "unknown XDP mode 1"),
    ("xdp:\n  - {mode: native}\n", "mode", "xdp[0]", "an XDP entry needs 'interface'"),
    ("xdp:\n  - eth0\n  - {interface: eth1}\n  - {interface: eth0, mode: generic}\n",
     "generic", "xdp[2]", "duplicate XDP interface eth0 (first on line 7)"),
    ("xdp:\n  - {interface: eth 0}\n", "eth 0", "xdp[0].interface",
     "not an interface name: 'eth 0' (1-15 letters"),
    ("xdp:\n  - a/b\n", "a/b", "xdp[0]", "not an interface name: 'a/b'"),
    ("xdp:\n  - ..\n", "..", "xdp[0]", "not an interface name: '..'"),
    ("xdp:\n  - abcdefghijklmnop\n", "abcdef", "xdp[0]", "not an interface name"),
    ("xdp:\n  - eth0:1\n", "eth0", "xdp[0]", "not an interface name: 'eth0:1'"),
    ("xdp:\n  - {interface: 7}\n", "interface", "xdp[0].interface",
     "expected an interface name, got the integer 7"),
    ("xdp:\n  - 7\n", "7", "xdp[0]", "expected an interface name or a mapping {interface: "
                                      "NAME, mode: MODE}, got the integer 7"),
    ("xdp:\n  - [eth0]\n", "eth0", "xdp[0]", "got a list"),
]


@pytest.mark.parametrize(("text", "marker", "path", "message"), XDP_BAD,
                         ids=[f"xdp{i}" for i in range(len(XDP_BAD))])
def test_a_bad_entry_names_file_line_and_key(text: str, marker: str, path: str,
                                             message: str) -> None:
    full = SVC + text
    with pytest.raises(config_reader.ConfigError) as info:
        load(full)
    err = info.value
    assert err.source == f"lb.yaml:{_line_of(full, marker)}", str(err)
    assert err.field == path, str(err)
    assert message in err.message, str(err)
    assert [str(e) for e in config_load.check(full, "lb.yaml")] == [str(err)]


def _cli_env(monkeypatch: pytest.MonkeyPatch, k: FakeKernel) -> None:
    monkeypatch.setattr("ipvs_synproxy.cli.config._connect", lambda netns: k)
    monkeypatch.setattr(sysctl, "Sysctls", lambda netns=None: k)


def _junk_entry(rng: random.Random) -> str:
    alphabet = "eth0b.-_@/: '\"{}[],#!~"
    word = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 18)))
    mode = rng.choice(["auto", "native", "generic", "Native", "xdp", "", "~", "1", "[native]",
                       word])
    key = rng.choice(["interface", "interface", "mode", "iface", "Interface", word])
    return rng.choice([
        f"  - {word}\n",
        f"  - {{interface: {word}}}\n",
        f"  - {{interface: eth{rng.randint(0, 3)}, mode: {mode}}}\n",
        f"  - {{{key}: eth{rng.randint(0, 3)}}}\n",
        f"  - interface: eth{rng.randint(0, 3)}\n    mode: {mode}\n",
        f"  - {rng.randint(-5, 5)}\n",
    ])


XDP_LINE = SVC.count("\n") + 1   # the line of "xdp:" after SVC


def test_random_malformed_entries_are_errors_that_change_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Junk names, modes and keys: loading fails with an error at an ``xdp``
    key (and ``check`` reports it too) and ``apply`` exits 2 with nothing
    touched, or every entry it accepts is a valid name in a known mode."""
    seed = int(os.environ.get("TEST_SEED", random.randrange(2**32)))
    print(f"seed {seed} (replay: TEST_SEED={seed})")
    rng = random.Random(seed)
    k = FakeKernel.from_state(load(SVC).state, has_secret=True)
    _cli_env(monkeypatch, k)
    fake = FakeXdp(devices={"eth0", "eth1", "eth2", "eth3"})
    fake.install(monkeypatch)
    f = tmp_path / "lb.yaml"
    for _ in range(60):
        text = SVC + "xdp:\n" + "".join(_junk_entry(rng) for _ in range(rng.randint(1, 3)))
        try:
            cfg = load(text)
        except config_reader.ConfigError as exc:
            # an xdp key, or the YAML reader's own error (an unhashable or
            # duplicate key), on a line of the xdp list
            line = int(exc.source.rsplit(":", 1)[1])
            assert exc.field.startswith("xdp") or exc.field == "yaml" or line > XDP_LINE, \
                (seed, text, exc)
            assert str(exc) in [str(e) for e in config_load.check(text, "lb.yaml")], \
                (seed, text)
            f.write_text(text)
            assert cli.main(["apply", str(f)]) == 2, (seed, text)
            assert "nothing was applied" in capsys.readouterr().err
            assert k.calls == [] and fake.calls == [], (seed, text)
            continue
        assert config_load.check(text, "lb.yaml") == [], (seed, text)
        devs = [a.dev for a in cfg.xdp]
        assert len(set(devs)) == len(devs), (seed, text)
        for a in cfg.xdp:
            assert a.mode in xdp.MODES, (seed, text)
            assert xdp_settings.IFNAME.fullmatch(a.dev) and a.dev not in (".", ".."), \
                (seed, text)


# ---- the plan -------------------------------------------------------------------------


def _ops(changes: list[config_plan.Change]) -> list[str]:
    return [config_plan.describe(c) for c in changes]


def test_diff_attaches_re_attaches_keeps_and_detaches_ours() -> None:
    want = (XdpAttachment("eth0", "native"), XdpAttachment("eth1"),
            XdpAttachment("eth2", "generic"), XdpAttachment("eth3"), XdpAttachment("eth4"))
    have = {"eth0": "generic", "eth1": "generic", "eth2": "generic", "eth4": "detached",
            "eth9": "native", "eth5": "detached"}
    assert _ops(config_plan.diff_xdp(have, want)) == [
        "~ xdp eth0: mode generic -> native",
        "+ xdp eth3 (auto)",
        "+ xdp eth4 (auto)",       # pinned but not on the device: attached again
        "- xdp eth5",              # stale pins of ours go
        "- xdp eth9",
    ]
    assert config_plan.diff_xdp({"eth0": "native"}, (XdpAttachment("eth0"),)) == []
    assert config_plan.diff_xdp({}, ()) == []


def test_undoing_xdp_changes_inverts_them() -> None:
    changes = config_plan.diff_xdp({"eth0": "generic", "eth9": "native"},
                                   (XdpAttachment("eth0", "native"), XdpAttachment("eth1")))
    assert _ops(config_plan.rollback_plan(changes)) == [
        "+ xdp eth9 (native)", "- xdp eth1", "~ xdp eth0: mode native -> generic"]
    assert [config_plan.change_dict(c)["kind"] for c in changes] == ["xdp"] * 3
    assert config_plan.change_dict(changes[0])["new"] == {"interface": "eth0",
                                                          "mode": "native"}


@dataclass
class FakeXdp:
    """The namespace's devices and our programs on them, behind the
    functions kernel.xdp uses to attach: load, link, write_config (every
    program pinned gets its secret there), detach."""

    devices: set[str]
    ours: dict[str, str] = field(default_factory=dict)       # dev -> mode or "detached"
    foreign: dict[str, int] = field(default_factory=dict)    # dev -> prog id
    secrets: dict[str, bytes] = field(default_factory=dict)  # what each program signs with
    calls: list[str] = field(default_factory=list)
    fail_link: str | None = None

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in ("attached_devices", "device_state", "load", "link", "write_config",
                     "write_services", "detach"):
            monkeypatch.setattr(xdp, name, getattr(self, name))
        monkeypatch.setattr(xdp_build, "build", lambda: Path("/nonexistent/xdp.o"))

    def attached_devices(self, netns: str | None) -> list[str]:
        return sorted(self.ours)

    def device_state(self, dev: str, netns: str | None) -> tuple[str | None, int | None]:
        if dev not in self.devices:
            raise xdp.XdpError(f"no device {dev}")
        if dev in self.foreign:
            return "native", self.foreign[dev]
        mode = self.ours.get(dev, "detached")
        return (None, None) if mode == "detached" else (mode, 1)

    def load(self, obj: Path, dev: str, netns: str | None) -> None:
        self.calls.append(f"load {dev}")
        self.ours[dev] = "detached"

    def write_config(self, dev: str, netns: str | None, secret: bytes,
                     sysctls: object = None) -> None:
        self.secrets[dev] = secret

    def write_services(self, dev: str, netns: str | None, services: Iterable[Service]) -> int:
        return 0

    def link(self, dev: str, netns: str | None, services: Iterable[Service],
             mode: str = "auto") -> xdp.Status:
        self.calls.append(f"link {dev} {mode}")
        if dev == self.fail_link:
            del self.ours[dev]
            raise xdp.XdpError(f"cannot attach XDP to {dev} ({mode}): refused")
        self.ours[dev] = "generic" if mode == "generic" else "native"
        return xdp.Status(dev, netns, self.ours[dev], True, 1, 0, True, {})

    def detach(self, dev: str, netns: str | None, *, missing_ok: bool = False) -> None:
        self.calls.append(f"detach {dev}")
        self.ours.pop(dev, None)
        self.secrets.pop(dev, None)


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> tuple[FakeKernel, FakeXdp]:
    k = FakeKernel.from_state(load(SVC).state, has_secret=True)
    _cli_env(monkeypatch, k)
    fake = FakeXdp(devices={"eth0", "eth1", "eth2"})
    fake.install(monkeypatch)
    return k, fake


def _write(tmp_path: Path, text: str) -> str:
    f = tmp_path / "lb.yaml"
    f.write_text(text)
    return str(f)


def test_diff_shows_the_attach_and_the_new_secret_and_changes_nothing(
        world: tuple[FakeKernel, FakeXdp], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    k, fake = world
    f = _write(tmp_path, SVC + "xdp: [{interface: eth0, mode: native}]\n")
    assert cli.main(["diff", f]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "+ xdp eth0 (native)"
    assert "a new random cookie secret is set in the IPVS module and the XDP programs" in out[2]
    assert cli.main(["diff", f, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["changes"][0]["kind"] == "xdp" and got["new_random_secret"] is True
    assert cli.main(["diff", f, "--exit-code"]) == 1
    assert k.calls == [] and fake.calls == []


def test_apply_attaches_with_one_random_secret_in_module_and_programs(
        world: tuple[FakeKernel, FakeXdp], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    k, fake = world
    f = _write(tmp_path, SVC + "xdp:\n  - {interface: eth0, mode: native}\n  - eth1\n")
    assert cli.main(["apply", f]) == 0
    assert "cookie secret: a new random one" in capsys.readouterr().out
    assert fake.ours == {"eth0": "native", "eth1": "native"}
    assert fake.calls == ["load eth0", "link eth0 native", "load eth1", "link eth1 auto"]
    # the module's secret is set once (a second set would drop its previous
    # key), and both programs sign with it
    assert k.calls.count("set_synproxy_secret") == 1
    assert k.secret is not None and fake.secrets == {"eth0": k.secret, "eth1": k.secret}
    # unchanged: kept as it is, and no secret is set
    k.calls.clear()
    fake.calls.clear()
    assert cli.main(["apply", f]) == 0
    assert capsys.readouterr().out.strip() == "no changes"
    assert k.calls == [] and fake.calls == []


def test_apply_re_attaches_on_a_mode_change_and_detaches_what_is_gone(
        world: tuple[FakeKernel, FakeXdp], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    k, fake = world
    fake.ours = {"eth0": "native", "eth1": "native"}
    f = _write(tmp_path, SVC + "xdp: [{interface: eth0, mode: generic}]\n")
    assert cli.main(["apply", f]) == 0
    assert capsys.readouterr().out.splitlines()[1:3] == [
        "~ xdp eth0: mode native -> generic", "- xdp eth1"]
    assert fake.calls == ["detach eth0", "load eth0", "link eth0 generic", "detach eth1"]
    assert fake.ours == {"eth0": "generic"}
    # no xdp key: every program of ours goes, nobody else's is touched
    fake.calls.clear()
    f = _write(tmp_path, SVC)
    assert cli.main(["apply", f]) == 0
    assert fake.calls == ["detach eth0"] and fake.ours == {}
    assert k.calls.count("set_synproxy_secret") == 1


def test_the_files_secret_goes_to_module_and_programs_once(
        world: tuple[FakeKernel, FakeXdp], tmp_path: Path) -> None:
    k, fake = world
    key = tmp_path / "cookie.key"
    key.write_bytes(b"\x05" * 16)
    key.chmod(0o600)
    fake.ours = {"eth1": "native"}
    text = (f"cookie_secret_file: {key}\n" + SVC
            + "xdp: [{interface: eth0}, {interface: eth1}]\n")
    cfg = config_load.loads(text, "lb.yaml", require_root_owner=False)
    p = config_plan.plan(cfg, k, k)  # type: ignore[arg-type]
    assert not p.new_secret and _ops(p.changes) == ["+ xdp eth0 (auto)"]
    config_plan.apply_plan(p, k, k, xdp_build.build)  # type: ignore[arg-type]
    assert k.calls.count("set_synproxy_secret") == 1 and k.secret == b"\x05" * 16
    assert fake.secrets == {"eth0": b"\x05" * 16, "eth1": b"\x05" * 16}
    # nothing to attach: the secret is set last, as before
    k.calls.clear()
    p = config_plan.plan(cfg, k, k)  # type: ignore[arg-type]
    config_plan.apply_plan(p, k, k, xdp_build.build)  # type: ignore[arg-type]
    assert k.calls == ["set_synproxy_secret"]


def test_problems_stop_the_apply_before_any_change(
        world: tuple[FakeKernel, FakeXdp], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    k, fake = world
    fake.foreign = {"eth1": 42}
    k.has_secret = False
    f = _write(tmp_path, SVC.replace(":80", ":81") + "xdp: [eth0, eth1, eth7]\n")
    assert cli.main(["apply", f]) == 1
    err = capsys.readouterr().err
    assert "xdp: eth1 runs an XDP program that is not ours (id 42): take it off first" in err
    assert "xdp: no device eth7" in err
    assert "cannot set the SYN proxy secret, which the XDP program must share" in err
    assert "nothing was applied" in err
    assert k.calls == [] and fake.calls == []


def test_a_failed_attach_rolls_the_table_back(
        world: tuple[FakeKernel, FakeXdp], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    k, fake = world
    fake.fail_link = "eth1"
    before = k.state()
    f = _write(tmp_path, SVC.replace(":80", ":81") + "xdp: [eth0, eth1]\n")
    assert cli.main(["apply", f]) == 1
    err = capsys.readouterr().err
    assert "failed: + xdp eth1 (auto): cannot attach XDP to eth1 (auto): refused" in err
    assert "the previous state is restored" in err
    assert k.state() == before and fake.ours == {}


def test_a_build_failure_changes_nothing(world: tuple[FakeKernel, FakeXdp], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    k, fake = world

    def no_clang() -> Path:
        raise xdp_build.XdpBuildError("clang is missing (Debian package clang)")

    monkeypatch.setattr(xdp_build, "build", no_clang)
    f = _write(tmp_path, SVC.replace(":80", ":81") + "xdp: [eth0]\n")
    assert cli.main(["apply", f]) == 1
    err = capsys.readouterr().err
    assert "failed: + xdp eth0 (auto): clang is missing" in err
    assert "nothing had been changed" in err
    assert k.calls == [] and fake.calls == []


def test_the_schema_knows_the_xdp_list_and_the_guides_examples_pass_it() -> None:
    import jsonschema
    import yaml

    from ipvs_synproxy.config import schema

    generated = schema.schema()
    top = generated["properties"]
    assert top["xdp"]["items"]["oneOf"][1]["required"] == ["interface"]
    assert "xdp_command" in top["keepalived"]["properties"]
    validator = jsonschema.Draft202012Validator(generated)
    text = (Path(__file__).resolve().parents[2] / "docs" / "xdp.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```yaml\n")[1:]]
    assert blocks
    for block in blocks:
        assert load(SVC + block).xdp
        assert not list(validator.iter_errors(yaml.safe_load(block)))
    for bad in ("xdp: [{interface: eth0, mode: turbo}]\n", "xdp: [{iface: eth0}]\n",
                "xdp: ['eth 0']\n", "xdp: eth0\n"):
        assert list(validator.iter_errors(yaml.safe_load(bad))), bad


# ---- keepalived: notify scripts of the VRRP instance on the interface -----------------

KA = SVC + """\
keepalived:
  vrrp:
    - {name: VI_CLIENT, interface: eth0, virtual_router_id: 51, vips: [198.51.100.10/32]}
    - {name: VI_SERVER, interface: eth1, virtual_router_id: 52, vips: [192.0.2.1/24]}
xdp: [{interface: eth0, mode: native}]
"""


def _render(text: str, tmp_path: Path) -> str:
    f = tmp_path / "ipvs.yaml"
    f.write_text(text)
    return keepalived.render(config_load.load(str(f), require_root_owner=False))


def test_render_attaches_on_master_and_detaches_otherwise(tmp_path: Path) -> None:
    out = _render(KA, tmp_path)
    client = out[out.index("vrrp_instance VI_CLIENT"):out.index("vrrp_instance VI_SERVER")]
    cmd = "/usr/sbin/ipvs-synproxy xdp"
    assert (f'    notify_master "{cmd} attach eth0 --mode native"\n'
            f'    notify_backup "{cmd} detach eth0"\n'
            f'    notify_fault "{cmd} detach eth0"\n}}\n') in client
    assert "notify" not in out[out.index("vrrp_instance VI_SERVER"):]
    assert ("    script_user root\n    enable_script_security\n"
            f'    shutdown_script "{cmd} detach eth0"\n'
            "    shutdown_script_timeout 60\n}\n") in out
    assert "notify" not in _render(KA.replace("xdp: [{interface: eth0, mode: native}]\n", ""),
                                   tmp_path)


def test_render_passes_the_secret_file_and_the_command(tmp_path: Path) -> None:
    key = tmp_path / "cookie.key"
    key.write_text("00" * 16)
    key.chmod(0o600)
    text = KA.replace("keepalived:\n", "keepalived:\n  xdp_command: /opt/sp/bin/ipvs-synproxy\n")
    out = _render(f"cookie_secret_file: {key}\n" + text, tmp_path)
    assert (f'notify_master "/opt/sp/bin/ipvs-synproxy xdp attach eth0 --mode native '
            f'--secret-file {key}"') in out


def _multicast(dev: str) -> bool:
    try:
        flags = int(Path(f"/sys/class/net/{dev}/flags").read_text(), 16)
    except (OSError, ValueError):
        return False
    return bool(flags & 0x1000)  # IFF_MULTICAST


def test_keepalived_accepts_the_rendered_scripts(tmp_path: Path) -> None:
    binary = keepalived_build.binary_path()
    if not binary.exists():
        pytest.skip(f"{binary} not built (ipvs-synproxy keepalived build)")
    devs = [n for _, n in socket.if_nameindex() if n != "lo" and _multicast(n)]
    if not devs:
        pytest.skip("no multicast interface for a VRRP instance")
    text = KA.replace("eth0", devs[0]).replace("interface: eth1, ", f"interface: {devs[0]}, ")
    conf = tmp_path / "keepalived.conf"
    conf.write_text(_render(text, tmp_path))
    assert "notify_master" in conf.read_text()
    res = keepalived_build.config_test(binary, conf)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize(("text", "message"), [
    (KA.replace("xdp: [{interface: eth0, mode: native}]", "xdp: [eth2]"),
     "xdp[0]: keepalived attaches the XDP program to eth2 when this balancer becomes "
     "master of the VRRP instance on eth2, and no instance is on eth2"),
    (KA.replace("vips: [192.0.2.1/24]}", "vips: [192.0.2.1/24]}\n  pair: "
                "{sync_interface: eth1}"), "xdp: a pair shares one cookie secret"),
])
def test_render_refuses_xdp_it_cannot_drive(text: str, message: str, tmp_path: Path) -> None:
    cfg = load(text)  # apply may still use the file
    assert cfg.keepalived is not None and cfg.keepalived.problems
    with pytest.raises(config_reader.ConfigError) as info:
        _render(text, tmp_path)
    assert message in str(info.value)


def test_a_bad_xdp_command_is_an_error_at_load() -> None:
    with pytest.raises(config_reader.ConfigError) as info:
        load(KA.replace("keepalived:\n", "keepalived:\n  xdp_command: ipvs-synproxy\n"))
    assert info.value.field == "keepalived.xdp_command"
    assert "an absolute path" in info.value.message


# ---- ipvs-synproxy xdp: one writer of the secret ---------------------------------------


def test_attach_sets_the_secret_once_between_pinning_and_attaching(
        world: tuple[FakeKernel, FakeXdp], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """xdp.set_secret is the one writer: the module first, then the program,
    which is pinned by then but not yet attached (its first SYN is answered
    right)."""
    k, fake = world
    monkeypatch.setattr("ipvs_synproxy.cli.xdp.netlink.IPVS", lambda netns: k)
    seen: list[str] = []

    def write_config(dev: str, netns: str | None, secret: bytes, sysctls: object = None
                     ) -> None:
        assert k.secret == secret, "the module is set first"
        seen.append(f"config {dev} {fake.ours[dev]}")
        fake.secrets[dev] = secret

    monkeypatch.setattr(xdp, "write_config", write_config)
    assert cli.main(["xdp", "attach", "eth0", "--mode", "native"]) == 0
    assert "eth0: attached (native)" in capsys.readouterr().out
    assert k.calls == ["set_synproxy_secret"]
    assert seen == ["config eth0 detached"]
    assert fake.calls == ["load eth0", "link eth0 native"]
    assert fake.secrets == {"eth0": k.secret}


def test_detach_takes_several_and_mirror_reports(
        world: tuple[FakeKernel, FakeXdp], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    k, fake = world
    fake.ours = {"eth0": "native", "eth1": "generic"}
    monkeypatch.setattr("ipvs_synproxy.cli.xdp.netlink.IPVS", lambda netns: k)
    assert cli.main(["xdp", "mirror"]) == 0
    assert capsys.readouterr().out.strip() == (
        "mirrored the SYN-proxy VIP:ports into 2 program(s): eth0, eth1")

    def detach(dev: str, netns: str | None, *, missing_ok: bool = False) -> None:
        if dev == "eth7":
            raise xdp.XdpError("no device eth7")
        fake.detach(dev, netns)

    monkeypatch.setattr(xdp, "detach", detach)
    assert cli.main(["xdp", "detach", "eth0", "eth7", "eth1"]) == 1
    out = capsys.readouterr()
    assert out.out.splitlines() == ["eth0: detached; SYNs go to the IPVS module again",
                                    "eth1: detached; SYNs go to the IPVS module again"]
    assert "no device eth7" in out.err and fake.ours == {}
