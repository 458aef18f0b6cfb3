"""Host-side parts of the testbed that need no guest."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest

from ipvs_synproxy.build import kmod
from ipvs_synproxy_testbed import initramfs, junit, suite, topology, vm


def test_topology_matches_the_design_contract() -> None:
    hosts = {h.name: h for h in topology.HOSTS}
    assert topology.NETNS == ("client", "lb", "rs1", "rs2")

    def addrs(name: str) -> set[str]:
        return {a for i in hosts[name].ifaces for a in i.addrs}

    assert addrs("client") == {"198.51.100.2/24", "2001:db8:1::2/64"}
    assert addrs("rs1") == {"192.0.2.11/24", "2001:db8:2::11/64"}
    assert addrs("rs2") == {"192.0.2.12/24", "2001:db8:2::12/64"}
    lb = addrs("lb")
    for a in ("198.51.100.1/24", "198.51.100.10/32", "2001:db8:1::1/64",
              "2001:db8:1::10/128", "192.0.2.1/24", "2001:db8:2::1/64"):
        assert a in lb
    assert {f"192.0.2.{i}/32" for i in range(100, 104)} <= lb
    assert {f"2001:db8:2::{i}/128" for i in range(100, 104)} <= lb


def test_every_testbed_address_is_in_a_documentation_range() -> None:
    allowed = [ipaddress.ip_network(n) for n in
               ("198.51.100.0/24", "192.0.2.0/24", "2001:db8::/32")]
    for h in topology.HOSTS:
        for i in h.ifaces:
            for a in i.addrs:
                ip = ipaddress.ip_interface(a).ip
                assert any(ip in n for n in allowed), a


def test_interface_names_fit_the_kernel_limit() -> None:
    for h in topology.HOSTS:
        for i in h.ifaces:
            assert len(f"{h.name}-{i.name}") < 16


@pytest.mark.parametrize("line", [
    "[   11.768181] WARNING: CPU: 0 PID: 141 at net/netfilter/ipvs/ip_vs_core.c:11",
    "[    3.1] BUG: KASAN: slab-out-of-bounds in ip_vs_in+0x1/0x2",
    "[    3.1] BUG kmalloc-256 (Tainted: G  OE): Poison overwritten",
    "[    3.1] general protection fault, probably for non-canonical address",
    "[    3.1] Kernel panic - not syncing: panic_on_warn set ...",
    "[    3.1] Oops: 0000 [#1] PREEMPT SMP NOPTI",
    "[    3.1] watchdog: BUG: soft lockup - CPU#0 stuck for 22s!",
])
def test_kernel_complaints_are_recognised(line: str) -> None:
    assert vm.kernel_problems(line) == [line]


@pytest.mark.parametrize("line", [
    "[    0.0] SLUB: HWalign=64, Order=0-3, MinObjects=0, CPUs=2, Nodes=1",
    "[    9.1] ip_vs: loading out-of-tree module taints kernel.",
    "[    9.1] ip_vs: module verification failed: signature and/or required key missing",
    "[    9.2] IPVS: Registered protocols (TCP, UDP, SCTP, AH, ESP)",
    "[    0.0] Kernel command line: console=ttyS0 panic_on_warn=1 slub_debug=FZPU",
])
def test_ordinary_boot_lines_are_not_complaints(line: str) -> None:
    assert vm.kernel_problems(line) == []


def test_initramfs_archive_is_valid_newc(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "tool").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "init").write_bytes(b"x" * 5)
    archive = tmp_path / "a.cpio"
    archive.write_bytes(initramfs._newc_archive(root))
    listing = subprocess.run(["cpio", "-itv", "--quiet"], stdin=archive.open("rb"),
                             capture_output=True, text=True, check=True).stdout
    names = [ln.split()[-1] for ln in listing.splitlines()]
    assert names == ["bin", "bin/tool", "init", "dev/console"]
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["cpio", "-id", "--quiet", "bin/tool"], cwd=out,
                   stdin=archive.open("rb"), check=True)
    assert (out / "bin" / "tool").read_bytes() == b"#!/bin/sh\necho hi\n"


JUNIT = """<testsuites><testsuite>{}</testsuite></testsuites>"""


def test_junit_needs_at_least_one_executed_test() -> None:
    assert not junit.summarize(JUNIT.format("")).ok
    assert junit.summarize(JUNIT.format('<testcase classname="a" name="t"/>')).ok


def test_junit_rejects_failures_and_skips() -> None:
    failed = JUNIT.format('<testcase name="t"/><testcase name="u"><failure/></testcase>')
    skipped = JUNIT.format('<testcase name="t"/><testcase name="u"><skipped/></testcase>')
    assert junit.summarize(failed).failed == ["::u"]
    assert not junit.summarize(failed).ok
    assert not junit.summarize(skipped).ok


def test_junit_keeps_the_reason_of_a_failure_for_the_console() -> None:
    report = JUNIT.format('<testcase name="u"><failure message="AssertionError: 3 &lt; 4">'
                          'long traceback</failure></testcase>'
                          '<testcase name="v"><error>trace\nOSError: gone</error></testcase>'
                          f'<testcase name="w"><failure message="{"x" * 2000}"/></testcase>')
    s = junit.summarize(report)
    assert s.reasons["::u"] == "AssertionError: 3 < 4"
    assert s.reasons["::v"] == "OSError: gone"
    assert s.reasons["::w"].endswith(" [...]") and len(s.reasons["::w"]) < 1600


def test_guest_learns_where_the_hosts_stop_file_is(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    env = vm._env_file(vm.VmOptions(), None, tmp_path)
    assert f"export IPVS_SP_STOP_FILE={tmp_path / vm.STOP_FILE}\n" in env
    monkeypatch.setenv("IPVS_SP_STOP_FILE", str(tmp_path / vm.STOP_FILE))
    assert not vm.stop_requested()
    (tmp_path / vm.STOP_FILE).touch()
    assert vm.stop_requested()
    monkeypatch.delenv("IPVS_SP_STOP_FILE")
    assert not vm.stop_requested()


def test_qemu_forwards_only_the_asked_ports_to_loopback(tmp_path: Path) -> None:
    from ipvs_synproxy.build import kmod

    kernel = kmod.Kernel("6.1.0-0-amd64")
    argv = vm.qemu_command(kernel, tmp_path / "initrd", tmp_path,
                           vm.VmOptions(forward_ports=(8088,)))
    nic = argv[argv.index("-nic") + 1]
    assert nic.startswith("user,restrict=on,") and "hostfwd=tcp:127.0.0.1:8088-:8088" in nic
    argv = vm.qemu_command(kernel, tmp_path / "initrd", tmp_path, vm.VmOptions())
    assert argv[argv.index("-nic") + 1] == "none"


def test_a_failed_run_ends_with_the_running_test_and_where_it_broke() -> None:
    log = [
        "[   70.1] ipvs-synproxy test: tests/vm/test_a.py::test_one",
        "[   80.2] ipvs-synproxy test: tests/vm/test_b.py::test_two[x]",
        "[   90.3] WARNING: CPU: 1 PID: 7 at net/core/skbuff.c:123 skb_foo+0x1/0x2",
        "[   90.3] Modules linked in: ip_vs(O)",
        "[   90.3] RIP: 0010:skb_foo+0x1/0x2",
        "[   90.3] Call Trace:",
        "[   90.3]  <IRQ>",
        "[   90.3]  ip_vs_synproxy_timer+0x10/0x20 [ip_vs]",
        "[   90.3]  ? ip_vs_conn_expire+0x10/0x20 [ip_vs]",
        "[   90.3]  call_timer_fn+0x1/0x2",
    ]
    out = vm._summary(log, vm._first_problem(log))
    assert out[0] == "last test started: tests/vm/test_b.py::test_two[x]"
    assert out[1].startswith("first complaint: [   90.3] WARNING: CPU: 1")
    assert [ln.split("] ", 1)[1].strip() for ln in out[2:]] == [
        "WARNING: CPU: 1 PID: 7 at net/core/skbuff.c:123 skb_foo+0x1/0x2",
        "RIP: 0010:skb_foo+0x1/0x2",
        "ip_vs_synproxy_timer+0x10/0x20 [ip_vs]"]
    assert vm._first_problem(log[:2]) is None
    assert vm._summary(log[:2], None) == ["last test started: tests/vm/test_b.py::test_two[x]"]


def _fake_modules(tmp_path: Path, dep: str, builtin: str = "") -> kmod.Kernel:
    version = "6.99.0-test"
    mdir = tmp_path / version
    mdir.mkdir()
    (mdir / "modules.dep").write_text(dep)
    (mdir / "modules.builtin").write_text(builtin)
    return kmod.Kernel(version)


def test_initramfs_modules_come_after_their_dependencies_and_skip_builtins(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kmod.Kernel, "modules_dir", property(lambda k: tmp_path / k.version))
    kernel = _fake_modules(tmp_path, (
        "kernel/fs/9p/9p.ko.xz: kernel/fs/netfs/netfs.ko.xz kernel/net/9p/9pnet.ko.xz\n"
        "kernel/fs/netfs/netfs.ko.xz:\n"
        "kernel/net/9p/9pnet.ko.xz:\n"
        "kernel/net/9p/9pnet_virtio.ko.xz: kernel/net/9p/9pnet.ko.xz\n"
        "kernel/fs/overlayfs/overlay.ko.xz:\n"),
        builtin="kernel/drivers/virtio/virtio_pci.ko\nkernel/drivers/virtio/virtio.ko\n")
    names = [n for n, _ in initramfs.load_order(kernel)]
    assert names == ["9pnet", "9pnet_virtio", "netfs", "9p", "overlay"]
    assert all(names.index(d) < names.index("9p") for d in ("netfs", "9pnet"))


def test_a_module_neither_built_in_nor_listed_is_named(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kmod.Kernel, "modules_dir", property(lambda k: tmp_path / k.version))
    kernel = _fake_modules(tmp_path, "kernel/fs/9p/9p.ko: kernel/fs/netfs/netfs.ko\n")
    with pytest.raises(FileNotFoundError, match="virtio_pci"):
        initramfs.load_order(kernel)


def test_compressed_modules_are_stored_decompressed(tmp_path: Path) -> None:
    import lzma

    ko = tmp_path / "m.ko.xz"
    ko.write_bytes(lzma.compress(b"\x7fELF module"))
    assert initramfs._module_bytes(ko) == b"\x7fELF module"
    plain = tmp_path / "m.ko"
    plain.write_bytes(b"\x7fELF")
    assert initramfs._module_bytes(plain) == b"\x7fELF"


def _stand_in_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each queued run becomes a process that sleeps ``run.series`` seconds and
    notes in ``<log>.t`` when it started and ended."""
    def command(run: suite.Run, timeout: float, pytest_args: list[str]) -> list[str]:
        code = ("import sys, time; open(sys.argv[1], 'a').write(f'{time.time()} ');"
                "time.sleep(float(sys.argv[2])); open(sys.argv[1], 'a').write(f'{time.time()}')")
        return [sys.executable, "-c", code, str(run.log.with_suffix(".t")), run.series]

    monkeypatch.setattr(suite, "command", command)


def _spans(runs: list[suite.Run]) -> list[tuple[float, ...]]:
    return [tuple(map(float, r.log.with_suffix(".t").read_text().split())) for r in runs]


def test_the_guest_queue_runs_at_most_jobs_at_a_time_in_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With two slots the third run starts only after one of the first two ended."""
    _stand_in_jobs(monkeypatch)
    runs = [suite.Run(delay, tmp_path / f"{i}.xml", tmp_path / f"{i}.log")
            for i, delay in enumerate(["1.5", "0.2", "0.2"])]
    suite.run_queue(runs, 2, 60, [])
    spans = _spans(runs)
    assert all(r.returncode == 0 for r in runs)
    assert spans[1][0] < spans[0][1]  # the first two ran together
    assert spans[2][0] >= spans[1][1]  # the third waited for a free slot
    assert spans[2][0] < spans[0][1]  # ...and took it as soon as there was one


def test_the_guest_queue_runs_two_dkms_jobs_side_by_side(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """They compile on the host now: two one-vCPU guests share the two cores."""
    _stand_in_jobs(monkeypatch)
    runs = [suite.Run("0.5", tmp_path / f"{i}.xml", tmp_path / f"{i}.log", suite.DKMS)
            for i in range(2)]
    suite.run_queue(runs, 2, 60, [])
    first, second = _spans(runs)
    assert second[0] < first[1]
