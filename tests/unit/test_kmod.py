"""The module builder's pure parts: series parsing and cache keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from ipvs_synproxy.build import kmod

KERNEL = kmod.Kernel("6.1.0-99-amd64")


def _series(tmp_path: Path, text: str, patches: dict[str, str]) -> Path:
    (tmp_path / "series").write_text(text)
    for name, body in patches.items():
        (tmp_path / name).write_text(body)
    return tmp_path


def test_series_keeps_order_and_ignores_comments_and_quilt_flags(tmp_path: Path) -> None:
    d = _series(tmp_path, "# the series\n\n0002-b.patch -p1\n0001-a.patch # first?\n",
                {"0001-a.patch": "a", "0002-b.patch": "b"})
    assert [p.name for p in kmod.read_series(d)] == ["0002-b.patch", "0001-a.patch"]


def test_missing_series_file_means_no_patches(tmp_path: Path) -> None:
    assert kmod.read_series(tmp_path) == []


def test_series_naming_a_missing_patch_is_an_error_with_its_line(tmp_path: Path) -> None:
    d = _series(tmp_path, "0001-a.patch\n0002-gone.patch\n", {"0001-a.patch": "a"})
    with pytest.raises(kmod.KmodError, match=r"series:2: patch 0002-gone\.patch"):
        kmod.read_series(d)


def test_cache_key_follows_patch_content_order_and_kernel(tmp_path: Path) -> None:
    a, b = tmp_path / "a.patch", tmp_path / "b.patch"
    a.write_text("one")
    b.write_text("two")
    key = kmod.series_key([a, b], KERNEL)
    assert key == kmod.series_key([a, b], KERNEL)
    assert key != kmod.series_key([b, a], KERNEL)
    assert key != kmod.series_key([a, b], kmod.Kernel("6.1.0-98-amd64"))
    b.write_text("two, edited")
    assert key != kmod.series_key([a, b], KERNEL)


def test_make_command_puts_our_headers_first() -> None:
    argv = kmod.make_command(KERNEL, Path("/t"))
    flags = next(a for a in argv if a.startswith("NOSTDINC_FLAGS="))
    assert flags == "NOSTDINC_FLAGS=-I/t/include -I/t/include/uapi"
    assert "M=/t/net/netfilter/ipvs" in argv
