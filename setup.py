"""Package data that lives outside the package in a checkout.

The kernel patch series, the DKMS glue and the keepalived patches sit at the
top of the repository (``kernel_patches/``, ``keepalived/patches/``), where
the kernel and keepalived workflows expect them. A wheel (and the Debian
package built from it) carries a copy under ``ipvs_synproxy/data/``, which
:mod:`ipvs_synproxy.build.paths` prefers when it exists. An editable install
reads the checkout directly and gets no copy.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
DATA = {"kernel_patches": "kernel_patches", "keepalived/patches": "keepalived/patches",
        "xdp": "xdp"}
# build products of a checkout's own use of the directories, never shipped
IGNORE = shutil.ignore_patterns("*.o", "*.ko", "*.cmd", "*.mod", "*.mod.c", "Module.symvers",
                                "modules.order", "__pycache__", "*.orig", "*.rej")


class BuildPyWithData(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "ipvs_synproxy" / "data"
        for src, dest in DATA.items():
            if not (HERE / src).is_dir():
                raise SystemExit(f"setup.py: {HERE / src} is missing: build from a "
                                 "complete checkout or sdist")
            shutil.rmtree(target / dest, ignore_errors=True)
            shutil.copytree(HERE / src, target / dest, ignore=IGNORE)


setup(cmdclass={"build_py": BuildPyWithData})
