"""The Debian packaging agrees with the project: one version, the packages
``make deb`` promises, units that run what exists."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from ipvs_synproxy.cli import docs
from ipvs_synproxy.cli import main as cli
from ipvs_synproxy_testbed import debs

ROOT = Path(__file__).resolve().parents[2]
DEBIAN = ROOT / "debian"


def test_one_version_for_the_wheel_and_the_packages() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    first = (DEBIAN / "changelog").read_text().splitlines()[0]
    assert re.match(rf"^ipvs-synproxy \({re.escape(project)}\) ", first), (project, first)


def test_control_declares_the_packages_make_deb_checks_for() -> None:
    control = (DEBIAN / "control").read_text()
    declared = re.findall(r"^Package: (\S+)$", control, re.M)
    assert sorted(declared) == sorted(debs.PACKAGES)
    keepalived = control.split("Package: keepalived-synproxy")[1]
    for field in ("Conflicts: keepalived", "Replaces: keepalived", "Provides: keepalived"):
        assert field in keepalived


def test_units_run_commands_that_exist() -> None:
    parser = cli.build_parser()
    leaves = {" ".join(w) for w, _, _ in docs.commands(parser)}
    for unit in DEBIAN.glob("ipvs-synproxy.*.service"):
        text = unit.read_text()
        start = re.search(r"^ExecStart=/usr/sbin/ipvs-synproxy (\S+)", text, re.M)
        assert start and start.group(1) in leaves, (unit.name, start)
    apply = (DEBIAN / "ipvs-synproxy.ipvs-synproxy-apply.service").read_text()
    assert "After=systemd-modules-load.service" in apply and "Before=keepalived.service" in apply
    assert "Type=notify" in (DEBIAN / "keepalived-synproxy.keepalived.service").read_text()
