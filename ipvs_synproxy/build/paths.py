"""Where the checkout, its kernel patches and its build cache live."""

from __future__ import annotations

import os
from pathlib import Path


def project_root() -> Path:
    """The checkout this package runs from (override: IPVS_SYNPROXY_ROOT)."""
    env = os.environ.get("IPVS_SYNPROXY_ROOT")
    if env:
        return Path(env).resolve()
    return Path(__file__).resolve().parents[2]


def build_dir() -> Path:
    """Cache for extracted sources, built modules and guest images (override:
    IPVS_SYNPROXY_BUILD). It is the one directory the guest may write to."""
    env = os.environ.get("IPVS_SYNPROXY_BUILD")
    if env:
        return Path(env).resolve()
    return project_root() / "build"


def patches_dir() -> Path:
    return project_root() / "kernel_patches"
