"""Install the Debian packages a command needs, once, and only when missing.

Every step that needs a system package calls :func:`ensure_debs` with its own
list first. On a balancer nothing is installed unasked: a missing package is
an error that names it, unless the operator passed ``--install-deps`` (which
calls :func:`allow_install`) or IPVS_SYNPROXY_INSTALL_DEPS=1 is set, as the
Makefile and the testbed do, so that a fresh machine (CI, a new developer box)
needs nothing but ``make``. This module knows no caller's packages: it imports
nothing of the project.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

_apt_updated = False
# Seconds to wait for another apt or dpkg (unattended-upgrades, a second build) to finish.
LOCK_WAIT = 600


ALLOW_ENV = "IPVS_SYNPROXY_INSTALL_DEPS"


class DependencyError(RuntimeError):
    """A required system package is missing or could not be installed."""


def install_allowed() -> bool:
    return os.environ.get(ALLOW_ENV) == "1"


def allow_install() -> None:
    """Let this process (and its children) install missing packages."""
    os.environ[ALLOW_ENV] = "1"


def missing_debs(packages: list[str]) -> list[str]:
    """Return the packages of ``packages`` that dpkg does not report as installed."""
    missing = []
    for pkg in packages:
        res = subprocess.run(
            ["dpkg-query", "-W", "-f=${db:Status-Status}", pkg],
            capture_output=True,
            text=True,
            check=False,
        )
        if res.returncode != 0 or res.stdout.strip() != "installed":
            missing.append(pkg)
    return missing


def installed_version(pkg: str) -> str | None:
    """The version of ``pkg`` dpkg has installed, or None."""
    res = subprocess.run(["dpkg-query", "-W", "-f=${Version} ${db:Status-Status}", pkg],
                         capture_output=True, text=True, check=False)
    version, _, status = res.stdout.strip().partition(" ")
    return version if res.returncode == 0 and status == "installed" else None


def update() -> None:
    """``apt-get update``, once per process."""
    global _apt_updated
    if _apt_updated:
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0 or not install_allowed():
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "-o", f"DPkg::Lock::Timeout={LOCK_WAIT}", "update", "-q"],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    _apt_updated = True


def package_names(prefix: str) -> list[str]:
    """The names of the packages apt knows that start with ``prefix`` (reading
    the sources' lists first if this machine has none yet)."""
    if shutil.which("apt-cache") is None:
        return []
    for attempt in range(2):
        res = subprocess.run(["apt-cache", "pkgnames", prefix], capture_output=True,
                             text=True, check=False)
        names = res.stdout.split()
        if names or attempt:
            return sorted(names)
        update()
    return []


def ensure_debs(packages: list[str]) -> None:
    """Install any of ``packages`` that are missing (apt-get, non-interactive)."""
    missing = missing_debs(packages)
    if not missing:
        return
    if not install_allowed():
        raise DependencyError(
            f"missing Debian packages: {' '.join(missing)}; install them with "
            f"'apt-get install --no-install-recommends {' '.join(missing)}', or pass "
            "--install-deps to let this command do it")
    if shutil.which("apt-get") is None:
        raise DependencyError(f"missing packages {missing} and no apt-get to install them")
    if os.geteuid() != 0:
        raise DependencyError(f"missing packages {missing}; run as root to install them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    print(f"ipvs-synproxy: installing {' '.join(missing)}", file=sys.stderr)
    update()
    res = subprocess.run(
        ["apt-get", "-o", f"DPkg::Lock::Timeout={LOCK_WAIT}", "install", "-y", "-q",
         "--no-install-recommends", *missing],
        env=env,
        stdout=subprocess.DEVNULL,
        check=False,
    )
    if res.returncode != 0:
        raise DependencyError(f"apt-get install {' '.join(missing)} failed ({res.returncode})")
