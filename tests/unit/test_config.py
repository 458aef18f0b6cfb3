"""The declarative config: parsing, validation with file:line, diff, apply/rollback."""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import random
from pathlib import Path

import pytest

from ipvs_synproxy.cli import main as cli
from ipvs_synproxy.config import load as config_load
from ipvs_synproxy.config import plan as config_plan
from ipvs_synproxy.config import reader as config_reader
from ipvs_synproxy.config.plan import Change, Op, Setting
from ipvs_synproxy.config.state import ServiceState, State
from ipvs_synproxy.kernel import sysctl
from ipvs_synproxy.kernel.model import (
    Dest,
    Family,
    FwdMethod,
    Laddr,
    Protocol,
    Service,
    Stats,
    make_dest,
    make_service,
)
from tests.unit.fake_ipvs import FakeKernel

VIP4, VIP6 = "198.51.100.10", "2001:db8:1::10"
RS1, RS2, RS1_6 = "192.0.2.11", "192.0.2.12", "2001:db8:2::11"

EXAMPLE = f"""\
# a balancer
sysctl:
  conn_reuse_mode: 0
  net.ipv4.vs.sync_threshold: 4 60
  fullnat_lport_min: 5000
services:
  - vip: {VIP4}:80
    protocol: tcp
    scheduler: wrr
    synproxy: true
    forward: fullnat
    laddrs: [192.0.2.100, 192.0.2.101]
    real_servers:
      - {{addr: {RS1}:80, weight: 1}}
      - addr: {RS2}
        weight: 2
        upper_threshold: 100
        lower_threshold: 50
        forward: masq
  - vip: "[{VIP6}]:0"
    scheduler: sh
    persistent: 600
    netmask: 64
    scheduler_flags: [sh-fallback, sh-port]
    real_servers:
      - {{addr: "[{RS1_6}]:443", forward: dr}}
  - vip: {VIP4}:53
    protocol: udp
    one_packet: true
    persistent: 30
    netmask: 255.255.255.0
  - fwmark: 7
    family: ipv6
    scheduler: rr
    real_servers:
      - {{addr: "{RS1}", forward: tunnel, tunnel_type: gue, tunnel_port: 6080}}
"""


def load(text: str, name: str = "lb.yaml") -> config_load.Config:
    return config_load.loads(text, name)


def test_example_parses_into_model_values() -> None:
    cfg = load(EXAMPLE)
    assert cfg.state.sysctls == {"conn_reuse_mode": (0,), "sync_threshold": (4, 60),
                                 "fullnat_lport_min": (5000,)}
    web, v6, dns, mark = cfg.state.services
    assert web.service == make_service(source="t", addr=VIP4, port=80, scheduler="wrr",
                                       synproxy=True)
    assert web.laddrs == (Laddr(ipaddress.ip_address("192.0.2.100")),
                          Laddr(ipaddress.ip_address("192.0.2.101")))
    assert web.dests == (
        make_dest(source="t", addr=RS1, port=80, fwd="fullnat", weight=1),
        make_dest(source="t", addr=RS2, port=80, weight=2, u_thresh=100, l_thresh=50),
    )
    assert (v6.service.port, v6.service.persistent, v6.service.prefix) == (0, 600, 64)
    assert v6.service.flags == 0x18
    assert v6.dests[0].fwd is FwdMethod.ROUTE and v6.dests[0].port == 443
    assert dns.service.protocol is Protocol.UDP and dns.service.flags == 0x4
    assert dns.service.prefix == 24
    assert mark.service.fwmark == 7 and mark.service.af is Family.INET6
    (d,) = mark.dests
    assert (d.fwd, d.port, d.tun_type.name, d.tun_port) == (FwdMethod.TUNNEL, 0, "GUE", 6080)


def test_empty_file_is_an_empty_table() -> None:
    assert load("").state == State()
    assert load("services: []\nsysctl: {}\n").state == State()


def _line_of(text: str, needle: str) -> int:
    return next(i for i, ln in enumerate(text.splitlines(), 1) if needle in ln)


SVC = f"services:\n  - vip: {VIP4}:80\n"

BAD = [
    # (config text, line marker, key path, message fragment)
    ("services:\n  - vip: 198.51.100.300:80\n", "300", "services[0].vip",
     "not an IP address: '198.51.100.300'"),
    (f"services:\n  - vip: {VIP4}\n", "vip", "services[0].vip", "no port in"),
    (f"services:\n  - vip: {VIP4}:99999\n", "vip", "services[0].vip",
     "99999 out of range 0-65535"),
    (f"services:\n  - vip: {VIP4}:0\n", "vip", "services[0].vip",
     "port 0 (every port) needs a persistent service"),
    (SVC + "    real_servers:\n      - addr: 192.0.2\n", "192.0.2",
     "services[0].real_servers[0].addr", "not an IP address"),
    (SVC + f"    real_servers:\n      - addr: {RS1}:70000\n", "70000",
     "services[0].real_servers[0].addr", "70000 out of range"),
    (SVC + f"    real_servers:\n      - addr: {RS1}\n        weight: -1\n", "weight",
     "services[0].real_servers[0].weight", "-1 out of range 0-2147483647"),
    (SVC + f"    real_servers:\n      - addr: {RS1}\n        weight: heavy\n", "heavy",
     "services[0].real_servers[0].weight", "not an integer: 'heavy'"),
    (SVC + f"    real_servers:\n      - addr: {RS1}\n        weight: true\n", "weight",
     "services[0].real_servers[0].weight", "not an integer: True"),
    (SVC + f"    real_servers:\n      - addr: {RS1}\n        weight: 1.5\n", "weight",
     "services[0].real_servers[0].weight", "not an integer: 1.5"),
    (SVC + f"    real_servers:\n      - {{addr: {RS1}, upper_threshold: 5, "
     "lower_threshold: 9}\n", "lower", "services[0].real_servers[0].lower_threshold",
     "lower threshold 9 above upper threshold 5"),
    (SVC + "    scheduler: Weighted!\n", "Weighted", "services[0].scheduler",
     "not a scheduler name: 'Weighted!'"),
    (SVC + "    scheduler: 5\n", "scheduler", "services[0].scheduler", "not a string: 5"),
    (SVC + "    protocol: icmp\n", "icmp", "services[0].protocol", "unknown protocol 'icmp'"),
    (SVC + "    forward: nat64\n", "nat64", "services[0].forward", "unknown method 'nat64'"),
    (SVC + "    colour: red\n", "colour", "services[0].colour", "unknown key 'colour'"),
    (SVC + f"    real_servers:\n      - {{addr: {RS1}, wieght: 2}}\n", "wieght",
     "services[0].real_servers[0].wieght", "unknown key 'wieght'"),
    ("servicez: []\n", "servicez", "servicez", "unknown key 'servicez'"),
    (f"services:\n  vip: {VIP4}:80\n", "vip", "services",
     "expected a list, got a mapping"),
    ("services:\n  - just a string\n", "string", "services[0]",
     "expected a mapping, got the string"),
    (SVC + f"    real_servers: {RS1}\n", "real_servers", "services[0].real_servers",
     "expected a list, got the string"),
    (SVC + "    synproxy: 'yes'\n", "synproxy", "services[0].synproxy",
     "not a boolean (true/false): 'yes'"),
    (f"services:\n  - vip: {VIP4}:53\n    protocol: udp\n    synproxy: true\n", "synproxy",
     "services[0].synproxy", "for TCP services only"),
    (SVC + "    synproxy: true\n    real_servers:\n      - {addr: 192.0.2.11, forward: dr}\n",
     "dr}", "services[0].real_servers[0].forward", "uses direct routing (-g): a SYN-proxy "
     "service needs NAT (-m) or FULLNAT"),
    (SVC + "    synproxy: true\n    forward: tunnel\n    real_servers:\n"
     "      - {addr: 192.0.2.11}\n", "tunnel", "services[0].forward", "uses tunneling (-i)"),
    (SVC + "    laddrs: 192.0.2.100\n", "laddrs", "services[0].laddrs", "expected a list"),
    (SVC + "    laddrs: [192.0.2.100, 2001:db8:2::100]\n", "laddrs", "services[0].laddrs[1]",
     "not of the service's family"),
    (SVC + "    laddrs:\n      - 192.0.2.100\n      - 192.0.2.100\n", 5,
     "services[0].laddrs[1]", "duplicate laddr 192.0.2.100"),
    (SVC + "    laddrs: [192.0.2.1000]\n", "laddrs", "services[0].laddrs[0]",
     "not an IP address"),
    (SVC + f"    real_servers:\n      - addr: {RS1}\n      - addr: {RS1}:80\n", f"{RS1}:80",
     "services[0].real_servers[1].addr", "duplicate real server 192.0.2.11:80"),
    (SVC + f"    real_servers:\n      - addr: '[{RS1_6}]:80'\n", RS1_6,
     "services[0].real_servers[0].addr", "only the tunnel method crosses families"),
    (SVC + f"  - vip: {VIP4}:80\n    scheduler: rr\n", 3, "services[1]",
     "duplicate service 198.51.100.10:80/tcp (first at lb.yaml:2)"),
    (SVC + "    scheduler: rr\n    scheduler: wrr\n", "wrr", "scheduler",
     "duplicate key (first on line 3)"),
    (f"services:\n  - vip: {VIP4}:80\n    fwmark: 3\n", 2, "services[0]",
     "exactly one of 'vip'"),
    ("services:\n  - scheduler: rr\n", "scheduler", "services[0]", "exactly one of 'vip'"),
    ("services:\n  - fwmark: 3\n    protocol: tcp\n", "protocol", "services[0].protocol",
     "matches every protocol"),
    ("services:\n  - fwmark: 0\n", "fwmark", "services[0].fwmark", "0 out of range"),
    ("services:\n  - fwmark: 3\n    family: ipx\n", "ipx", "services[0].family",
     "unknown family 'ipx'"),
    (SVC + "    scheduler_flags: [sh-port, turbo]\n", "turbo",
     "services[0].scheduler_flags[1]", "unknown scheduler flag 'turbo'"),
    (SVC + "    netmask: 255.0.255.0\n", "netmask", "services[0].netmask", "not a netmask"),
    ("sysctl:\n  conn_reuse_mode: 0\n  nosuch_knob: 1\n", "nosuch", "sysctl.nosuch_knob",
     "unknown IPVS sysctl"),
    ("sysctl:\n  fullnat_lport_min: 0\n", "lport", "sysctl.fullnat_lport_min",
     "0 out of range 1-65535"),
    ("sysctl:\n  sloppy_tcp: on\n", "sloppy", "sysctl.sloppy_tcp", "not an integer: True"),
    ("sysctl:\n  sync_threshold: 50 3\n", "sync", "sysctl.sync_threshold",
     "threshold 50 must be below the period 3"),
    ("sysctl:\n  sync_ports: 3\n", "sync", "sysctl.sync_ports", "not a power of two"),
    ("sysctl:\n  sync_threshold: 3\n", "sync", "sysctl.sync_threshold", "takes 2 integers"),
    ("sysctl:\n  conn_reuse_mode: 0\n  net.ipv4.vs.conn_reuse_mode: 1\n", "net.ipv4",
     "sysctl.net.ipv4.vs.conn_reuse_mode", "set twice"),
    ("sysctl: [conn_reuse_mode]\n", "sysctl", "sysctl", "expected a mapping"),
    ("cookie_secret_file: relative/key\n", "cookie", "cookie_secret_file",
     "must be an absolute path"),
    ("services:\n  - vip: [unclosed\n", 3, "yaml", ""),
]


@pytest.mark.parametrize(("text", "marker", "path", "message"), BAD,
                         ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_input_names_file_line_and_key_path(text: str, marker: str | int, path: str,
                                                message: str) -> None:
    """``marker``: text on the line the error must name, or the line number."""
    with pytest.raises(config_reader.ConfigError) as info:
        load(text)
    err = info.value
    line = marker if isinstance(marker, int) else _line_of(text, marker)
    assert err.source == f"lb.yaml:{line}", str(err)
    assert err.field == path, str(err)
    assert message in err.message, str(err)
    assert str(err).startswith(f"lb.yaml:{line}: {path}: ")


def test_cli_apply_of_an_invalid_file_exits_2_and_touches_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(SVC + "    scheduler: 5\n")

    def no_kernel(netns: str | None) -> None:
        raise AssertionError("the kernel must not be contacted")

    monkeypatch.setattr("ipvs_synproxy.cli.config._connect", no_kernel)
    for cmd in ("apply", "diff"):
        assert cli.main([cmd, str(f)]) == 2
        err = capsys.readouterr().err
        assert f"{f}:3: services[0].scheduler: not a string: 5" in err
        assert "nothing was applied" in err
    assert cli.main(["apply", str(tmp_path / "missing.yaml")]) == 2
    assert "No such file" in capsys.readouterr().err


# ---- the cookie secret file -------------------------------------------------------------


def _secret(tmp_path: Path, data: bytes, mode: int = 0o600) -> Path:
    p = tmp_path / "cookie.key"
    p.write_bytes(data)
    os.chmod(p, mode)
    return p


def test_secret_file_hex_or_raw_is_read(tmp_path: Path) -> None:
    p = _secret(tmp_path, b"00112233445566778899aabbccddeeff\n")
    cfg = load(f"cookie_secret_file: {p}\n")
    assert cfg.secret == bytes(range(0, 256, 17))[:16] or cfg.secret == bytes.fromhex(
        "00112233445566778899aabbccddeeff")
    assert cfg.secret_file == str(p)
    p = _secret(tmp_path, b"\x01" * 16)
    assert load(f"cookie_secret_file: {p}\n").secret == b"\x01" * 16


@pytest.mark.parametrize(("mode", "fragment"), [
    (0o640, "accessible to group or others (mode 0640); run: chmod 600"),
    (0o644, "accessible to group or others (mode 0644)"),
    (0o604, "accessible to group or others (mode 0604)"),
])
def test_group_or_world_readable_secret_is_refused(tmp_path: Path, mode: int,
                                                   fragment: str) -> None:
    p = _secret(tmp_path, b"00112233445566778899aabbccddeeff", mode)
    with pytest.raises(config_reader.ConfigError) as info:
        load(f"# x\ncookie_secret_file: {p}\n")
    assert info.value.source == "lb.yaml:2"
    assert info.value.field == "cookie_secret_file"
    assert fragment in info.value.message


def test_secret_file_of_wrong_size_missing_or_not_root_owned(tmp_path: Path) -> None:
    p = _secret(tmp_path, b"abc\n")
    with pytest.raises(config_reader.ConfigError, match="32 hex digits or 16 raw bytes"):
        load(f"cookie_secret_file: {p}\n")
    with pytest.raises(config_reader.ConfigError, match=r"cannot read .*No such file"):
        load(f"cookie_secret_file: {tmp_path / 'nope'}\n")
    with pytest.raises(config_reader.ConfigError, match="not a regular file"):
        load(f"cookie_secret_file: {tmp_path}\n")
    p = _secret(tmp_path, b"00112233445566778899aabbccddeeff")
    if os.geteuid() == 0:
        os.chown(p, 1000, 1000)
        with pytest.raises(config_reader.ConfigError, match="owned by uid 1000, not root"):
            load(f"cookie_secret_file: {p}\n")
    assert config_load.loads(f"cookie_secret_file: {p}\n", require_root_owner=False).secret


# ---- diff (pure) ------------------------------------------------------------------------


def svc(port: int = 80, **kw: object) -> Service:
    return make_service(source="t", addr=VIP4, port=port, **kw)


def dest(addr: str = RS1, port: int = 80, **kw: object) -> Dest:
    return make_dest(source="t", addr=addr, port=port, **kw)


def la(addr: str) -> Laddr:
    return Laddr(ipaddress.ip_address(addr))


def state(*services: ServiceState, **sysctls: sysctl.Value | None) -> State:
    return State(tuple(services), sysctls)


def ops(changes: list[Change]) -> list[str]:
    return [config_plan.describe(c) for c in changes]


def test_identical_states_need_no_change_and_counters_do_not_count() -> None:
    listed = ServiceState(Service(addr=ipaddress.ip_address(VIP4), port=80,
                                  stats=Stats(conns=5)),
                          (Dest(addr=ipaddress.ip_address(RS1), port=80, active_conns=3),))
    wanted = ServiceState(svc(), (dest(),))
    assert config_plan.diff(state(listed, a=(1,)), state(wanted, a=(1,))) == []


def test_weight_change_is_one_dest_edit() -> None:
    cur = state(ServiceState(svc(), (dest(weight=1), dest(RS2))))
    new = state(ServiceState(svc(), (dest(weight=5), dest(RS2))))
    (c,) = config_plan.diff(cur, new)
    assert (c.op, c.kind, c.old, c.new) == (Op.EDIT, "dest", dest(weight=1), dest(weight=5))
    assert config_plan.describe(c) == ("~ real server 192.0.2.11:80 of 198.51.100.10:80/tcp: "
                                  "weight 1 -> 5")


def test_service_edit_and_dest_changes_are_ordered_add_before_delete() -> None:
    cur = state(ServiceState(svc(scheduler="rr"), (dest(RS1), dest(RS2, 8080)),
                             (la("192.0.2.100"),)))
    new = state(ServiceState(svc(scheduler="wrr", synproxy=True), (dest(RS2, 80), dest(RS1)),
                             (la("192.0.2.101"),)))
    assert ops(config_plan.diff(cur, new)) == [
        "~ service 198.51.100.10:80/tcp: scheduler rr -> wrr, synproxy false -> true",
        "+ laddr 192.0.2.101 of 198.51.100.10:80/tcp",
        "+ real server 192.0.2.12:80 of 198.51.100.10:80/tcp (masq, weight 1)",
        "- real server 192.0.2.12:8080 of 198.51.100.10:80/tcp",
        "- laddr 192.0.2.100 of 198.51.100.10:80/tcp",
    ]


def test_new_and_removed_services_and_sysctls() -> None:
    old = ServiceState(svc(81), (dest(RS1, 81), dest(RS2, 81)), (la("192.0.2.100"),))
    new = ServiceState(svc(80), (dest(),), (la("192.0.2.101"),))
    changes = config_plan.diff(state(old, conn_reuse_mode=(1,), sloppy_tcp=(0,)),
                          state(new, conn_reuse_mode=(0,)))
    assert ops(changes) == [
        "~ sysctl net.ipv4.vs.conn_reuse_mode: 1 -> 0",
        "- real server 192.0.2.11:81 of 198.51.100.10:81/tcp",
        "- real server 192.0.2.12:81 of 198.51.100.10:81/tcp",
        "- laddr 192.0.2.100 of 198.51.100.10:81/tcp",
        "- service 198.51.100.10:81/tcp",
        "+ service 198.51.100.10:80/tcp (wlc)",
        "+ laddr 192.0.2.101 of 198.51.100.10:80/tcp",
        "+ real server 192.0.2.11:80 of 198.51.100.10:80/tcp (masq, weight 1)",
    ]
    assert config_plan.counts(changes) == {"add": 3, "edit": 1, "delete": 4}


def test_sysctls_not_named_in_the_config_are_left_alone() -> None:
    assert config_plan.diff(state(sloppy_tcp=(1,)), state()) == []


def test_key_change_is_delete_and_add_but_attribute_change_is_edit() -> None:
    cur = state(ServiceState(svc(80, persistent=0)))
    assert [c.op for c in config_plan.diff(cur, state(ServiceState(svc(80, persistent=60))))] \
        == [Op.EDIT]
    assert [c.op for c in config_plan.diff(cur, state(ServiceState(svc(80, protocol="udp"))))] \
        == [Op.DELETE, Op.ADD]


# ---- apply and rollback -----------------------------------------------------------------


def test_rollback_plan_inverts_in_reverse_order() -> None:
    s = svc()
    done = [Change(Op.EDIT, Setting("a", (1,)), Setting("a", (2,))),
            Change(Op.ADD, None, s, s),
            Change(Op.ADD, None, dest(), s),
            Change(Op.EDIT, dest(weight=1), dest(weight=2), s),
            Change(Op.DELETE, la("192.0.2.100"), None, s)]
    assert config_plan.rollback_plan(done) == [
        Change(Op.ADD, None, la("192.0.2.100"), s),
        Change(Op.EDIT, dest(weight=2), dest(weight=1), s),
        Change(Op.DELETE, dest(), None, s),
        Change(Op.DELETE, s, None, s),
        Change(Op.EDIT, Setting("a", (2,)), Setting("a", (1,))),
    ]


STATES = [
    state(conn_reuse_mode=(1,), sloppy_tcp=(0,)),
    state(ServiceState(svc(80, scheduler="rr"), (dest(RS1, weight=3), dest(RS2, 8080)),
                       (la("192.0.2.100"), la("192.0.2.101"))),
          ServiceState(svc(53, protocol="udp"), (dest(RS1, 53),)),
          conn_reuse_mode=(0,), sloppy_tcp=(1,)),
    state(ServiceState(svc(80, scheduler="wrr", persistent=30),
                       (dest(RS1, weight=1), dest(RS2, 80, fwd="dr")), (la("192.0.2.102"),)),
          ServiceState(make_service(source="t", fwmark=4), (dest(RS2, 0, fwd="dr"),)),
          conn_reuse_mode=(1,), sloppy_tcp=(1,)),
]


def _canon(s: State) -> tuple[object, ...]:
    return (sorted((repr(st.service), sorted(map(repr, st.dests)), sorted(map(repr, st.laddrs)))
                   for st in s.services), sorted(s.sysctls.items()))


@pytest.mark.parametrize(("a", "b"), list(itertools.permutations(range(len(STATES)), 2)))
def test_applying_the_diff_reaches_the_target_and_any_failure_restores_the_start(
        a: int, b: int) -> None:
    start, goal = STATES[a], STATES[b]
    changes = config_plan.diff(start, goal)
    k = FakeKernel.from_state(start)
    config_plan.apply_changes(changes, k)
    assert _canon(k.state()) == _canon(goal)
    assert config_plan.diff(k.state(), goal) == []
    # make each step fail in turn: the kernel must end where it started
    for i in range(len(changes)):
        k = FakeKernel.from_state(start)
        calls_ok = FakeKernel.from_state(start)
        config_plan.apply_changes(changes[:i], calls_ok)
        k.fail_on = _call_name(changes[i])
        with pytest.raises(config_plan.ApplyError) as info:
            config_plan.apply_changes(changes, k)
        assert info.value.failed == changes[i]
        assert info.value.done == changes[:i]
        assert info.value.rollback_errors == []
        assert _canon(k.state()) == _canon(start), (i, changes[i])


def _call_name(c: Change) -> str:
    item = c.new if c.new is not None else c.old
    verb = {Op.ADD: "add", Op.EDIT: "edit", Op.DELETE: "del"}[c.op]
    if isinstance(item, Setting):
        return f"write_sysctl:{item.name}"
    if isinstance(item, Service):
        return f"{verb}_service:{item}"
    if isinstance(item, Dest):
        return f"{verb}_dest:{c.service}:{item}"
    assert isinstance(item, Laddr)
    return f"{verb}_laddr:{c.service}:{item.addr}"


def test_a_failing_rollback_is_reported_as_incomplete() -> None:
    start = STATES[1]
    changes = config_plan.diff(start, STATES[2])
    k = FakeKernel.from_state(start)
    k.fail_on = _call_name(changes[-1])
    original = k.write_sysctl

    def broken(name: str, value: sysctl.Value) -> None:
        if k.calls.count(f"write_sysctl:{name}") >= 1:
            k.calls.append(f"write_sysctl:{name}")
            raise sysctl.SysctlError(name, "read-only now")
        original(name, value)

    k.write_sysctl = broken  # type: ignore[method-assign]
    with pytest.raises(config_plan.ApplyError) as info:
        config_plan.apply_changes(changes, k)
    text = str(info.value)
    assert "ROLLBACK INCOMPLETE: 1 of" in text
    assert "net.ipv4.vs.conn_reuse_mode: read-only now" in text


def test_secret_failure_after_all_changes_rolls_them_back() -> None:
    k = FakeKernel.from_state(STATES[0])
    changes = config_plan.diff(STATES[0], STATES[1])

    def after() -> None:
        raise RuntimeError("no secret today")

    with pytest.raises(config_plan.ApplyError) as info:
        config_plan.apply_changes(changes, k, after)
    assert info.value.failed is None
    assert "failed: setting the SYN proxy secret: no secret today" in str(info.value)
    assert _canon(k.state()) == _canon(STATES[0])


# ---- problems and the CLI over a fake kernel --------------------------------------------


def _cli_env(monkeypatch: pytest.MonkeyPatch, k: FakeKernel) -> None:
    monkeypatch.setattr("ipvs_synproxy.cli.config._connect", lambda netns: k)
    monkeypatch.setattr(sysctl, "Sysctls", lambda netns=None: k)


def test_cli_diff_apply_and_apply_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    k = FakeKernel.from_state(state(conn_reuse_mode=(1,), sync_threshold=(3, 50),
                                    fullnat_lport_min=(1024,)))
    _cli_env(monkeypatch, k)
    f = tmp_path / "lb.yaml"
    f.write_text(EXAMPLE)
    assert cli.main(["diff", str(f), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["summary"] == {"add": 10, "edit": 3, "delete": 0}
    assert got["problems"] == []
    assert got["changes"][0] == {
        "op": "edit", "kind": "sysctl", "service": None,
        "old": {"name": "net.ipv4.vs.conn_reuse_mode", "value": "1"},
        "new": {"name": "net.ipv4.vs.conn_reuse_mode", "value": "0"},
        "text": "~ sysctl net.ipv4.vs.conn_reuse_mode: 1 -> 0"}
    assert k.calls == []  # diff changes nothing
    assert cli.main(["apply", str(f)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-2:] == ["13 change(s): 10 to add, 3 to edit, 0 to delete",
                                     "applied"]
    assert cli.main(["apply", str(f)]) == 0
    assert capsys.readouterr().out.strip() == "no changes"
    n = len(k.calls)
    assert cli.main(["apply", str(f), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["changes"] == []
    assert len(k.calls) == n


def test_cli_apply_failure_exits_1_and_says_what_failed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    k = FakeKernel.from_state(STATES[1])
    before = _canon(k.state())
    k.fail_on = f"add_service:{svc(8080)}"
    _cli_env(monkeypatch, k)
    f = tmp_path / "lb.yaml"
    f.write_text(f"sysctl: {{conn_reuse_mode: 1}}\nservices:\n  - vip: {VIP4}:80\n"
                 f"  - vip: {VIP4}:8080\n")
    assert cli.main(["apply", str(f)]) == 1
    err = capsys.readouterr().err
    assert "failed: + service 198.51.100.10:8080/tcp (wlc): add_service" in err
    assert "rolled back the 8 change(s) already made; the previous state is restored" in err
    assert _canon(k.state()) == before


def test_problems_stop_apply_before_any_change(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    k = FakeKernel.from_state(state(conn_reuse_mode=(1,)), has_laddr=False)
    _cli_env(monkeypatch, k)
    secret = _secret(tmp_path, b"00112233445566778899aabbccddeeff")
    f = tmp_path / "lb.yaml"
    f.write_text(f"cookie_secret_file: {secret}\nsysctl: {{fullnat_toa: 0}}\n"
                 f"services:\n  - vip: {VIP4}:80\n    laddrs: [192.0.2.100]\n")
    assert cli.main(["apply", str(f)]) == 1
    err = capsys.readouterr().err
    assert "sysctl net.ipv4.vs.fullnat_toa is not present in this kernel" in err
    assert "do not support laddr pools" in err
    assert "NotSupported: the loaded IPVS modules cannot set the SYN proxy secret" in err
    assert "nothing was applied" in err
    assert k.calls == []
    assert cli.main(["diff", str(f)]) == 1
    assert "problem: " in capsys.readouterr().out


def test_secret_is_set_last_when_supported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    k = FakeKernel(has_secret=True)
    _cli_env(monkeypatch, k)
    secret = _secret(tmp_path, b"\x07" * 16)
    f = tmp_path / "lb.yaml"
    f.write_text(f"cookie_secret_file: {secret}\nservices:\n  - vip: {VIP4}:80\n")
    assert cli.main(["apply", str(f)]) == 0
    assert k.secret == b"\x07" * 16 and k.calls[-1] == "set_synproxy_secret"
    assert f"cookie secret set from {secret}" in capsys.readouterr().out


# ---- proxy_protocol (issue 21) ----------------------------------------------------------

PP = f"""\
services:
  - vip: {VIP4}:80
    forward: fullnat
    laddrs: [192.0.2.100]
    proxy_protocol: v2
    real_servers:
      - addr: {RS1}
      - addr: {RS2}
        proxy_protocol: off
      - addr: 192.0.2.13
        proxy_protocol: v1
      - addr: 192.0.2.14
        forward: masq
        proxy_protocol: off
  - fwmark: 9
    forward: fullnat
    laddrs: [192.0.2.100]
    real_servers:
      - {{addr: {RS1}, proxy_protocol: V2}}
      - {{addr: {RS2}}}
"""


def test_proxy_protocol_per_real_server_with_the_services_default() -> None:
    web, mark = load(PP).state.services
    assert [(str(d.addr), str(d.proxy_protocol)) for d in web.dests] == [
        (RS1, "v2"), (RS2, "off"), ("192.0.2.13", "v1"), ("192.0.2.14", "off")]
    assert [str(d.proxy_protocol) for d in mark.dests] == ["v2", "off"]


PP_SVC = f"services:\n  - vip: {VIP4}:80\n    forward: fullnat\n    laddrs: [192.0.2.100]\n"
PP_BAD = [
    (PP_SVC + f"    real_servers:\n      - {{addr: {RS1}, proxy_protocol: v3}}\n", "v3",
     "services[0].real_servers[0].proxy_protocol",
     "not a PROXY protocol setting: 'v3' (off, v1 or v2)"),
    (PP_SVC + f"    real_servers:\n      - {{addr: {RS1}, proxy_protocol: 2}}\n", "proxy",
     "services[0].real_servers[0].proxy_protocol", "not a PROXY protocol setting: 2"),
    (PP_SVC + f"    real_servers:\n      - {{addr: {RS1}, proxy_protocol: true}}\n", "proxy",
     "services[0].real_servers[0].proxy_protocol", "true is not a PROXY protocol version"),
    (PP_SVC + "    proxy_protocol: [v2]\n", "proxy", "services[0].proxy_protocol",
     "not a PROXY protocol setting: ['v2']"),
    (PP_SVC + f"    real_servers:\n      - {{addr: {RS1}, forward: masq, proxy_protocol: "
     "v2}\n", "proxy", "services[0].real_servers[0].proxy_protocol",
     "real server 192.0.2.11:80 uses masq forwarding: the PROXY protocol header (v2) needs "
     "FULLNAT"),
    (f"services:\n  - vip: {VIP4}:80\n    proxy_protocol: v1\n    real_servers:\n"
     f"      - addr: {RS1}\n", "proxy", "services[0].proxy_protocol",
     "the service's proxy_protocol v1 applies to real server 192.0.2.11:80, which uses masq"),
    (f"services:\n  - vip: {VIP4}:53\n    protocol: udp\n    proxy_protocol: v2\n", "proxy",
     "services[0].proxy_protocol", "for TCP services only, not UDP"),
    (f"services:\n  - vip: {VIP4}:53\n    protocol: udp\n    forward: fullnat\n"
     "    laddrs: [192.0.2.100]\n    real_servers:\n"
     f"      - {{addr: {RS1}, proxy_protocol: v1}}\n", "proxy",
     "services[0].real_servers[0].proxy_protocol", "for TCP services only, not UDP"),
]


@pytest.mark.parametrize(("text", "marker", "path", "message"), PP_BAD,
                         ids=[f"pp{i}" for i in range(len(PP_BAD))])
def test_bad_proxy_protocol_names_file_line_and_key(text: str, marker: str, path: str,
                                                    message: str) -> None:
    test_bad_input_names_file_line_and_key_path(text, marker, path, message)


def test_random_malformed_proxy_protocol_values_are_errors_that_change_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    seed = int(os.environ.get("TEST_SEED", random.randrange(2**32)))
    print(f"seed {seed} (replay: TEST_SEED={seed})")
    rng = random.Random(seed)
    start = load(PP).state
    k = FakeKernel.from_state(start)
    _cli_env(monkeypatch, k)
    f = tmp_path / "lb.yaml"
    alphabet = "v0123OFFonfx -_.:'\"[]{}!#\\"
    for _ in range(40):
        junk = rng.choice([
            "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))),
            str(rng.randint(-3, 300)), "v" + str(rng.randint(3, 99)), "true", "yes", "on",
            "1.5", "~", "[]", "{}", "V 2", "v2v", "'v 1'", "v-1"])
        where = rng.choice([f"    proxy_protocol: {junk}\n",
                            f"        proxy_protocol: {junk}\n"])
        lines = PP.splitlines(keepends=True)
        target = [i for i, ln in enumerate(lines) if ln == where.replace(junk, "v2")
                  or ln.startswith(where.split(":")[0] + ":")]
        i = rng.choice(target)
        lines[i] = where
        text = "".join(lines)
        try:
            cfg = config_load.loads(text, "lb.yaml")
        except config_reader.ConfigError as exc:
            assert "proxy_protocol" in exc.field or exc.field == "yaml", (seed, junk, exc)
            f.write_text(text)
            assert cli.main(["apply", str(f)]) == 2, (seed, junk)
            assert "nothing was applied" in capsys.readouterr().err
            assert k.state() == start and k.calls == [], (seed, junk)
            continue
        # only the three settings (a bare off is YAML's false) get through
        got = {str(d.proxy_protocol) for st in cfg.state.services for d in st.dests}
        assert got <= {"off", "v1", "v2"}, (seed, junk)
        assert junk.strip("'\"").lower() in ("off", "v1", "v2", "no", "false"), (seed, junk)


def test_apply_converges_a_proxy_protocol_change_with_one_edit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    k = FakeKernel.from_state(load(PP).state)
    _cli_env(monkeypatch, k)
    f = tmp_path / "lb.yaml"
    f.write_text(PP.replace("proxy_protocol: off\n", "proxy_protocol: v1\n", 1))
    assert cli.main(["diff", str(f)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        "~ real server 192.0.2.12:80 of 198.51.100.10:80/tcp: proxy_protocol off -> v1")
    assert cli.main(["apply", str(f)]) == 0
    assert [c.split(":")[0] for c in k.calls] == ["edit_dest"]
    assert k.dests_[load(PP).state.services[0].service.key()][1].proxy_protocol == 1
    assert cli.main(["apply", str(f)]) == 0
    assert capsys.readouterr().out.strip().endswith("no changes")


def test_a_new_real_server_shows_its_header_in_the_plan() -> None:
    cur = load(PP).state
    new = load(PP + "      - {addr: 192.0.2.15, proxy_protocol: v2}\n").state
    assert ops(config_plan.diff(cur, new)) == [
        "+ real server 192.0.2.15:0 of fwmark 9/ipv4 (fullnat, weight 1, proxy protocol v2)"]


def test_the_proxy_protocol_guides_examples_load() -> None:
    root = Path(__file__).resolve().parents[2]
    text = (root / "docs" / "proxy-protocol.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```yaml\n")[1:]]
    assert blocks
    for block in blocks:
        states = load(block).state.services
        assert any(d.proxy_protocol for st in states for d in st.dests)
