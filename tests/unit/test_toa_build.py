"""kmod.build_toa and `ipvs-synproxy kmod build-toa` without compiling anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from ipvs_synproxy.build import kmod
from ipvs_synproxy.cli import main as cli


def _src(tmp_path: Path, code: str = "int x;\n") -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "toa.c").write_text(code)
    (tmp_path / "Kbuild").write_text("obj-m += toa.o\n")
    return tmp_path


def test_toa_key_follows_source_and_kernel(tmp_path: Path) -> None:
    k1, k2 = kmod.Kernel("6.1.0-56-amd64"), kmod.Kernel("6.1.0-57-amd64")
    a = kmod.toa_key(k1, _src(tmp_path / "a"))
    assert a == kmod.toa_key(k1, _src(tmp_path / "b"))
    assert a != kmod.toa_key(k2, _src(tmp_path / "c"))
    assert a != kmod.toa_key(k1, _src(tmp_path / "d", "int y;\n"))


def test_missing_sources_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kmod, "ensure_toolchain",
                        lambda series=None: kmod.Kernel("6.1.0-56-amd64"))
    monkeypatch.setattr(kmod, "toa_dir", lambda: tmp_path)
    (tmp_path / "toa.c").write_text("int x;\n")
    with pytest.raises(kmod.KmodError, match="missing Kbuild"):
        kmod.build_toa()


def test_a_cached_module_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = kmod.Kernel("6.1.0-56-amd64")
    monkeypatch.setattr(kmod, "ensure_toolchain", lambda series=None: kernel)
    monkeypatch.setattr(kmod, "toa_dir", lambda: _src(tmp_path / "src"))
    monkeypatch.setenv("IPVS_SYNPROXY_BUILD", str(tmp_path / "build"))
    out = kmod.cached_build(kernel, f"toa-{kmod.toa_key(kernel)}")
    out.mkdir(parents=True)
    (out / "toa.ko").write_bytes(b"\x7fELF")
    res = kmod.build_toa()
    assert not res.rebuilt
    assert res.modules == (out / "toa.ko",)


def test_cli_prints_the_module_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    ko = tmp_path / "toa.ko"
    monkeypatch.setattr(kmod, "build_toa", lambda force=False, series=None: kmod.BuildResult(
        kernel=kmod.Kernel("6.1.0-56-amd64"), key="k", directory=tmp_path, modules=(ko,),
        rebuilt=False))
    assert cli.main(["kmod", "build-toa"]) == 0
    assert capsys.readouterr().out.strip() == str(ko)
