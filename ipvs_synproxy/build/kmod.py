"""Build the patched IPVS modules out of tree against the installed headers.

The pristine IPVS sources come from Debian's ``linux-source-6.1``; the quilt
series in ``kernel_patches/linux-6.1`` is applied on a private copy and the
result built with the kernel's own kbuild (``make -C …/build M=…``), the same
way DKMS does it. Results are cached under ``build/kmod/<kver>/<key>`` where the
key hashes the series, every patch it lists and the build glue, so an unchanged
series never rebuilds. A build happens in a scratch directory and is renamed
into place only when complete: there is never a half-built tree in the cache.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ipvs_synproxy.build import apt, paths

SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
SOURCE_PREFIX = "linux-source-6.1/"
BUILD_DEBS = ["linux-source-6.1", "linux-headers-amd64", "linux-image-amd64",
              "build-essential", "bc", "xz-utils", "patch", "kmod"]

# What the out-of-tree build needs from the full source, plus checkpatch.
SOURCE_MEMBERS = (
    "net/netfilter/ipvs/",
    "include/net/ip_vs.h",
    "include/uapi/linux/ip_vs.h",
    "scripts/checkpatch.pl",
    "scripts/spelling.txt",
    "scripts/const_structs.checkpatch",
)

# Bump when the way a tree is assembled or built changes, to invalidate caches.
BUILDER_VERSION = "1"

IPVS_SUBDIR = Path("net/netfilter/ipvs")


class KmodError(RuntimeError):
    """The patched modules could not be built; the message says which step."""


@dataclass(frozen=True)
class Kernel:
    version: str  # uname -r of the target, e.g. 6.1.0-56-amd64

    @property
    def modules_dir(self) -> Path:
        return Path("/lib/modules") / self.version

    @property
    def build_tree(self) -> Path:
        return self.modules_dir / "build"

    @property
    def image(self) -> Path:
        return Path("/boot") / f"vmlinuz-{self.version}"


@dataclass(frozen=True)
class BuildResult:
    kernel: Kernel
    key: str
    directory: Path
    modules: tuple[Path, ...]
    rebuilt: bool


def _version_key(ver: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", ver)]


def find_kernel() -> Kernel:
    """The newest installed 6.1 Debian kernel that has both image and headers."""
    candidates = []
    for d in Path("/lib/modules").glob("6.1.*"):
        k = Kernel(d.name)
        if k.image.exists() and (k.build_tree / "Makefile").exists():
            candidates.append(k)
    if not candidates:
        raise KmodError(
            "no Linux 6.1 kernel with headers installed "
            "(apt-get install linux-image-amd64 linux-headers-amd64)"
        )
    return max(candidates, key=lambda k: _version_key(k.version))


def ensure_toolchain() -> Kernel:
    apt.ensure_debs(BUILD_DEBS)
    return find_kernel()


def series_dir() -> Path:
    return paths.patches_dir() / "linux-6.1"


def read_series(sdir: Path | None = None) -> list[Path]:
    """The patches listed in ``series``, in order (quilt syntax: ``#`` comments,
    blank lines and ``-pN`` suffixes are allowed)."""
    sdir = sdir or series_dir()
    series = sdir / "series"
    if not series.exists():
        return []
    out = []
    for lineno, raw in enumerate(series.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name = line.split()[0]
        p = sdir / name
        if not p.is_file():
            raise KmodError(f"{series}:{lineno}: patch {name} listed but not found")
        out.append(p)
    return out


def series_key(patches: list[Path], kernel: Kernel) -> str:
    """Hash of everything that determines the built modules."""
    h = hashlib.sha256()
    h.update(f"builder={BUILDER_VERSION}\nkernel={kernel.version}\n".encode())
    h.update(f"source={_deb_version('linux-source-6.1')}\n".encode())
    for p in patches:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _deb_version(pkg: str) -> str:
    res = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg],
                         capture_output=True, text=True, check=False)
    return res.stdout.strip() or "unknown"


def pristine_source() -> Path:
    """Extract (once) the files we need from linux-source-6.1; return the tree."""
    apt.ensure_debs(["linux-source-6.1", "xz-utils"])
    dest = paths.build_dir() / "src" / f"linux-source-{_deb_version('linux-source-6.1')}"
    if (dest / ".complete").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest.parent))
    try:
        with tarfile.open(SOURCE_TARBALL, "r:xz") as tar:
            members = [
                m for m in tar.getmembers()
                if m.name.startswith(SOURCE_PREFIX)
                and m.name[len(SOURCE_PREFIX):].startswith(SOURCE_MEMBERS)
            ]
            for m in members:
                m.name = m.name[len(SOURCE_PREFIX):]
            tar.extractall(tmp, members=members, filter="data")
        if not (tmp / IPVS_SUBDIR / "ip_vs_core.c").exists():
            raise KmodError(f"{SOURCE_TARBALL} has no {IPVS_SUBDIR}")
        (tmp / ".complete").touch()
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def assemble_tree(src: Path, dest: Path) -> None:
    """Lay out the module tree: IPVS sources plus the headers the series may
    change, under ``include/`` so they win over the installed kernel's."""
    shutil.copytree(src / IPVS_SUBDIR, dest / IPVS_SUBDIR)
    for hdr in ("include/net/ip_vs.h", "include/uapi/linux/ip_vs.h"):
        (dest / hdr).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / hdr, dest / hdr)


def apply_patch(tree: Path, patch: Path) -> None:
    """Apply one patch; raise naming it when it does not apply cleanly."""
    for args in (["--dry-run"], []):
        res = subprocess.run(
            ["patch", "-p1", "--batch", "--forward", "--no-backup-if-mismatch", "-s",
             *args, "-i", str(patch)],
            cwd=tree, capture_output=True, text=True, check=False,
        )
        if res.returncode != 0:
            raise KmodError(
                f"patch {patch.name} does not apply:\n{res.stdout}{res.stderr}".rstrip()
            )


def make_command(kernel: Kernel, tree: Path, target: str = "modules") -> list[str]:
    inc = tree / "include"
    return [
        "make", "-C", str(kernel.build_tree), f"M={tree / IPVS_SUBDIR}",
        f"NOSTDINC_FLAGS=-I{inc} -I{inc / 'uapi'}",
        "-j2", target,
    ]


def compile_tree(kernel: Kernel, tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(make_command(kernel, tree), capture_output=True, text=True,
                          check=False)


def _error_lines(output: str, limit: int = 40) -> str:
    lines = [ln for ln in output.splitlines() if "error" in ln or "Error" in ln]
    return "\n".join((lines or output.splitlines())[-limit:])


def _first_failing_patch(kernel: Kernel, src: Path, patches: list[Path]) -> Path:
    """Bisect the series for the first prefix that does not compile."""
    lo, hi = 0, len(patches) - 1  # prefix patches[:hi+1] is known to fail
    while lo < hi:
        mid = (lo + hi) // 2
        with tempfile.TemporaryDirectory(prefix="ipvs-bisect-") as t:
            tree = Path(t)
            assemble_tree(src, tree)
            for p in patches[: mid + 1]:
                apply_patch(tree, p)
            ok = compile_tree(kernel, tree).returncode == 0
        if ok:
            lo = mid + 1
        else:
            hi = mid
    return patches[lo]


def cached_build(kernel: Kernel, key: str) -> Path:
    return paths.build_dir() / "kmod" / kernel.version / key


def build(force: bool = False, patches: list[Path] | None = None) -> BuildResult:
    """Build (or reuse) the patched modules for the installed 6.1 kernel."""
    kernel = ensure_toolchain()
    if patches is None:
        patches = read_series()
    key = series_key(patches, kernel)
    out = cached_build(kernel, key)
    manifest = out / "manifest.json"
    if manifest.exists() and not force:
        return _result(kernel, key, out, rebuilt=False)

    src = pristine_source()
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=out.parent))
    try:
        tree = scratch / "tree"
        assemble_tree(src, tree)
        for p in patches:
            apply_patch(tree, p)
        res = compile_tree(kernel, tree)
        if res.returncode != 0:
            culprit = _first_failing_patch(kernel, src, patches) if patches else None
            where = f"patch {culprit.name} does not compile" if culprit else \
                "pristine IPVS does not compile"
            raise KmodError(f"{where}:\n{_error_lines(res.stdout + res.stderr)}")
        result_dir = scratch / "result"
        (result_dir / "modules").mkdir(parents=True)
        for ko in sorted((tree / IPVS_SUBDIR).glob("*.ko")):
            shutil.copy2(ko, result_dir / "modules" / ko.name)
        _write_depmod(kernel, result_dir)
        (result_dir / "manifest.json").write_text(json.dumps({
            "kernel": kernel.version,
            "key": key,
            "patches": [p.name for p in patches],
            "modules": sorted(k.name for k in (result_dir / "modules").iterdir()),
        }, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        result_dir.rename(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return _result(kernel, key, out, rebuilt=True)


# Where the modules go on a target system, as DKMS would put them; depmod's
# default search order makes ``updates/`` win over the distribution's copies.
INSTALL_SUBDIR = "updates/ipvs-synproxy"


def _write_depmod(kernel: Kernel, result_dir: Path) -> None:
    """Precompute modules.dep & co. for the kernel's module tree plus ours, so the
    guest can use modprobe (and the kernel's request_module for schedulers) on our
    modules without running depmod over 400 MB of modules through 9p."""
    base = result_dir / "depmod-root"
    mdir = base / "lib" / "modules" / kernel.version
    (mdir / INSTALL_SUBDIR).mkdir(parents=True)
    (mdir / "kernel").symlink_to(kernel.modules_dir / "kernel")
    for f in kernel.modules_dir.glob("modules.builtin*"):
        shutil.copy2(f, mdir / f.name)
    shutil.copy2(kernel.modules_dir / "modules.order", mdir / "modules.order")
    for ko in (result_dir / "modules").iterdir():
        (mdir / INSTALL_SUBDIR / ko.name).symlink_to(ko.resolve())
    res = subprocess.run(["depmod", "-b", str(base), kernel.version],
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise KmodError(f"depmod failed: {res.stderr.strip()}")
    (result_dir / "depmod").mkdir()
    for f in mdir.glob("modules.*"):
        shutil.copy2(f, result_dir / "depmod" / f.name)
    shutil.rmtree(base)


def _result(kernel: Kernel, key: str, out: Path, rebuilt: bool) -> BuildResult:
    mods = tuple(sorted((out / "modules").glob("*.ko")))
    return BuildResult(kernel=kernel, key=key, directory=out, modules=mods, rebuilt=rebuilt)


def export_tree(dest: Path, version: str) -> Path:
    """Write the patched source tree for DKMS (or a manual build) to ``dest``."""
    if dest.exists() and any(dest.iterdir()):
        raise KmodError(f"{dest} exists and is not empty")
    patches = read_series()
    src = pristine_source()
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=dest.parent if dest.parent.exists()
                                else None))
    try:
        tree = tmp / "tree"
        assemble_tree(src, tree)
        for p in patches:
            apply_patch(tree, p)
        glue = paths.patches_dir()
        shutil.copy2(glue / "dkms" / "Makefile", tree / "Makefile")
        conf = (glue / "dkms.conf").read_text().replace("@VERSION@", version)
        (tree / "dkms.conf").write_text(conf)
        (tree / "PATCHES").write_text("".join(p.name + "\n" for p in patches))
        if dest.exists():
            dest.rmdir()
        shutil.move(str(tree), dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def checkpatch(patches: list[Path] | None = None,
               sources: list[Path] | None = None) -> list[tuple[Path, str]]:
    """Run checkpatch.pl --strict over the series (and, as plain files, the
    real-server module's C sources); return (file, report) for every file with
    findings."""
    src = pristine_source()
    script = src / "scripts" / "checkpatch.pl"
    if sources is None:
        sources = sorted((paths.patches_dir() / "toa").glob("*.c"))
    jobs: list[tuple[Path, list[str]]] = [
        (p, []) for p in (read_series() if patches is None else patches)]
    jobs += [(p, ["-f"]) for p in sources]
    problems = []
    for p, mode in jobs:
        res = subprocess.run(
            ["perl", str(script), "--no-tree", "--strict", "--quiet", *mode,
             "--ignore", "FILE_PATH_CHANGES,SPDX_LICENSE_TAG", str(p.resolve())],
            # checkpatch drops a cache file into its working directory.
            cwd=src, capture_output=True, text=True, check=False,
        )
        if res.returncode != 0 or res.stdout.strip():
            problems.append((p, res.stdout + res.stderr))
    return problems


# ---- the real-server TOA module (kernel_patches/toa) ----------------------------------

TOA_SOURCES = ("toa.c", "Kbuild")


def toa_dir() -> Path:
    return paths.patches_dir() / "toa"


def toa_key(kernel: Kernel, src: Path | None = None) -> str:
    """Hash of everything that determines toa.ko."""
    src = src or toa_dir()
    h = hashlib.sha256()
    h.update(f"builder={BUILDER_VERSION}\nkernel={kernel.version}\n".encode())
    for name in TOA_SOURCES:
        h.update(name.encode() + b"\0" + (src / name).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build_toa(force: bool = False) -> BuildResult:
    """Build (or reuse) ``toa.ko`` for the installed 6.1 kernel, cached under
    ``build/kmod/<kver>/toa-<key>/`` and renamed into place only when complete."""
    kernel = ensure_toolchain()
    src = toa_dir()
    missing = [n for n in TOA_SOURCES if not (src / n).is_file()]
    if missing:
        raise KmodError(f"{src}: missing {', '.join(missing)}")
    key = toa_key(kernel, src)
    out = cached_build(kernel, f"toa-{key}")
    if (out / "toa.ko").exists() and not force:
        return _toa_result(kernel, key, out, rebuilt=False)

    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".build-toa-{key}-", dir=out.parent))
    try:
        tree = scratch / "src"
        tree.mkdir()
        for name in TOA_SOURCES:
            shutil.copy2(src / name, tree / name)
        res = subprocess.run(
            ["make", "-C", str(kernel.build_tree), f"M={tree}", "-j2", "modules"],
            capture_output=True, text=True, check=False,
        )
        if res.returncode != 0 or not (tree / "toa.ko").exists():
            raise KmodError(f"toa.ko does not compile:\n{_error_lines(res.stdout + res.stderr)}")
        result_dir = scratch / "result"
        result_dir.mkdir()
        shutil.copy2(tree / "toa.ko", result_dir / "toa.ko")
        if out.exists():
            shutil.rmtree(out)
        result_dir.rename(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return _toa_result(kernel, key, out, rebuilt=True)


def _toa_result(kernel: Kernel, key: str, out: Path, rebuilt: bool) -> BuildResult:
    return BuildResult(kernel=kernel, key=key, directory=out, modules=(out / "toa.ko",),
                       rebuilt=rebuilt)
