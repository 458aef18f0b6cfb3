"""A DKMS install inside the guest, per supported kernel series: Debian's dkms
adds, builds and installs the exported tree, ``modprobe ip_vs`` then loads this
project's modules (not the distribution's), and a SYN-proxy FULLNAT service
serves a client with them. Before the install, the same boot shows
that ``vm exec --modules stock`` gives the distribution's own modules (the
testbed contract: one guest boot costs most of a minute, so the check shares
this one)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from ipvs_synproxy.build import apt, kmod

VERSION = "0.0+dkmstest"


@pytest.mark.parametrize("series", kmod.SUPPORTED_SERIES)
def test_a_dkms_install_in_the_guest_loads_our_modules_and_serves(
        tmp_path: Path, series: str) -> None:
    apt.ensure_debs(["dkms"])
    kernel = kmod.ensure_toolchain(series)
    tree = kmod.export_tree(tmp_path / f"ipvs-synproxy-{VERSION}", VERSION, series)
    conf = (tree / "dkms.conf").read_text()
    assert f'BUILD_EXCLUSIVE_KERNEL="{kmod.dkms_exclusive(series)}"' in conf
    k = shlex.quote(kernel.version)
    script = f"""
set -e
modprobe ip_vs_wlc
echo "stock: $(modinfo -n ip_vs) $(modinfo -n ip_vs_wlc) taint=$(cat /sys/module/ip_vs/taint)\
$(cat /sys/module/ip_vs_wlc/taint)"
modprobe -r ip_vs_wlc ip_vs
dkms add {shlex.quote(str(tree))}
dkms build ipvs-synproxy/{VERSION} -k {k}
dkms install ipvs-synproxy/{VERSION} -k {k}
modprobe ip_vs
echo "modinfo: $(modinfo -n ip_vs) taint=$(cat /sys/module/ip_vs/taint)"
modinfo -F version ip_vs_rr >/dev/null
python -m tests.testbed.dkms_guest
"""
    res = subprocess.run(
        [sys.executable, "-m", "ipvs_synproxy.cli", "vm", "exec", "--kernel", series,
         "--modules", "stock", "--topology", "--timeout", "1500", "--", "sh", "-c", script],
        capture_output=True, text=True, timeout=1800, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # Before the install, `vm exec --modules stock` booted the distribution's
    # signed modules (no taint), the kernel's request for a scheduler too.
    stock = re.search(r"^stock: (\S+) (\S+) taint=(\S*)$", res.stdout, re.M)
    assert stock, res.stdout
    assert f"/lib/modules/{kernel.version}/kernel/" in stock.group(1), stock.group(0)
    assert f"/lib/modules/{kernel.version}/kernel/" in stock.group(2), stock.group(0)
    assert "O" not in stock.group(3), stock.group(0)
    where = re.search(r"^modinfo: (\S+) taint=(\S*)$", res.stdout, re.M)
    assert where, res.stdout
    assert f"/lib/modules/{kernel.version}/updates/dkms/ip_vs.ko" in where.group(1)
    assert "O" in where.group(2)  # out of tree: ours, not the distribution's
    served = re.findall(r"^served by (rs[12]) \(saw (\S+)\)$", res.stdout, re.M)
    assert len(served) == 4 and {s for s, _ in served} == {"rs1", "rs2"}, res.stdout
    counters = dict(re.findall(r"^(synproxy_\w+) (\d+)$", res.stdout, re.M))
    assert int(counters["synproxy_cookie_sent"]) >= 4, res.stdout
    assert int(counters["synproxy_conn_proxied"]) >= 4, res.stdout
