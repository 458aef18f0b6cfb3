"""Install the Debian packages a command needs, once, and only when missing.

Every step that needs a system package calls :func:`ensure_debs` first, so a
fresh machine (CI, a new developer box) needs nothing but ``make``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

_apt_updated = False


class DependencyError(RuntimeError):
    """A required system package could not be installed."""


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


def ensure_debs(packages: list[str]) -> None:
    """Install any of ``packages`` that are missing (apt-get, non-interactive)."""
    global _apt_updated
    missing = missing_debs(packages)
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise DependencyError(f"missing packages {missing} and no apt-get to install them")
    if os.geteuid() != 0:
        raise DependencyError(f"missing packages {missing}; run as root to install them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    print(f"ipvs-synproxy: installing {' '.join(missing)}", file=sys.stderr)
    if not _apt_updated:
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        _apt_updated = True
    res = subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
        env=env,
        stdout=subprocess.DEVNULL,
        check=False,
    )
    if res.returncode != 0:
        raise DependencyError(f"apt-get install {' '.join(missing)} failed ({res.returncode})")


def project_debs() -> list[str]:
    """Every Debian package the build, the testbed and the tests use."""
    from ipvs_synproxy import keepalived_build, kmod
    from ipvs_synproxy.testbed import vm

    extra = ["cpio", "chromium", "chromium-driver"]
    return sorted(set(kmod.BUILD_DEBS) | set(vm.GUEST_DEBS) | set(keepalived_build.BUILD_DEBS)
                  | set(extra))


def main() -> int:
    """``python -m ipvs_synproxy.deps``: install what is missing (``make deps``)."""
    try:
        ensure_debs(project_debs())
    except (DependencyError, subprocess.CalledProcessError) as exc:
        print(f"ipvs-synproxy: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
