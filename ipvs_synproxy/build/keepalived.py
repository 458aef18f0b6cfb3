"""Build keepalived 2.2.7 with this project's patches (keepalived/patches/).

The source is Debian's ``keepalived_2.2.7.orig.tar.gz``, downloaded at build
time and checked against a pinned SHA-256 (the tarball and its sources are
never part of the repository). The series in ``keepalived/patches/series`` is
applied, keepalived configured with only what needs no extra libraries
(no iptables/nftables/ipset, systemd, SNMP, D-Bus) and built. The result is
cached as ``build/keepalived/<key>/keepalived``, the key hashing the tarball,
the configure options and every patch: an unchanged series never rebuilds.
A build runs in a scratch directory renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ipvs_synproxy.build import apt, paths

VERSION = "2.2.7"
TARBALL = f"keepalived_{VERSION}.orig.tar.gz"
TARBALL_URL = f"https://deb.debian.org/debian/pool/main/k/keepalived/{TARBALL}"
TARBALL_SHA256 = "c61940d874154a560a54627ecf7ef47adebdf832164368d10bf242a4d9b7d49d"
BUILD_DEBS = ["gcc", "make", "patch", "pkg-config", "libssl-dev", "libnl-3-dev",
              "libnl-genl-3-dev", "libsystemd-dev", "ca-certificates"]
# With systemd support (sd_notify), so that a Type=notify unit like Debian's
# works; keepalived run by hand or by the testbed does not need systemd.
CONFIGURE_ARGS = ("--disable-iptables", "--disable-nftables", "--with-init=systemd",
                  "--disable-track-process", "--disable-dbus", "--disable-snmp",
                  "--disable-bfd")
# Bump when the way keepalived is built changes, to invalidate caches.
BUILDER_VERSION = "3"


class KeepalivedBuildError(RuntimeError):
    """keepalived could not be built; the message says which step."""


@dataclass(frozen=True)
class BuildResult:
    key: str
    binary: Path
    rebuilt: bool


def patches_dir() -> Path:
    return paths.keepalived_patches_dir()


def cache_dir() -> Path:
    return paths.build_dir() / "keepalived"


def read_series(pdir: Path | None = None) -> list[Path]:
    """The patches listed in ``series`` (``#`` comments and blank lines allowed)."""
    pdir = pdir or patches_dir()
    series = pdir / "series"
    try:
        text = series.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeepalivedBuildError(f"cannot read the patch series {series}: "
                                   f"{getattr(exc, 'strerror', None) or exc}") from None
    out = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        name = raw.split("#", 1)[0].strip()
        if not name:
            continue
        p = pdir / name.split()[0]
        if not p.is_file():
            raise KeepalivedBuildError(f"{series}:{lineno}: patch {p.name} listed but "
                                       "not found")
        out.append(p)
    if not out:
        raise KeepalivedBuildError(f"the patch series {series} lists no patch")
    return out


def build_key(patches: list[Path]) -> str:
    """Hash of everything that determines the binary."""
    h = hashlib.sha256()
    h.update(f"builder={BUILDER_VERSION}\ntarball={TARBALL_SHA256}\n".encode())
    h.update(" ".join(CONFIGURE_ARGS).encode() + b"\n")
    for p in patches:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def binary_path() -> Path:
    """Where the build of the current series is (or will be): for tests and
    scripts that run the patched keepalived."""
    return cache_dir() / build_key(read_series()) / "keepalived"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_tarball() -> Path:
    """The verified source tarball, downloaded once into the build cache."""
    dest = cache_dir() / "dl" / TARBALL
    if dest.exists() and _sha256(dest) == TARBALL_SHA256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".dl-", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(TARBALL_URL,
                                                                 timeout=60) as resp:
            shutil.copyfileobj(resp, out)
        got = _sha256(tmp)
        if got != TARBALL_SHA256:
            raise KeepalivedBuildError(f"{TARBALL_URL}: SHA-256 {got}, expected "
                                       f"{TARBALL_SHA256}: refusing to build it")
        tmp.rename(dest)
    except OSError as exc:
        raise KeepalivedBuildError(f"downloading {TARBALL_URL}: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _run(argv: list[str], cwd: Path, what: str) -> None:
    res = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-30:])
        raise KeepalivedBuildError(f"{what} failed ({res.returncode}):\n{tail}")


def extract(tarball: Path, dest: Path) -> Path:
    """Unpack the tarball under ``dest``; return the source tree."""
    with tarfile.open(tarball, "r:gz") as tar:
        tar.extractall(dest, filter="data")
    tree = dest / f"keepalived-{VERSION}"
    if not (tree / "configure").exists():
        raise KeepalivedBuildError(f"{tarball} has no keepalived-{VERSION}/configure")
    return tree


def apply_patch(tree: Path, patch: Path) -> None:
    for args in (["--dry-run"], []):
        res = subprocess.run(
            ["patch", "-p1", "--batch", "--forward", "--no-backup-if-mismatch", "-s",
             *args, "-i", str(patch)],
            cwd=tree, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise KeepalivedBuildError(
                f"patch {patch.name} does not apply:\n{res.stdout}{res.stderr}".rstrip())


def build(force: bool = False) -> BuildResult:
    """Build (or reuse) the patched keepalived; returns where the binary is."""
    patches = read_series()
    key = build_key(patches)
    final = cache_dir() / key
    binary = final / "keepalived"
    if binary.exists() and not force:
        return BuildResult(key, binary, rebuilt=False)
    apt.ensure_debs(BUILD_DEBS)
    tarball = fetch_tarball()
    cache_dir().mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_dir()))
    try:
        tree = extract(tarball, scratch)
        for p in patches:
            apply_patch(tree, p)
        _run(["./configure", *CONFIGURE_ARGS], tree, "configure")
        _run(["make", f"-j{os.cpu_count() or 2}"], tree, "make")
        built = tree / "keepalived" / "keepalived"
        if not built.exists():
            raise KeepalivedBuildError(f"make left no {built}")
        out = scratch / key
        out.mkdir()
        shutil.copy2(built, out / "keepalived")
        (out / "patches").write_text("".join(f"{p.name}\n" for p in patches))
        if final.exists():
            shutil.rmtree(final)
        out.rename(final)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return BuildResult(key, binary, rebuilt=True)


def config_test(binary: Path, conf: Path) -> subprocess.CompletedProcess[str]:
    """``keepalived --config-test`` of ``conf`` (exit status 0: valid)."""
    return subprocess.run([str(binary), "--config-test", "-f", str(conf), "-l"],
                          capture_output=True, text=True, check=False, timeout=60)
