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
import tempfile
from pathlib import Path

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


def extract_from_deb(package: str, member: str, dest: Path, cache: Path) -> Path:
    """One file of a Debian package, without installing the package.

    ``apt-get download`` fetches apt's candidate of ``package`` into ``cache``
    (as any user: nothing is installed, no maintainer script runs), and only
    ``member`` (its path in the package, e.g. ``./usr/bin/promtool``) is taken
    out of its data archive to ``dest``. Nothing is done when ``dest`` exists.
    """
    if dest.exists():
        return dest
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise DependencyError(f"{dest} is missing and there is no apt-get/dpkg-deb to "
                              f"take it from Debian's {package}")
    cache.mkdir(parents=True, exist_ok=True)
    debs = sorted(cache.glob(f"{package}_*.deb"))
    if not debs:
        print(f"ipvs-synproxy: downloading {package} for {member}", file=sys.stderr)
        for attempt in range(2):
            # root: no sandbox user, who could not write into the checkout's build/
            sandbox = ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []
            res = subprocess.run(["apt-get", *sandbox, "download", "-q", package],
                                 cwd=cache, stdout=subprocess.DEVNULL, check=False)
            debs = sorted(cache.glob(f"{package}_*.deb"))
            if res.returncode == 0 and debs:
                break
            if attempt:
                raise DependencyError(f"apt-get download {package} failed "
                                      f"({res.returncode})")
            update()  # a new machine's lists may be missing or stale
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        fsys = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(debs[-1])],
                                stdout=subprocess.PIPE)
        tar = subprocess.run(["tar", "-x", "-C", tmp, member], stdin=fsys.stdout,
                             check=False)
        if fsys.stdout is not None:
            fsys.stdout.close()
        if fsys.wait() != 0 or tar.returncode != 0:
            raise DependencyError(f"could not take {member} out of {debs[-1]}")
        os.replace(Path(tmp) / member, dest)
    return dest
