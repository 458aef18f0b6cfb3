"""A plain, non-editable install works (docs/operator-guide.md §1.0.1).

A wheel built from the checkout's files (tracked, or new and not ignored: what
a clean clone of the next commit holds) is installed with pip into a fresh
virtualenv, its dependencies from the package index as an operator's would
be, and run from another directory: it renders keepalived.conf, exports the
DKMS tree of the newest supported kernel series and the modules build from
that tree. Nothing is written into the virtualenv or the current directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from ipvs_synproxy.build import kmod, paths
from ipvs_synproxy_testbed import debs

ROOT = paths.project_root()
EXAMPLE = ROOT / "tests/unit/data/keepalived/example.yaml"


@dataclass(frozen=True)
class Installed:
    target: Path    # the virtualenv
    cwd: Path

    def run(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        # The build cache is the checkout's, so that the kernel source is not
        # extracted again; where an installed copy caches by default is
        # tests/unit/test_paths.py's concern.
        env = {k: v for k, v in os.environ.items()
               if k not in ("IPVS_SYNPROXY_ROOT", "PYTHONPATH", "VIRTUAL_ENV")}
        env["IPVS_SYNPROXY_BUILD"] = str(paths.build_dir())
        return subprocess.run([str(self.target / "bin/ipvs-synproxy"), *args],
                              cwd=self.cwd, env=env, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def files(self) -> set[Path]:
        return {p for d in (self.target, self.cwd) for p in d.rglob("*")
                if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    base = tmp_path_factory.mktemp("install")
    src, dist, target, cwd = (base / d for d in ("src", "dist", "target", "cwd"))
    debs.copy_checkout(src)
    subprocess.run([sys.executable, "-m", "pip", "-q", "wheel", "--no-deps",
                    "--no-build-isolation", "-w", str(dist), str(src)],
                   check=True, capture_output=True, timeout=300)
    wheel = next(dist.glob("ipvs_synproxy-*.whl"))
    subprocess.run(["python3", "-m", "venv", str(target)], check=True, capture_output=True,
                   timeout=300)
    subprocess.run([str(target / "bin/pip"), "-q", "install", str(wheel)], check=True,
                   capture_output=True, timeout=600)
    cwd.mkdir()
    return Installed(target, cwd)


def test_the_installed_copy_runs_from_its_own_files(installed: Installed) -> None:
    res = installed.run("--version")
    assert res.returncode == 0 and res.stdout.startswith("ipvs-synproxy "), res
    code = ("import ipvs_synproxy, webui; from ipvs_synproxy.build import paths; "
            "print(ipvs_synproxy.__file__, webui.__file__, paths.data_root())")
    out = subprocess.run([str(installed.target / "bin/python"), "-c", code],
                         cwd=installed.cwd, capture_output=True, text=True,
                         check=True).stdout.split()
    assert all(p.startswith(str(installed.target)) for p in out), out


def test_the_installed_copy_renders_keepalived_conf(installed: Installed) -> None:
    before = installed.files()
    res = installed.run("keepalived", "render", str(EXAMPLE))
    assert res.returncode == 0, res.stderr
    assert "virtual_server 198.51.100.10 80" in res.stdout
    assert "syn_proxy" in res.stdout
    assert installed.files() == before


def test_the_installed_copy_exports_a_dkms_tree_that_builds(
        installed: Installed, tmp_path: Path) -> None:
    """The newest series: the export is the same code for each, and every
    series' tree is compiled by DKMS from the package in test_dkms."""
    series = kmod.default_series()
    kernel = kmod.ensure_toolchain(series)
    before = installed.files()
    tree = tmp_path / "ipvs-synproxy-src"
    res = installed.run("kmod", "dkms-tree", str(tree), "--kernel", series)
    assert res.returncode == 0, res.stderr
    assert installed.files() == before
    patched = (tree / "net/netfilter/ipvs/ip_vs_synproxy.c")
    assert patched.is_file(), "the tree lacks the SYN proxy: the patches were not applied"
    assert 'PACKAGE_VERSION="0.1.0"' in (tree / "dkms.conf").read_text() or \
        "PACKAGE_VERSION=" in (tree / "dkms.conf").read_text()
    version = installed.run("--version").stdout.split()[1]
    assert f'PACKAGE_VERSION="{version}"' in (tree / "dkms.conf").read_text()
    subprocess.run(["make", "-C", str(tree), f"-j{os.cpu_count() or 1}",
                    f"KVER={kernel.version}"], check=True, capture_output=True, timeout=900)
    built = {p.stem for p in (tree / "net/netfilter/ipvs").glob("*.ko")}
    assert {"ip_vs", "ip_vs_rr"} <= built, built
    # dkms.conf lists exactly what the tree builds for this kernel's configuration
    listed = {line.split("=", 1)[1].strip('"')
              for line in (tree / "dkms.conf").read_text().splitlines()
              if line.startswith("BUILT_MODULE_NAME[")}
    assert listed == built
    # dkms.conf lists exactly what the tree builds for this kernel's configuration
    listed = {line.split("=", 1)[1].strip('"')
              for line in (tree / "dkms.conf").read_text().splitlines()
              if line.startswith("BUILT_MODULE_NAME[")}
    assert listed == built
