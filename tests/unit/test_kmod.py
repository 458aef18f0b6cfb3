"""The module builder's pure parts: series parsing and cache keys."""

from __future__ import annotations

import re
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


def test_a_missing_unreadable_or_empty_series_is_an_error_naming_the_file(
        tmp_path: Path) -> None:
    with pytest.raises(kmod.KmodError, match=f"cannot read the patch series {tmp_path}/series"):
        kmod.read_series(tmp_path)
    (tmp_path / "series").mkdir()
    with pytest.raises(kmod.KmodError, match=r"cannot read the patch series .*series"):
        kmod.read_series(tmp_path)
    (tmp_path / "series").rmdir()
    _series(tmp_path, "# nothing yet\n\n", {})
    with pytest.raises(kmod.KmodError, match=r"series .*series lists no patch"):
        kmod.read_series(tmp_path)


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


# ---- which kernel series, which packages ------------------------------------------------

APT = {
    "linux-image-6.1": ["linux-image-6.1.0-56-amd64", "linux-image-6.1.0-57-amd64",
                        "linux-image-6.1.0-57-amd64-unsigned", "linux-image-6.1.0-57-rt-amd64",
                        "linux-image-6.1.0-57-cloud-amd64", "linux-image-6.1.0-58-amd64-dbg",
                        "linux-image-6.12-amd64", "linux-image-6.12.118+deb12-amd64",
                        "linux-image-6.12.9+deb12-amd64", "linux-image-6.12.120+deb12-amd64"],
    "linux-headers-6.1": ["linux-headers-6.1.0-56-amd64", "linux-headers-6.1.0-57-amd64",
                          "linux-headers-6.12.118+deb12-amd64", "linux-headers-6.12.9+deb12-amd64"],
    "linux-source-": ["linux-source-6.1", "linux-source-6.12", "linux-source-5.10"],
}


def _apt(monkeypatch: pytest.MonkeyPatch, table: dict[str, list[str]]) -> None:
    def names(prefix: str) -> list[str]:
        return sorted({n for v in table.values() for n in v if n.startswith(prefix)})
    monkeypatch.setattr(kmod.apt, "package_names", names)


@pytest.mark.parametrize(("release", "series"), [
    ("6.1.0-57-amd64", "6.1"), ("6.12.118+deb12-amd64", "6.12"),
    ("6.12.9+deb13-cloud-amd64", "6.12"), ("5.10.0-30-amd64", "5.10"),
])
def test_the_series_of_a_release(release: str, series: str) -> None:
    assert kmod.series_of(release) == series
    assert kmod.Kernel(release).series == series


def test_an_unsupported_series_is_an_error_naming_the_supported_ones() -> None:
    with pytest.raises(kmod.KmodError, match=r"no patch series for Linux 5\.10: supported are "
                                             + re.escape(", ".join(kmod.SUPPORTED_SERIES))):
        kmod.check_series("5.10")
    with pytest.raises(kmod.KmodError, match="not a kernel release"):
        kmod.series_of("amd64")


def test_apt_picks_the_newest_kernel_of_the_series_that_has_headers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _apt(monkeypatch, APT)
    # 6.1.0-58 has only a -dbg image; -rt/-cloud are other flavours
    assert kmod.apt_kernel("6.1") == ("6.1.0-57-amd64", ["linux-image-6.1.0-57-amd64",
                                                         "linux-headers-6.1.0-57-amd64"])
    # 6.12.120 has no headers; 6.12.118 > 6.12.9 by number, not by text
    assert kmod.apt_kernel("6.12") == ("6.12.118+deb12-amd64",
                                       ["linux-image-6.12.118+deb12-amd64",
                                        "linux-headers-6.12.118+deb12-amd64"])
    assert kmod.apt_kernel("6.6") is None


def test_an_unsigned_image_is_taken_only_when_it_is_the_only_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _apt(monkeypatch, {"linux-image-6.12": ["linux-image-6.12.57+deb13-amd64-unsigned"],
                       "linux-headers-6.12": ["linux-headers-6.12.57+deb13-amd64"]})
    assert kmod.apt_kernel("6.12") == ("6.12.57+deb13-amd64",
                                       ["linux-image-6.12.57+deb13-amd64-unsigned",
                                        "linux-headers-6.12.57+deb13-amd64"])


def test_the_default_series_is_the_newest_supported_one_apt_serves(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _apt(monkeypatch, APT)
    assert kmod.served_series() == [s for s in kmod.SUPPORTED_SERIES
                                    if s in ("6.1", "6.12")]
    assert kmod.default_series() == kmod.served_series()[-1]
    # a machine whose apt has only 6.12 (Debian 13): never asks for 6.1
    _apt(monkeypatch, {"linux-source-": ["linux-source-6.12"]})
    if "6.12" in kmod.SUPPORTED_SERIES:
        assert kmod.default_series() == "6.12"
    # nothing served, nothing installed: a clear error
    _apt(monkeypatch, {})
    monkeypatch.setattr(kmod, "installed_kernels", lambda series: [])
    with pytest.raises(kmod.KmodError, match="apt serves no linux-source package"):
        kmod.default_series()


def test_build_debs_name_the_source_and_the_kernel_apt_serves(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _apt(monkeypatch, APT)
    monkeypatch.setattr(kmod, "installed_kernels", lambda series: [])
    debs = kmod.build_debs("6.1")
    assert {"linux-source-6.1", "linux-image-6.1.0-57-amd64",
            "linux-headers-6.1.0-57-amd64"} <= set(debs)
    assert not any(d in ("linux-image-amd64", "linux-headers-amd64") for d in debs)


def test_dkms_accepts_only_the_kernels_of_its_series() -> None:
    pat = re.compile(kmod.dkms_exclusive("6.1"))
    assert pat.match("6.1.0-57-amd64")
    assert not pat.match("6.12.118+deb12-amd64")
    assert not pat.match("6.10.1")
    pat = re.compile(kmod.dkms_exclusive("6.12"))
    assert pat.match("6.12.118+deb12-amd64") and not pat.match("6.1.0-57-amd64")
    conf = (kmod.paths.patches_dir() / "dkms.conf").read_text()
    assert 'BUILD_EXCLUSIVE_KERNEL="@KERNEL_REGEX@"' in conf


def test_a_preview_series_is_accepted_by_name_but_never_the_default(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kmod, "SUPPORTED_SERIES", ("6.1",))
    monkeypatch.setattr(kmod, "PREVIEW_SERIES", ("6.12",))
    assert kmod.check_series("6.12") == "6.12"
    assert kmod.known_series() == ("6.1", "6.12")
    _apt(monkeypatch, APT)
    assert kmod.served_series() == ["6.1"]
    assert kmod.default_series() == "6.1"
    with pytest.raises(kmod.KmodError, match=r"supported are 6\.1 \(preview: 6\.12\)"):
        kmod.check_series("6.6")


def test_dkms_conf_lists_the_modules_the_series_makefile_builds(tmp_path: Path) -> None:
    ipvs = tmp_path / "net/netfilter/ipvs"
    ipvs.mkdir(parents=True)
    (ipvs / "Makefile").write_text(
        "ip_vs-objs := ip_vs_conn.o ip_vs_core.o\n"
        "obj-$(CONFIG_IP_VS) += ip_vs.o\n"
        "obj-$(CONFIG_IP_VS_RR) += ip_vs_rr.o\n"
        "obj-$(CONFIG_IP_VS_TWOS) += ip_vs_twos.o\n"
        "obj-$(CONFIG_IP_VS_FO) += ip_vs_fo.o\n"
        "obj-$(CONFIG_NETFILTER) += unrelated.o\n")
    config = {"CONFIG_IP_VS": "m", "CONFIG_IP_VS_RR": "m", "CONFIG_IP_VS_TWOS": "m",
              "CONFIG_IP_VS_FO": "y", "CONFIG_NETFILTER": "m"}
    assert kmod.tree_modules(tmp_path, config) == ["ip_vs", "ip_vs_rr", "ip_vs_twos"]
    # Debian's 6.1: the source has ip_vs_twos, the configuration leaves it out
    del config["CONFIG_IP_VS_TWOS"]
    assert kmod.tree_modules(tmp_path, config) == ["ip_vs", "ip_vs_rr"]
    lines = kmod.dkms_modules(["ip_vs", "ip_vs_twos"]).splitlines()
    assert 'BUILT_MODULE_NAME[1]="ip_vs_twos"' in lines
    assert 'BUILT_MODULE_LOCATION[1]="net/netfilter/ipvs/"' in lines
    assert 'DEST_MODULE_LOCATION[1]="/updates/dkms"' in lines
    assert "@MODULES@" in (kmod.paths.patches_dir() / "dkms.conf").read_text()
    (ipvs / "Makefile").write_text("obj-y += core.o\n")
    with pytest.raises(kmod.KmodError, match="names no IPVS module"):
        kmod.tree_modules(tmp_path, config)


def test_a_missing_package_is_named_not_installed_unless_asked(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from ipvs_synproxy.build import apt

    monkeypatch.delenv(apt.ALLOW_ENV, raising=False)
    ran: list[list[str]] = []
    real_run = apt.subprocess.run

    def record(argv: list[str], **kw: object) -> object:
        ran.append(list(argv))
        return real_run(argv, **kw)  # type: ignore[call-overload]

    monkeypatch.setattr(apt.subprocess, "run", record)
    with pytest.raises(apt.DependencyError,
                       match="missing Debian packages: ipvs-synproxy-no-such-pkg; install "
                             "them with 'apt-get install --no-install-recommends "
                             "ipvs-synproxy-no-such-pkg', or pass --install-deps"):
        apt.ensure_debs(["ipvs-synproxy-no-such-pkg"])
    assert all(a[0] == "dpkg-query" for a in ran), ran     # asked dpkg, ran no apt-get
    apt.update()
    assert all(a[0] == "dpkg-query" for a in ran), ran


def test_install_deps_lets_the_command_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from ipvs_synproxy.build import apt
    from ipvs_synproxy.cli import main as cli

    monkeypatch.delenv(apt.ALLOW_ENV, raising=False)
    seen: list[bool] = []
    monkeypatch.setattr(kmod, "build", lambda **kw: seen.append(apt.install_allowed())
                        or (_ for _ in ()).throw(kmod.KmodError("stop here")))
    assert cli.main(["kmod", "build"]) == 1
    assert cli.main(["kmod", "build", "--install-deps"]) == 1
    assert seen == [False, True]
