"""The Debian packages, per supported kernel series: ``make deb``'s packages
(built here by the same code, from the checkout's files, once for both
series) install with
``dpkg -i`` in the guest, whose root is an overlay of the host's. Debian's
dkms, run by ipvs-synproxy-dkms's and toa-dkms's own postinst, installs the
modules for the running kernel; ``modprobe ip_vs`` then loads this project's
modules (every one of them, not the distribution's); the command of
ipvs-synproxy-apply.service, run as systemd would run it but without systemd,
sets up a SYN-proxy FULLNAT service and its sysctls from
/etc/ipvs-synproxy/ipvs.yaml in ``lb``, and a client is served. Before the
install, the same boot shows that ``vm exec --modules stock`` gives the
distribution's own modules (the testbed contract: one guest boot costs most of
a minute, so the check shares this one), and that the distribution's IPVS as
the backup of a pair takes the sync messages our master sends
(tests/testbed/stock_backup.py).

Why DKMS compiles on the host: the guest's root is the host's (same dkms, gcc
and headers), and a TCG guest compiles some fifteen times slower than the
host, eight minutes a series. So ``dkms build`` runs here, for the series
under test, from the package's own /usr/src tree (unpacked in a temporary
directory), with /var/lib/dkms on a tmpfs of a private mount namespace
(nothing lands on the host, not even the MOK key DKMS makes). ``dkms
mktarball`` packs source and modules, and the tarball goes where a DKMS
package's postinst looks for prebuilt modules
(/usr/share/PACKAGE/NAME-VERSION.dkms.tar.gz, DKMS's own binary-module
route): the postinst loads it instead of building, then installs the
modules. The guest has the headers of the running kernel only, as a balancer
would (the other series' are hidden), so the postinst does not build for the
newest installed kernel too."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from ipvs_synproxy.build import apt, kmod
from ipvs_synproxy_testbed import debs as deb_build
from ipvs_synproxy_testbed import deps, topology

VERSION = "0.1.0"
CONFIG = f"""\
sysctl:
  fullnat_lport_min: 2048
services:
  - vip: {topology.VIP4}:80
    scheduler: rr
    synproxy: true
    forward: fullnat
    laddrs: [{topology.LADDRS4[0]}]
    real_servers:
      - {{addr: {topology.RS4["rs1"]}}}
      - {{addr: {topology.RS4["rs2"]}}}
"""


def prebuild(deb_dir: Path, out: Path, kernel: str) -> None:
    """``dkms add``, ``dkms build`` and ``dkms mktarball`` of both DKMS
    packages' trees for ``kernel``, /var/lib/dkms private: ``out/PKG/`` gets
    the DKMS tarball (source and built modules) that a package's postinst loads
    instead of building when it finds it in /usr/share/PKG/."""
    dkms_debs = " ".join(shlex.quote(str(p)) for p in sorted(deb_dir.glob("*-dkms_*.deb")))
    k = shlex.quote(kernel)
    script = f"""set -e
mount -t tmpfs dkms-test /var/lib/dkms
root=$(mktemp -d)
for d in {dkms_debs}; do dpkg-deb -x "$d" "$root"; done
for m in ipvs-synproxy toa; do
    dkms add --sourcetree "$root/usr/src" -m $m -v {VERSION}
    dkms build --sourcetree "$root/usr/src" -m $m -v {VERSION} -k {k}
    dkms mktarball --sourcetree "$root/usr/src" -m $m -v {VERSION} -k {k}
    mkdir -p {shlex.quote(str(out))}/$m-dkms
    cp /var/lib/dkms/$m/{VERSION}/tarball/*.dkms.tar.gz \
        {shlex.quote(str(out))}/$m-dkms/$m-{VERSION}.dkms.tar.gz
done
rm -rf "$root"
"""
    out.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                          script], capture_output=True, text=True, timeout=900, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.mark.parametrize("series", kmod.SUPPORTED_SERIES)
def test_a_dkms_install_in_the_guest_loads_our_modules_and_serves(
        tmp_path: Path, series: str) -> None:
    apt.ensure_debs(["dkms", *deps.DEB_DEBS])
    kernel = kmod.ensure_toolchain(series)
    debs = deb_build.build_cached()
    names = {d.name.split("_")[0]: d for d in debs}
    assert set(deb_build.PACKAGES) <= set(names), names
    for field, want in (("Conflicts", "keepalived"), ("Provides", "keepalived")):
        got = subprocess.run(["dpkg-deb", "-f", str(names["keepalived-synproxy"]), field],
                             capture_output=True, text=True, check=True).stdout.strip()
        assert got == want, (field, got)
    prebuilt = tmp_path / "prebuilt"
    prebuild(debs[0].parent, prebuilt, kernel.version)
    tree = tmp_path / "tree"
    subprocess.run(["dpkg-deb", "-x", str(names["ipvs-synproxy-dkms"]), str(tree)], check=True)
    conf = (tree / f"usr/src/ipvs-synproxy-{VERSION}/dkms.conf").read_text()
    assert f'    {series}.*) SERIES="{series}" ;;' in conf, conf
    branch = conf.split(f'if [ "$SERIES" = "{series}" ]; then\n')[1].split("\nfi\n")[0]
    modules = re.findall(r'BUILT_MODULE_NAME\[\d+\]="(\w+)"', branch)
    config = tmp_path / "ipvs.yaml"
    config.write_text(CONFIG)
    install = " ".join(shlex.quote(str(names[p])) for p in deb_build.PACKAGES)
    k = shlex.quote(kernel.version)
    script = f"""
set -e
modprobe ip_vs_wlc
echo "stock: $(modinfo -n ip_vs) $(modinfo -n ip_vs_wlc) taint=$(cat /sys/module/ip_vs/taint)\
$(cat /sys/module/ip_vs_wlc/taint)"
python -m tests.testbed.stock_backup
modprobe -r ip_vs_rr ip_vs_wlc ip_vs
for d in /lib/modules/*/build; do
    [ "$d" = /lib/modules/{k}/build ] || mount -t tmpfs hidden "$d"
done
cp -a {shlex.quote(str(prebuilt))}/. /usr/share/
rm -f /var/lib/man-db/auto-update     # man-db's index: minutes under TCG, not the test
export DEBIAN_FRONTEND=noninteractive
dpkg -i {install} > /tmp/dpkg.log 2>&1 || {{ sed 's/^/dpkg: /' /tmp/dpkg.log; exit 1; }}
sed 's/^/dpkg: /' /tmp/dpkg.log
dkms status -m ipvs-synproxy -k {k} | sed 's/^/status: /'
dkms status -m toa -k {k} | sed 's/^/status: /'
for m in {" ".join(modules)} toa; do
    echo "module: $m $(modinfo -n $m) $(modinfo -F version $m)"
done
echo "version: $(/usr/sbin/ipvs-synproxy --version)"
echo "keepalived: $(/usr/sbin/keepalived --version 2>&1 | grep -o 'INIT=systemd SYSTEMD_NOTIFY')"
/usr/sbin/ipvs-synproxy check /etc/nonexistent.yaml > /tmp/check.log 2>&1 || \
    echo "check-missing: $?"
mkdir -p /etc/ipvs-synproxy
cp {shlex.quote(str(config))} /etc/ipvs-synproxy/ipvs.yaml
unit=/lib/systemd/system/ipvs-synproxy-apply.service
pre=$(sed -n 's/^ExecStartPre=//p' $unit)
cmd=$(sed -n 's/^ExecStart=//p' $unit)
echo "unit: $cmd"
ip netns exec lb $pre
ip netns exec lb $cmd > /tmp/apply.log 2>&1 || {{ sed 's/^/apply: /' /tmp/apply.log; exit 1; }}
sed 's/^/apply: /' /tmp/apply.log
echo "modinfo: $(modinfo -n ip_vs) taint=$(cat /sys/module/ip_vs/taint)"
echo "lport_min: $(ip netns exec lb cat /proc/sys/net/ipv4/vs/fullnat_lport_min)"
ip netns exec lb /usr/sbin/ipvsadm-sp -S -n | sed 's/^/table: /'
# The exporter's unit claims CAP_NET_ADMIN is all it needs: run its command as
# nobody with only that capability, as systemd's DynamicUser would.
exporter=$(sed -n 's/^ExecStart=//p' /lib/systemd/system/ipvs-synproxy-exporter.service)
echo "exporter-unit: $exporter"
ip netns exec lb setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=+net_admin \
    --ambient-caps=+net_admin $exporter --once > /tmp/exporter.txt 2>&1 || echo "exporter-rc: $?"
grep -E '^ipvs_synproxy_(up|service_info)' /tmp/exporter.txt | sed 's/^/exporter: /'
ip netns exec lb setpriv --reuid=65534 --regid=65534 --clear-groups $exporter --once \
    > /dev/null 2>&1 || echo "exporter-unprivileged-rc: $?"
python -m tests.testbed.dkms_guest
"""
    # One vCPU: the install is a shell script, and two guests of two vCPUs each
    # on two cores wait for each other's vCPUs (TCG) instead of running side by side.
    res = subprocess.run(
        [sys.executable, "-m", "ipvs_synproxy.cli", "vm", "exec", "--kernel", series,
         "--modules", "stock", "--topology", "--cpus", "1", "--timeout", "1200", "--",
         "sh", "-c", script],
        capture_output=True, text=True, timeout=1500, check=False)
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
    for module in ("ipvs-synproxy", "toa"):
        assert re.search(rf"^status: {module}/{re.escape(VERSION)}, "
                         rf"{re.escape(kernel.version)}, x86_64: installed$", res.stdout,
                         re.M), res.stdout
    assert re.search(r"^version: ipvs-synproxy 0\.1\.0 ", res.stdout, re.M), res.stdout
    # keepalived-synproxy talks to systemd (its unit is Type=notify)
    assert re.search(r"^keepalived: INIT=systemd SYSTEMD_NOTIFY$", res.stdout, re.M), res.stdout
    assert re.search(r"^check-missing: 2$", res.stdout, re.M), res.stdout
    assert "unit: /usr/sbin/ipvs-synproxy apply /etc/ipvs-synproxy/ipvs.yaml" in res.stdout
    assert re.search(r"^apply: applied$", res.stdout, re.M), res.stdout
    assert re.search(r"^lport_min: 2048$", res.stdout, re.M), res.stdout
    assert "exporter-unit: /usr/sbin/ipvs-synproxy exporter" in res.stdout, res.stdout
    assert "exporter-rc" not in res.stdout, res.stdout
    assert re.search(r"^exporter: ipvs_synproxy_up 1\.0$", res.stdout, re.M), res.stdout
    info = re.findall(r"^exporter: ipvs_synproxy_service_info\{(.*)\} 1\.0$", res.stdout, re.M)
    assert [dict(re.findall(r'(\w+)="([^"]*)"', labels)) for labels in info] == [
        {"vip": topology.VIP4, "port": "80", "protocol": "tcp", "scheduler": "rr",
         "syn_proxy": "on"}], res.stdout
    # without the capability the kernel refuses the read: no numbers, exit 1
    assert re.search(r"^exporter-unprivileged-rc: 1$", res.stdout, re.M), res.stdout
    table = re.findall(r"^table: (.*)$", res.stdout, re.M)
    assert f"-A -t {topology.VIP4}:80 -s rr --synproxy" in table, table
    assert f"--laddr-add {topology.LADDRS4[0]} -t {topology.VIP4}:80" in table, table
    # DKMS installed every module over the kernel's (it keeps the kernel's
    # copy of a module whose version equals it), each with our version.
    installed = re.findall(r"^module: (\w+) (\S+) ?(\S*)$", res.stdout, re.M)
    assert [m for m, _, _ in installed] == [*modules, "toa"], res.stdout
    for name, path, version in installed:
        assert path.startswith(f"/lib/modules/{kernel.version}/updates/dkms/{name}.ko"), path
        if name != "toa":
            assert version == "1.2.1-synproxy", (name, version)
    where = re.search(r"^modinfo: (\S+) taint=(\S*)$", res.stdout, re.M)
    assert where, res.stdout
    assert f"/lib/modules/{kernel.version}/updates/dkms/ip_vs.ko" in where.group(1)
    assert "O" in where.group(2)  # out of tree: ours, not the distribution's
    assert re.search(r"^service .* synproxy=True dests=\['192.0.2.11', '192.0.2.12'\] "
                     r"fwd=\['FULLNAT'\]$", res.stdout, re.M), res.stdout
    served = re.findall(r"^served by (rs[12]) \(saw (\S+)\)$", res.stdout, re.M)
    assert len(served) == 4 and {s for s, _ in served} == {"rs1", "rs2"}, res.stdout
    counters = dict(re.findall(r"^(synproxy_\w+) (\d+)$", res.stdout, re.M))
    assert int(counters["synproxy_cookie_sent"]) >= 4, res.stdout
    assert int(counters["synproxy_conn_proxied"]) >= 4, res.stdout
