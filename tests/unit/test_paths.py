"""Where an installed copy finds its patches and puts its caches."""

from __future__ import annotations

from pathlib import Path

import pytest

from ipvs_synproxy.build import paths


def test_a_checkout_caches_in_build_and_reads_its_own_patches(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IPVS_SYNPROXY_BUILD", raising=False)
    monkeypatch.delenv("IPVS_SYNPROXY_ROOT", raising=False)
    root = Path(__file__).resolve().parents[2]
    assert paths.in_checkout()
    assert paths.build_dir() == root / "build"
    assert paths.patches_dir() == root / "kernel_patches"
    assert paths.keepalived_patches_dir() == root / "keepalived" / "patches"


def test_an_installed_copy_uses_its_package_data_and_the_cache_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site-packages"
    package = site / "ipvs_synproxy"
    (package / "data" / "kernel_patches").mkdir(parents=True)
    monkeypatch.setattr(paths, "PACKAGE_DIR", package)
    for var in ("IPVS_SYNPROXY_BUILD", "IPVS_SYNPROXY_ROOT", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    assert not paths.in_checkout()
    assert paths.patches_dir() == package / "data" / "kernel_patches"
    assert paths.keepalived_patches_dir() == package / "data" / "keepalived" / "patches"
    monkeypatch.setattr(paths.os, "geteuid", lambda: 0)
    assert paths.build_dir() == Path("/var/cache/ipvs-synproxy")
    monkeypatch.setattr(paths.os, "geteuid", lambda: 1000)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert paths.build_dir() == tmp_path / "home" / ".cache" / "ipvs-synproxy"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert paths.build_dir() == tmp_path / "xdg" / "ipvs-synproxy"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert paths.build_dir() == tmp_path / "home" / ".cache" / "ipvs-synproxy"
    monkeypatch.setenv("IPVS_SYNPROXY_BUILD", str(tmp_path / "mine"))
    assert paths.build_dir() == tmp_path / "mine"
    assert site not in paths.build_dir().parents
