"""A DKMS install, per supported kernel series: Debian's dkms adds and builds
the exported tree on the host, installs it inside the guest, ``modprobe ip_vs``
then loads this project's modules (every one of them, not the distribution's),
and a SYN-proxy FULLNAT service serves a client with them. Before the install,
the same boot shows that ``vm exec --modules stock`` gives the distribution's
own modules (the testbed contract: one guest boot costs most of a minute, so
the check shares this one), and that the distribution's IPVS as the backup
of a pair takes the sync messages our master sends (tests/testbed/stock_backup.py).

Why the build runs on the host: the guest's root is the host's (same dkms, gcc
and headers), and a TCG guest compiles some fifteen times slower than the
host, eight minutes a series. DKMS's build does not depend on the running
kernel; its install (version check, depmod) and the load do, and run in the
guest. The build's only mark on the host, the MOK key DKMS makes to sign the
modules, stays in a private mount of /var/lib/dkms."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from ipvs_synproxy.build import apt, kmod

VERSION = "0.0+dkmstest"
PACKAGE = f"ipvs-synproxy/{VERSION}"


def dkms_build(dkms_opts: list[str], kernel: str) -> None:
    """``dkms add`` and ``dkms build`` of this project's tree in the source
    tree ``dkms_opts`` name, for ``kernel``, on the host, /var/lib/dkms private."""
    script = (f'mount -t tmpfs dkms-test /var/lib/dkms && dkms add "$@" -m {PACKAGE} && '
              f'dkms build "$@" -m {PACKAGE} -k {shlex.quote(kernel)}')
    res = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                          script, "dkms-build", *dkms_opts],
                         capture_output=True, text=True, timeout=900, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.mark.parametrize("series", kmod.SUPPORTED_SERIES)
def test_a_dkms_install_in_the_guest_loads_our_modules_and_serves(
        tmp_path: Path, series: str) -> None:
    apt.ensure_debs(["dkms"])
    kernel = kmod.ensure_toolchain(series)
    source_tree = tmp_path / "src"
    dkms_opts = ["--dkmstree", str(tmp_path / "dkms"), "--sourcetree", str(source_tree)]
    source_tree.mkdir()
    (tmp_path / "dkms").mkdir()
    tree = kmod.export_tree(source_tree / f"ipvs-synproxy-{VERSION}", VERSION, series)
    conf = (tree / "dkms.conf").read_text()
    assert f'BUILD_EXCLUSIVE_KERNEL="{kmod.dkms_exclusive(series)}"' in conf
    modules = re.findall(r'^BUILT_MODULE_NAME\[\d+\]="(\w+)"$', conf, re.M)
    dkms_build(dkms_opts, kernel.version)
    k = shlex.quote(kernel.version)
    opts = " ".join(shlex.quote(o) for o in dkms_opts)
    script = f"""
set -e
modprobe ip_vs_wlc
echo "stock: $(modinfo -n ip_vs) $(modinfo -n ip_vs_wlc) taint=$(cat /sys/module/ip_vs/taint)\
$(cat /sys/module/ip_vs_wlc/taint)"
python -m tests.testbed.stock_backup
modprobe -r ip_vs_rr ip_vs_wlc ip_vs
dkms install {opts} -m {PACKAGE} -k {k}
dkms status {opts} -m {PACKAGE} -k {k} | sed 's/^/status: /'
for m in {" ".join(modules)}; do echo "module: $m $(modinfo -n $m) $(modinfo -F version $m)"; done
modprobe ip_vs
echo "modinfo: $(modinfo -n ip_vs) taint=$(cat /sys/module/ip_vs/taint)"
python -m tests.testbed.dkms_guest
"""
    # One vCPU: the install is a shell script, and two guests of two vCPUs each
    # on two cores wait for each other's vCPUs (TCG) instead of running side by side.
    res = subprocess.run(
        [sys.executable, "-m", "ipvs_synproxy.cli", "vm", "exec", "--kernel", series,
         "--modules", "stock", "--topology", "--cpus", "1", "--timeout", "900", "--",
         "sh", "-c", script],
        capture_output=True, text=True, timeout=1200, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # Before the install, `vm exec --modules stock` booted the distribution's
    # signed modules (no taint), the kernel's request for a scheduler too.
    stock = re.search(r"^stock: (\S+) (\S+) taint=(\S*)$", res.stdout, re.M)
    assert stock, res.stdout
    assert f"/lib/modules/{kernel.version}/kernel/" in stock.group(1), stock.group(0)
    assert f"/lib/modules/{kernel.version}/kernel/" in stock.group(2), stock.group(0)
    assert "O" not in stock.group(3), stock.group(0)
    # A stock backup gets what our master sends: it skips our options without
    # a word and holds the NAT connections (the FULLNAT one it cannot forward)
    held = dict(re.findall(r"^stock-backup: (\d+) (\S+)$", res.stdout, re.M))
    assert held.get("42000") == held.get("42002") == "ESTABLISHED", res.stdout
    assert "stock-backup-complaint" not in res.stdout, res.stdout
    assert re.search(rf"^status: ipvs-synproxy/{re.escape(VERSION)}, "
                     rf"{re.escape(kernel.version)}, x86_64: installed$", res.stdout, re.M), \
        res.stdout
    # DKMS installed every module over the kernel's (it keeps the kernel's
    # copy of a module whose version equals it), each with our version.
    installed = re.findall(r"^module: (\w+) (\S+) (\S+)$", res.stdout, re.M)
    assert [m for m, _, _ in installed] == modules, res.stdout
    for name, path, version in installed:
        assert path.startswith(f"/lib/modules/{kernel.version}/updates/dkms/{name}.ko"), path
        assert version == "1.2.1-synproxy", (name, version)
    where = re.search(r"^modinfo: (\S+) taint=(\S*)$", res.stdout, re.M)
    assert where, res.stdout
    assert f"/lib/modules/{kernel.version}/updates/dkms/ip_vs.ko" in where.group(1)
    assert "O" in where.group(2)  # out of tree: ours, not the distribution's
    served = re.findall(r"^served by (rs[12]) \(saw (\S+)\)$", res.stdout, re.M)
    assert len(served) == 4 and {s for s, _ in served} == {"rs1", "rs2"}, res.stdout
    counters = dict(re.findall(r"^(synproxy_\w+) (\d+)$", res.stdout, re.M))
    assert int(counters["synproxy_cookie_sent"]) >= 4, res.stdout
    assert int(counters["synproxy_conn_proxied"]) >= 4, res.stdout
