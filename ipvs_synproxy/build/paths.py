"""Where the kernel patches, the keepalived patches and the build cache live.

Two layouts: a checkout (``make``, the testbed, an editable install) keeps the
patches at its top (``kernel_patches/``, ``keepalived/patches/``) and caches in
``build/``; an installed wheel or Debian package carries the same files as
package data under ``ipvs_synproxy/data/`` (copied there by ``setup.py`` at
build time) and caches in the system's cache directory, never in
site-packages or the current directory.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]


def project_root() -> Path:
    """The checkout this package runs from (override: IPVS_SYNPROXY_ROOT)."""
    env = os.environ.get("IPVS_SYNPROXY_ROOT")
    if env:
        return Path(env).resolve()
    return PACKAGE_DIR.parent


def in_checkout() -> bool:
    """True when running from a source checkout rather than an installed copy."""
    root = project_root()
    return (root / "pyproject.toml").is_file() and (root / "kernel_patches").is_dir()


def data_root() -> Path:
    """The directory holding ``kernel_patches/`` and ``keepalived/patches/``."""
    installed = PACKAGE_DIR / "data"
    if "IPVS_SYNPROXY_ROOT" not in os.environ and (installed / "kernel_patches").is_dir():
        return installed
    return project_root()


def cache_root() -> Path:
    """Caches of an installed copy: /var/cache/ipvs-synproxy for root,
    $XDG_CACHE_HOME/ipvs-synproxy (~/.cache) for anyone else."""
    if os.geteuid() == 0:
        return Path("/var/cache/ipvs-synproxy")
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "ipvs-synproxy"


def build_dir() -> Path:
    """Cache for extracted sources, built modules and guest images (override:
    IPVS_SYNPROXY_BUILD). In a checkout it is ``build/``, the one directory the
    guest may write to."""
    env = os.environ.get("IPVS_SYNPROXY_BUILD")
    if env:
        return Path(env).resolve()
    if in_checkout():
        return project_root() / "build"
    return cache_root()


def patches_dir() -> Path:
    return data_root() / "kernel_patches"


def keepalived_patches_dir() -> Path:
    return data_root() / "keepalived" / "patches"


def xdp_source() -> Path:
    """The XDP program's C source (xdp/ipvs_synproxy_xdp.c)."""
    return data_root() / "xdp" / "ipvs_synproxy_xdp.c"
