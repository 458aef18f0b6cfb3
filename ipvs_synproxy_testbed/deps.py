"""``make deps``: every Debian package the build, the testbed and the tests use.

It gathers each part's own list (the module build, the keepalived build, the
guest) and installs what is missing with :func:`ipvs_synproxy.build.apt.ensure_debs`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ipvs_synproxy.build import apt, kmod, paths
from ipvs_synproxy.build import keepalived as keepalived_build
from ipvs_synproxy.build import xdp as xdp_build
from ipvs_synproxy_testbed import vm

# Used only by tests: the initramfs (cpio), the console's browser test, the DKMS install,
# the generated man pages (groff checks them), and the real servers that require the
# PROXY protocol in tests/vm/test_proxy_protocol.py (nginx, haproxy). The guest runs
# the host's root filesystem, so those two must be installed on the host; the tests
# start them in rs1/rs2 with their own configuration and never use the packages'
# services (a host whose policy-rc.d forbids starting services, like a container's,
# installs them without starting them; elsewhere they run with Debian's defaults).
TEST_DEBS = ["cpio", "chromium", "chromium-driver", "dkms", "groff-base", "nginx",
             "haproxy"]
# promtool (the alert rules' checks and unit tests, monitoring/): taken out of
# Debian's prometheus package, which is not installed (it would start a server).
PROMTOOL_DEB, PROMTOOL_MEMBER = "prometheus", "./usr/bin/promtool"
# make deb: Debian's own packaging tools; and what the ipvs-synproxy package
# depends on, for the guest that installs it (its root is the host's).
DEB_DEBS = ["dpkg-dev", "debhelper", "dh-dkms", "python3-yaml", "python3-jinja2",
            "python3-markupsafe"]


def project_debs() -> list[str]:
    """Every Debian package the build, the testbed and the tests use: the
    kernel packages of every supported series that apt serves, so that the
    guest suite can run on each."""
    kernels = {deb for series in kmod.served_series() for deb in kmod.build_debs(series)}
    return sorted(kernels | set(kmod.BUILD_DEBS) | set(vm.GUEST_DEBS)
                  | set(keepalived_build.BUILD_DEBS) | set(xdp_build.BUILD_DEBS)
                  | set(TEST_DEBS) | set(DEB_DEBS))


def promtool_path() -> Path:
    """Where ``make deps`` puts promtool: build/tools/promtool."""
    return paths.build_dir() / "tools" / "promtool"


def main() -> int:
    """``python -m ipvs_synproxy_testbed.deps``: install what is missing."""
    try:
        # Which series apt serves is read from its lists: stale ones (a new
        # machine's) may predate a series' packages and leave it out.
        apt.update()
        apt.ensure_debs(project_debs())
        apt.extract_from_deb(PROMTOOL_DEB, PROMTOOL_MEMBER, promtool_path(),
                             paths.build_dir() / "tools" / "debs")
    except (apt.DependencyError, kmod.KmodError, subprocess.CalledProcessError) as exc:
        print(f"ipvs-synproxy: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
