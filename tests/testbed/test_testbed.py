"""The testbed contract (DESIGN.md): what `ipvs-synproxy vm exec` promises, on
every supported kernel series apt serves (the same topology, the same contract)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ipvs_synproxy.build import kmod, paths

HERE = Path(__file__).parent


@pytest.fixture(scope="module", params=kmod.served_series())
def series(request: pytest.FixtureRequest) -> str:
    """Each supported kernel series apt serves: every test here runs on each."""
    return str(request.param)


def vm_exec(series: str, *args: str, timeout: float = 600
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ipvs_synproxy.cli", "vm", "exec", "--kernel", series, *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )


# A guest boot costs most of a minute in TCG: the contract's questions to a
# guest with the patched modules share one boot, each answer in its own
# section of stdout. (`--modules stock` is checked by the DKMS test, whose
# boot starts with the distribution's modules.)
SECTION = "=="
MODULES = ("modprobe ip_vs_wlc && cat /sys/module/ip_vs/taint /sys/module/ip_vs_wlc/taint"
           " && modinfo -n ip_vs ip_vs_wlc")
PATCHED_SCRIPT = f"""
ip netns list; echo {SECTION}
cat /proc/cmdline; echo {SECTION}
for d in /sys/class/net/*; do echo "${{d##*/}} $(readlink -f "$d")"; done; echo {SECTION}
{MODULES} || exit 99; echo {SECTION}
echo out; echo err >&2; exit 7
"""


def sections(res: subprocess.CompletedProcess[str]) -> list[str]:
    return res.stdout.split(f"{SECTION}\n")


@pytest.fixture(scope="module")
def patched(series: str) -> subprocess.CompletedProcess[str]:
    """One boot with the topology and this project's modules."""
    return vm_exec(series, "--topology", "--", "sh", "-c", PATCHED_SCRIPT)


def test_topology_has_the_four_hosts(patched: subprocess.CompletedProcess[str]) -> None:
    assert patched.returncode == 7, patched.stderr
    names = {line.split()[0] for line in sections(patched)[0].splitlines() if line.strip()}
    assert names == {"client", "lb", "rs1", "rs2"}


def test_command_status_is_passed_through(patched: subprocess.CompletedProcess[str]) -> None:
    assert patched.returncode == 7
    # stdout is the command's own, whole: five sections and nothing around them
    assert len(sections(patched)) == 5 and sections(patched)[-1] == "out\n", patched.stdout
    assert "err" in patched.stderr


def test_guest_boots_with_the_contract_flags_and_no_network_device(
        patched: subprocess.CompletedProcess[str]) -> None:
    assert patched.returncode == 7, patched.stderr
    cmdline, ifaces = sections(patched)[1:3]
    assert "slub_debug=FZPU" in cmdline and "panic_on_warn=1" in cmdline
    # No NIC: lo and the topology's bridges and veth ends are all the root
    # namespace has, every one a virtual device (a NIC sits on a bus).
    devices = dict(line.split() for line in ifaces.splitlines())
    assert "lo" in devices, ifaces
    assert all(p.startswith("/sys/devices/virtual/net/") for p in devices.values()), ifaces


def test_patched_modules_are_the_ones_loaded(patched: subprocess.CompletedProcess[str]) -> None:
    assert patched.returncode == 7, patched.stderr
    taint_vs, taint_wlc, path_vs, path_wlc = sections(patched)[3].split()
    # Out-of-tree modules taint with O; the kernel's own request_module path
    # (modprobe of a scheduler) must resolve to our build too.
    assert "O" in taint_vs and "O" in taint_wlc
    assert "updates/ipvs-synproxy" in path_vs and "updates/ipvs-synproxy" in path_wlc


@pytest.fixture
def warn_module(series: str) -> Path:
    kernel = kmod.ensure_toolchain(series)
    # Build inside the read-write build cache so the guest can reach the .ko.
    out = paths.build_dir() / "test-kmods" / kernel.version / "warn"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(HERE / "warn_kmod", out)
    subprocess.run(["make", "-C", str(kernel.build_tree), f"M={out}", "modules"],
                   check=True, capture_output=True)
    return out / "sp_warn.ko"


def test_guest_kernel_warning_fails_the_run(series: str, warn_module: Path) -> None:
    res = vm_exec(series, "--", "insmod", str(warn_module))
    assert res.returncode != 0
    assert "deliberate warning" in res.stderr
    assert "kernel problems" in res.stderr


def test_unchanged_series_is_not_rebuilt(series: str) -> None:
    kmod.build(series=series)
    again = kmod.build(series=series)
    assert not again.rebuilt
    assert (again.directory / "manifest.json").exists()


def _patch(tmp: Path, name: str, body: str) -> Path:
    p = tmp / name
    p.write_text(body)
    return p


BREAKS_COMPILE = """\
--- a/net/netfilter/ipvs/ip_vs_rr.c
+++ b/net/netfilter/ipvs/ip_vs_rr.c
@@ -17,2 +17,3 @@
 #define KMSG_COMPONENT "IPVS"
 #define pr_fmt(fmt) KMSG_COMPONENT ": " fmt
+#error deliberately broken
"""

DOES_NOT_APPLY = """\
--- a/net/netfilter/ipvs/ip_vs_rr.c
+++ b/net/netfilter/ipvs/ip_vs_rr.c
@@ -1,3 +1,3 @@
-this line is not in the file
+neither is this
 nor this
"""


def test_patch_that_does_not_apply_is_named(tmp_path: Path, series: str) -> None:
    bad = _patch(tmp_path, "0001-does-not-apply.patch", DOES_NOT_APPLY)
    with pytest.raises(kmod.KmodError, match=r"patch 0001-does-not-apply\.patch does not apply"):
        kmod.build(patches=[bad], series=series)


def test_patch_that_does_not_compile_is_named_and_nothing_is_cached(
        tmp_path: Path, series: str) -> None:
    bad = _patch(tmp_path, "0001-breaks.patch", BREAKS_COMPILE)
    kernel = kmod.find_kernel(series)
    key = kmod.series_key([bad], kernel)
    with pytest.raises(kmod.KmodError, match=r"patch 0001-breaks\.patch does not compile"):
        kmod.build(patches=[bad], series=series)
    out = kmod.cached_build(kernel, key)
    assert not out.exists()
    assert not list(out.parent.glob(f".build-{key}-*"))
