"""``ipvs-synproxy apply`` / ``diff`` / ``sysctl`` / ``stats`` against the real kernel.

Applying a config makes the balancer's table match it and touches nothing
else; applying it again changes nothing; an apply the kernel refuses midway
leaves the table and the sysctls exactly as they were; an edit is an edit,
so an established connection keeps working across weight changes and a new
real server.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipvs_synproxy.cli import main as cli
from ipvs_synproxy.kernel import netlink, sysctl
from ipvs_synproxy.kernel.model import make_service
from ipvs_synproxy_testbed import netns, peers, topology
from tests.vm.conftest import ipvsadm

V4, V6 = topology.VIP4, topology.VIP6
RS1, RS2 = topology.RS4["rs1"], topology.RS4["rs2"]
RS1_6 = topology.RS6["rs1"]
TOUCHED = ("expire_nodest_conn", "sync_threshold", "conn_reuse_mode", "sloppy_tcp",
           "fullnat_lport_min", "fullnat_lport_max")


def dump() -> list[str]:
    """``ipvsadm -S -n`` as sorted lines (a real server put back by a rollback
    goes to the head of its service's list, so the order may differ)."""
    return sorted(ipvsadm("-S", "-n").splitlines())


def knobs() -> dict[str, str]:
    return {k: netns.read_sysctl("lb", f"net.ipv4.vs.{k}") for k in TOUCHED}


@pytest.fixture
def clean(lb: None) -> Iterator[None]:
    """An empty table; the sysctls the tests touch are put back afterwards."""
    saved = knobs()
    yield
    for k, v in saved.items():
        netns.write_sysctl("lb", f"net.ipv4.vs.{k}", v)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def apply_json(capsys: pytest.CaptureFixture[str], path: Path) -> tuple[int, dict[str, object]]:
    rc, out, err = run(capsys, "apply", str(path), "--netns", "lb", "--json")
    assert out, err
    return rc, json.loads(out)


BASE = f"""
sysctl:
  expire_nodest_conn: 1
  net.ipv4.vs.sync_threshold: 4 60
services:
  - vip: {V4}:80
    scheduler: wrr
    real_servers:
      - {{addr: {RS1}:80, weight: 3}}
      - {{addr: {RS2}:8080, weight: 1, forward: dr, upper_threshold: 50}}
  - vip: "[{V6}]:443"
    scheduler: sh
    persistent: 300
    scheduler_flags: [sh-port]
    real_servers:
      - addr: "[{RS1_6}]:443"
        forward: tunnel
  - vip: {V4}:53
    protocol: udp
    scheduler: rr
    one_packet: true
    real_servers:
      - {{addr: {RS1}, weight: 0}}
  - fwmark: 9
    scheduler: lc
    real_servers:
      - {{addr: {RS2}, forward: dr}}
"""


def write(tmp_path: Path, text: str, name: str = "ipvs.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_apply_builds_the_table_and_a_second_apply_changes_nothing(
        clean: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write(tmp_path, BASE)
    rc, first = apply_json(capsys, cfg)
    assert rc == 0 and first["applied"] is True, first
    assert first["summary"] == {"add": 9, "edit": 2, "delete": 0}
    after_first = dump()
    for line in (f"-A -t {V4}:80 -s wrr", f"-a -t {V4}:80 -r {RS1}:80 -m -w 3",
                 f"-a -t {V4}:80 -r {RS2}:8080 -g -w 1", f"-A -u {V4}:53 -s rr",
                 f"-a -u {V4}:53 -r {RS1}:53 -m -w 0", "-A -f 9 -s lc",
                 f"-a -f 9 -r {RS2}:0 -g -w 1", f"-A -t [{V6}]:443 -s sh",
                 f"-a -t [{V6}]:443 -r [{RS1_6}]:443 -i -w 1"):
        assert any(ln.startswith(line) for ln in after_first), (line, after_first)
    assert len(after_first) == 9
    (v6,) = [ln for ln in after_first if ln.startswith(f"-A -t [{V6}]")]
    assert "-p 300" in v6 and "sh-port" in v6
    (udp,) = [ln for ln in after_first if ln.startswith("-A -u")]
    assert udp.split()[-1] == "-o"
    assert knobs()["expire_nodest_conn"] == "1"
    assert knobs()["sync_threshold"].split() == ["4", "60"]

    rc, second = apply_json(capsys, cfg)
    assert rc == 0 and second["applied"] is True
    assert second["changes"] == [] and second["summary"] == {"add": 0, "edit": 0, "delete": 0}
    assert dump() == after_first
    rc, out, _ = run(capsys, "diff", str(cfg), "--netns", "lb")
    assert (rc, out.strip()) == (0, "no changes")


def test_diff_lists_only_what_differs_and_changes_nothing(
        clean: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert apply_json(capsys, write(tmp_path, BASE))[0] == 0
    before = dump()
    changed = BASE.replace(f"{{addr: {RS1}:80, weight: 3}}", f"{{addr: {RS1}:80, weight: 7}}")
    changed = changed.replace("  - fwmark: 9\n    scheduler: lc\n", "  - fwmark: 9\n"
                              "    scheduler: wlc\n")
    rc, out, _ = run(capsys, "diff", str(write(tmp_path, changed, "b.yaml")), "--netns", "lb",
                     "--json")
    assert rc == 0
    got = json.loads(out)
    assert [(c["op"], c["kind"]) for c in got["changes"]] == [("edit", "dest"),
                                                             ("edit", "service")]
    assert "weight 3 -> 7" in got["changes"][0]["text"]
    assert "scheduler lc -> wlc" in got["changes"][1]["text"]
    assert dump() == before


def test_apply_refused_midway_by_the_kernel_restores_everything(
        clean: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert apply_json(capsys, write(tmp_path, BASE))[0] == 0
    before, knobs_before = dump(), knobs()
    # Every kind of change succeeds first (sysctl edits, a whole service
    # deleted, a service edited, real servers edited, added and deleted, a
    # service added), then the kernel refuses a scheduler it has no module for.
    bad = f"""
sysctl:
  expire_nodest_conn: 0
  sync_threshold: [2, 40]
  conn_reuse_mode: 0
services:
  - vip: {V4}:80
    scheduler: rr
    real_servers:
      - {{addr: {RS1}:80, weight: 9}}
      - {{addr: {RS2}:80, weight: 2}}
  - vip: "[{V6}]:443"
    scheduler: sh
    persistent: 300
    scheduler_flags: [sh-port]
    real_servers:
      - addr: "[{RS1_6}]:443"
        forward: tunnel
  - vip: {V4}:53
    protocol: udp
    scheduler: rr
    one_packet: true
    real_servers:
      - {{addr: {RS1}, weight: 0}}
  - vip: {V4}:8443
    real_servers: [{{addr: {RS1}}}]
  - vip: {V4}:8444
    scheduler: nosuchsched
"""
    path = write(tmp_path, bad, "bad.yaml")
    rc, res = apply_json(capsys, path)
    assert rc == 1 and res["applied"] is False
    ops = {(c["op"], c["kind"]) for c in res["changes"]}  # type: ignore[union-attr]
    assert {("edit", "sysctl"), ("delete", "service"), ("edit", "service"),
            ("edit", "dest"), ("add", "dest"), ("delete", "dest"),
            ("add", "service")} <= ops
    assert "nosuchsched" in str(res["error"])
    assert res["rollback_errors"] == []
    assert res["rolled_back"] == len(res["changes"]) - 1  # type: ignore[arg-type]
    assert dump() == before
    assert knobs() == knobs_before
    # the human form says what failed and that the rest was undone
    rc, _, err = run(capsys, "apply", str(path), "--netns", "lb")
    assert rc == 1
    assert "nosuchsched" in err and "rolled back" in err
    assert dump() == before and knobs() == knobs_before


def test_invalid_config_exits_2_and_applies_nothing(
        clean: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert apply_json(capsys, write(tmp_path, BASE))[0] == 0
    before = dump()
    bad = BASE.replace(f"{RS2}:8080, weight: 1", f"{RS2}:8080, weight: heavy")
    path = write(tmp_path, bad, "bad.yaml")
    rc, _, err = run(capsys, "apply", str(path), "--netns", "lb")
    line = next(i for i, ln in enumerate(bad.splitlines(), 1) if "heavy" in ln)
    assert rc == 2
    assert f"{path}:{line}: services[0].real_servers[1].weight: not an integer" in err
    assert dump() == before


FIRST_SERVICE_ONLY = BASE.split(f'  - vip: "[{V6}]:443"')[0]
BAD_FILES = {
    "empty": ("", "declares no service: applying it would delete all 4 live service(s)"),
    "comments only": ("# lb1\n", "declares no service"),
    "truncated": (FIRST_SERVICE_ONLY, "would delete 3 of the 4 live services, more than 50%"),
    "synproxy with dr": (BASE.replace("scheduler: wrr", "scheduler: wrr\n    synproxy: true"),
                         "a SYN-proxy service needs NAT (-m) or FULLNAT"),
    "fullnat without laddrs": (BASE.replace(f"{RS1}:80, weight: 3",
                                            f"{RS1}:80, weight: 3, forward: fullnat"),
                               "needs the service's local addresses: add 'laddrs'"),
    "weight above INT_MAX": (BASE.replace("weight: 3", "weight: 2147483648"),
                             "weight: 2147483648 out of range 0-2147483647"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_mistaken_file_is_refused_and_changes_nothing(
        clean: None, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    """Everyday mistakes (an empty or truncated file, a combination the kernel
    refuses): a clear error naming the problem, no traceback, the table (-S)
    and the sysctls as they were, nothing saved."""
    assert apply_json(capsys, write(tmp_path, BASE))[0] == 0
    before, knobs_before = dump(), knobs()
    saved_before = run(capsys, "restore", "--list")[1]
    text, why = BAD_FILES[case]
    rc, _, err = run(capsys, "apply", str(write(tmp_path, text, "bad.yaml")), "--netns", "lb")
    assert rc == 2 and why in err and "Traceback" not in err, err
    assert dump() == before and knobs() == knobs_before
    assert run(capsys, "restore", "--list")[1] == saved_before


def test_restore_puts_back_the_table_an_apply_replaced(
        clean: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert apply_json(capsys, write(tmp_path, BASE))[0] == 0
    before, knobs_before = dump(), knobs()
    other = FIRST_SERVICE_ONLY.replace("weight: 3", "weight: 7").replace(
        "expire_nodest_conn: 1", "expire_nodest_conn: 0")
    rc, out, err = run(capsys, "apply", str(write(tmp_path, other, "other.yaml")),
                       "--netns", "lb", "--prune")
    assert rc == 0, err
    assert "saved the live table to" in out
    assert dump() != before and knobs()["expire_nodest_conn"] == "0"
    rc, out, err = run(capsys, "restore", "--netns", "lb")
    assert rc == 0, err
    assert dump() == before and knobs() == knobs_before
    assert "restored" in out


class EchoServer:
    """Answers each line on a connection with ``NAME:line``, keeping it open."""

    def __init__(self, ns: str, addr: str, port: int) -> None:
        self.name = ns
        self.sock = peers.ns_socket(ns, socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((addr, port))
        self.sock.listen(16)
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as f:
            for line in f:
                conn.sendall(self.name.encode() + b":" + line)

    def close(self) -> None:
        # shutdown wakes the thread blocked in accept(): close() alone would
        # leave the socket listening until the guest stops (later tests on
        # rs1:9000 then fail to bind)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for c in self.conns:
            c.close()


def test_established_connection_survives_weight_change_and_new_real_server(
        clean: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    servers = [EchoServer("rs1", RS1, 9000), EchoServer("rs2", RS2, 9000)]
    try:
        one = f"""
services:
  - vip: {V4}:9000
    scheduler: wrr
    real_servers:
      - {{addr: {RS1}, weight: 1}}
"""
        assert apply_json(capsys, write(tmp_path, one, "one.yaml"))[0] == 0
        client = peers.ns_socket("client", socket.AF_INET)
        client.settimeout(10)
        client.connect((V4, 9000))
        reader = client.makefile("rb")
        client.sendall(b"before\n")
        assert reader.readline() == b"rs1:before\n"

        two = one.replace("weight: 1}", "weight: 5}") + f"      - {{addr: {RS2}, weight: 3}}\n"
        rc, res = apply_json(capsys, write(tmp_path, two, "two.yaml"))
        assert rc == 0, res
        assert [(c["op"], c["kind"]) for c in res["changes"]] == [  # type: ignore[union-attr]
            ("edit", "dest"), ("add", "dest")]
        table = dump()
        assert f"-a -t {V4}:9000 -r {RS1}:9000 -m -w 5" in table
        assert f"-a -t {V4}:9000 -r {RS2}:9000 -m -w 3" in table

        client.sendall(b"after\n")
        assert reader.readline() == b"rs1:after\n"
        # the connection is still the one IPVS knows, on rs1
        conns = ipvsadm("-L", "-n", "-c")
        assert f"{V4}:9000" in conns and f"{RS1}:9000" in conns and "ESTABLISHED" in conns
        reader.close()
        client.close()
    finally:
        for s in servers:
            s.close()


def test_laddr_pool_applied_edited_and_reapplied_unchanged(
        clean: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    la = topology.LADDRS4
    text = f"""
sysctl:
  fullnat_lport_min: 20000
  fullnat_lport_max: 30000
services:
  - vip: {V4}:80
    scheduler: rr
    forward: fullnat
    laddrs: [{la[0]}, {la[1]}]
    real_servers:
      - addr: {RS1}:80
"""
    assert apply_json(capsys, write(tmp_path, text))[0] == 0
    svc = make_service(source="test", addr=V4, port=80)
    with netlink.IPVS("lb") as ipvs:
        assert sorted(str(x.addr) for x in ipvs.laddrs(svc)) == [la[0], la[1]]
        (dest,) = ipvs.dests(svc)
        assert dest.fwd.name == "FULLNAT"
    assert knobs()["fullnat_lport_min"] == "20000"
    rc, again = apply_json(capsys, write(tmp_path, text))
    assert (rc, again["changes"]) == (0, [])

    moved = text.replace(f"[{la[0]}, {la[1]}]", f"[{la[1]}, {la[2]}]")
    rc, res = apply_json(capsys, write(tmp_path, moved, "moved.yaml"))
    assert rc == 0
    assert [(c["op"], c["kind"], c["new"] or c["old"]) for c in res["changes"]] == [
        ("add", "laddr", {"addr": la[2]}), ("delete", "laddr", {"addr": la[0]})]
    with netlink.IPVS("lb") as ipvs:
        assert sorted(str(x.addr) for x in ipvs.laddrs(svc)) == [la[1], la[2]]


def test_cookie_secret_is_set_or_refused_with_notsupported(
        clean: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    secret = tmp_path / "cookie.key"
    secret.write_text("00112233445566778899aabbccddeeff\n")
    os.chmod(secret, 0o600)
    text = BASE + f"cookie_secret_file: {secret}\n"
    with netlink.IPVS("lb") as ipvs:
        supported = ipvs.supports(netlink.IPVS_CMD_SET_SYNPROXY_SECRET)
    rc, out, err = run(capsys, "apply", str(write(tmp_path, text)), "--netns", "lb")
    if supported:
        assert rc == 0, err
        assert f"cookie secret set from {secret}" in out
    else:
        assert rc == 1
        assert "NotSupported" in err and "nothing was applied" in err
        assert dump() == []
    # group- or world-readable secrets are refused before anything happens
    os.chmod(secret, 0o640)
    rc, _, err = run(capsys, "apply", str(write(tmp_path, text)), "--netns", "lb")
    assert rc == 2 and "accessible to group or others" in err


def test_every_knob_of_the_loaded_modules_is_documented(
        clean: None, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "sysctl", "get", "--netns", "lb", "--json")
    assert rc == 0
    got = {k["name"]: k for k in json.loads(out)}
    assert got, out
    undocumented = [n for n, k in got.items() if k["meaning"] is None]
    assert undocumented == []
    for name, k in got.items():
        short = sysctl.short_name(name)
        if sysctl.KNOBS[short].default and short not in TOUCHED:
            assert k["value"] == k["default"], (name, "fresh namespace has the default")
    for n in ("fullnat_lport_min", "fullnat_lport_max", "fullnat_lport_tries", "fullnat_toa",
              "fullnat_mss_adjust"):
        assert f"net.ipv4.vs.{n}" in got


def test_sysctl_set_validates_and_writes(clean: None,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "sysctl", "set", "--netns", "lb", "sloppy_tcp=1",
                     "net.ipv4.vs.conn_reuse_mode=2")
    assert rc == 0
    assert out.splitlines() == ["net.ipv4.vs.sloppy_tcp = 1", "net.ipv4.vs.conn_reuse_mode = 2"]
    assert knobs()["sloppy_tcp"] == "1" and knobs()["conn_reuse_mode"] == "2"
    before = knobs()
    for bad in ("sloppy_tcp=2", "conn_reuse_mode=x", "nosuch=1", "sync_threshold=5 3"):
        rc, _, err = run(capsys, "sysctl", "set", "--netns", "lb", "sloppy_tcp=0", bad)
        assert rc == 2, (bad, err)
        assert knobs() == before
    rc, out, _ = run(capsys, "sysctl", "get", "--netns", "lb", "sloppy_tcp", "--describe")
    assert rc == 0 and out.startswith("net.ipv4.vs.sloppy_tcp = 1  # default 0:")


def test_stats_show_real_traffic(clean: None, tmp_path: Path,
                                 real_servers: dict[str, list[peers.HttpServer]],
                                 capsys: pytest.CaptureFixture[str]) -> None:
    text = f"""
services:
  - vip: {V4}:80
    scheduler: rr
    real_servers: [{{addr: {RS1}}}, {{addr: {RS2}}}]
"""
    assert apply_json(capsys, write(tmp_path, text))[0] == 0
    # Real servers deleted by earlier tests come back from IPVS's dest trash with
    # their old counters: take those as the baseline once two estimator ticks
    # have folded everything in.
    time.sleep(4.5)
    rc, out, _ = run(capsys, "stats", "--netns", "lb", "--json")
    assert rc == 0
    baseline = {(d["addr"], d["port"]): d["stats"]["conns"]
                for d in json.loads(out)["services"][0]["real_servers"]}
    for _ in range(4):
        peers.http_get(V4)
    for _ in range(10):  # the kernel folds per-CPU counters in every 2 s
        rc, out, _ = run(capsys, "stats", "--netns", "lb", "--json")
        assert rc == 0
        got = json.loads(out)
        if got["services"][0]["stats"]["conns"] == 4:
            break
        time.sleep(1)
    (svc,) = got["services"]
    assert svc["service"] == f"{V4}:80/tcp"
    assert svc["stats"]["conns"] == 4
    assert sorted(d["stats"]["conns"] - baseline[(d["addr"], d["port"])]
                  for d in svc["real_servers"]) == [2, 2]
    assert isinstance(got["ext_stats"], dict) and "fullnat_conn_new" in got["ext_stats"]
    rc, out, _ = run(capsys, "stats", "--netns", "lb", "--watch", "0.5", "--count", "2",
                     "--exact")
    assert rc == 0
    assert out.count(f"TCP {V4}:80 rr") == 2
    assert "fullnat_conn_new" in out and "Per second" in out
