"""Build the patched IPVS modules out of tree against the installed headers.

One patch series per kernel series (:data:`SUPPORTED_SERIES`): for a target
kernel of series S the pristine IPVS sources come from Debian's
``linux-source-S``, the quilt series in ``kernel_patches/linux-S`` is applied
on a private copy and the result built with the kernel's own kbuild
(``make -C …/build M=…``), the same way DKMS does it. Which kernel packages a
series means is asked of apt (the newest ``linux-image-S…-amd64`` with its
headers), never written down, so the same code works wherever apt serves
that series. Results are cached under ``build/kmod/<kver>/<key>`` where the
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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ipvs_synproxy.build import apt, paths

# The kernel series with a complete patch series in kernel_patches/linux-<S>/,
# oldest first: defaults, `make test` and the DKMS test cover these. A series joins
# the list only when its patches carry every feature and the whole guest suite
# passes on it in `make test`.
SUPPORTED_SERIES = ("6.1", "6.12")
# Series whose patches are complete but not yet held to the whole suite in
# `make test`: built, checkpatched and bootable with an explicit --kernel.
PREVIEW_SERIES: tuple[str, ...] = ()
# What every build needs besides the kernel's own packages.
BUILD_DEBS = ["build-essential", "bc", "xz-utils", "patch", "kmod"]

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


def series_of(version: str) -> str:
    """The series (``major.minor``) of a kernel release such as 6.12.118+deb12-amd64."""
    m = re.match(r"(\d+)\.(\d+)(?!\d)", version)
    if not m:
        raise KmodError(f"not a kernel release: {version!r}")
    return f"{m.group(1)}.{m.group(2)}"


def known_series() -> tuple[str, ...]:
    """Every series with a patch series: the supported ones, then the previews."""
    return SUPPORTED_SERIES + PREVIEW_SERIES


def check_series(series: str) -> str:
    """``series`` if this project has a patch series for it, else a clear error."""
    if series not in known_series():
        preview = f" (preview: {', '.join(PREVIEW_SERIES)})" if PREVIEW_SERIES else ""
        raise KmodError(f"no patch series for Linux {series}: supported are "
                        f"{', '.join(SUPPORTED_SERIES)}{preview} "
                        "(kernel_patches/linux-<series>/)")
    return series


@dataclass(frozen=True)
class Kernel:
    version: str  # uname -r of the target, e.g. 6.1.0-56-amd64

    @property
    def series(self) -> str:
        return series_of(self.version)

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


def installed_kernels(series: str) -> list[Kernel]:
    """Installed kernels of ``series`` that have both image and headers, oldest first."""
    found = []
    for d in Path("/lib/modules").glob(f"{series}.*"):
        k = Kernel(d.name)
        if k.series == series and k.image.exists() and (k.build_tree / "Makefile").exists():
            found.append(k)
    return sorted(found, key=lambda k: _version_key(k.version))


def image_version(kernel: Kernel) -> str | None:
    """The Debian version of the kernel's installed image package."""
    for pkg in (f"linux-image-{kernel.version}", f"linux-image-{kernel.version}-unsigned"):
        version = apt.installed_version(pkg)
        if version:
            return version
    return None


def source_kernels(series: str) -> list[Kernel]:
    """Installed kernels of ``series`` built from the installed linux-source
    package: the patches apply to that source, and its IPVS must compile
    against the kernel's headers (a stable update changes the headers'
    API: 6.1.176 lacks the dst_rt6_info() of 6.1.192). All of them if no
    source is installed yet, oldest first."""
    found = installed_kernels(series)
    source = apt.installed_version(f"linux-source-{series}")
    if source is None:
        return found
    return [k for k in found if image_version(k) == source]


def find_kernel(series: str = SUPPORTED_SERIES[-1]) -> Kernel:
    """The newest installed Debian kernel of ``series`` with image and headers,
    of the installed linux-source's version."""
    found = source_kernels(series)
    if not found:
        have = ", ".join(k.version for k in installed_kernels(series)) or "none"
        raise KmodError(f"no Linux {series} kernel with headers of the version of "
                        f"linux-source-{series} is installed (installed: {have}; "
                        f"ipvs-synproxy kmod build --kernel {series} installs one)")
    return found[-1]


def _kernel_packages_re(series: str) -> re.Pattern[str]:
    # linux-image-6.1.0-57-amd64, linux-image-6.12.118+deb12-amd64: one flavour,
    # signed or not; never the metapackages, -dbg, -rt or -cloud.
    return re.compile(rf"linux-image-({re.escape(series)}[.-]\d[\w.+~-]*?-amd64)(-unsigned)?")


def apt_kernel(series: str) -> tuple[str, list[str]] | None:
    """(kernel release, its image and headers packages): the newest of ``series``
    that the host's apt sources serve, or None."""
    pat = _kernel_packages_re(series)
    names = set(apt.package_names("linux-image-" + series))
    headers = set(apt.package_names("linux-headers-" + series))
    best: dict[str, str] = {}
    for name in names:
        m = pat.fullmatch(name)
        if m and f"linux-headers-{m.group(1)}" in headers:
            kver = m.group(1)
            # the signed image is the one a distribution boots; unsigned if alone
            if kver not in best or not m.group(2):
                best[kver] = name
    if not best:
        return None
    kver = max(best, key=_version_key)
    return kver, [best[kver], f"linux-headers-{kver}"]


def served_series() -> list[str]:
    """The supported series whose source package apt serves, oldest first."""
    sources = set(apt.package_names("linux-source-"))
    return [s for s in SUPPORTED_SERIES if f"linux-source-{s}" in sources]


def default_series() -> str:
    """The newest supported series that apt serves (or, offline, is installed)."""
    served = served_series()
    if served:
        return served[-1]
    have = [s for s in SUPPORTED_SERIES if installed_kernels(s)]
    if have:
        return have[-1]
    raise KmodError(f"apt serves no linux-source package of a supported series "
                    f"({', '.join(SUPPORTED_SERIES)}) and none is installed")


def build_debs(series: str) -> list[str]:
    """Everything building for ``series`` needs, as apt would install it now."""
    check_series(series)
    debs = [*BUILD_DEBS, f"linux-source-{series}"]
    if not source_kernels(series):
        # Choose from fresh lists: the install refreshes them first, and a
        # kernel chosen from stale ones is older than the source it gets.
        apt.update()
        found = apt_kernel(series)
        if found is None:
            raise KmodError(f"apt serves no linux-image-{series}.*-amd64 with headers")
        debs += found[1]
    return debs


def ensure_toolchain(series: str | None = None) -> Kernel:
    """Install what a build for ``series`` (default: :func:`default_series`) needs;
    return the newest installed kernel of that series."""
    series = check_series(series or default_series())
    apt.ensure_debs(build_debs(series))
    return find_kernel(series)


def series_dir(series: str = SUPPORTED_SERIES[-1]) -> Path:
    return paths.patches_dir() / f"linux-{series}"


def read_series(sdir: Path | None = None, *, series: str | None = None) -> list[Path]:
    """The patches listed in ``series`` (of ``sdir``, default the kernel series'
    own directory), in order (quilt syntax: ``#`` comments, blank lines and
    ``-pN`` suffixes are allowed)."""
    sdir = sdir or series_dir(series or SUPPORTED_SERIES[-1])
    listing = sdir / "series"
    try:
        text = listing.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        # never build without the patches: that would be stock IPVS under our name
        raise KmodError(f"cannot read the patch series {listing}: "
                        f"{getattr(exc, 'strerror', None) or exc}") from None
    out = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name = line.split()[0]
        p = sdir / name
        if not p.is_file():
            raise KmodError(f"{listing}:{lineno}: patch {name} listed but not found")
        out.append(p)
    if not out:
        raise KmodError(f"the patch series {listing} lists no patch")
    return out


def series_key(patches: list[Path], kernel: Kernel) -> str:
    """Hash of everything that determines the built modules."""
    h = hashlib.sha256()
    h.update(f"builder={BUILDER_VERSION}\nkernel={kernel.version}\n".encode())
    h.update(f"source={_deb_version(f'linux-source-{kernel.series}')}\n".encode())
    for p in patches:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _deb_version(pkg: str) -> str:
    res = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg],
                         capture_output=True, text=True, check=False)
    return res.stdout.strip() or "unknown"


def pristine_source(series: str = SUPPORTED_SERIES[-1]) -> Path:
    """Extract (once) the files we need from linux-source-<series>; return the tree."""
    pkg = f"linux-source-{series}"
    apt.ensure_debs([pkg, "xz-utils"])
    tarball, prefix = Path(f"/usr/src/{pkg}.tar.xz"), f"{pkg}/"
    dest = paths.build_dir() / "src" / f"{pkg}-{_deb_version(pkg)}"
    if (dest / ".complete").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest.parent))
    try:
        with tarfile.open(tarball, "r:xz") as tar:
            members = [
                m for m in tar.getmembers()
                if m.name.startswith(prefix)
                and m.name[len(prefix):].startswith(SOURCE_MEMBERS)
            ]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(tmp, members=members, filter="data")
        if not (tmp / IPVS_SUBDIR / "ip_vs_core.c").exists():
            raise KmodError(f"{tarball} has no {IPVS_SUBDIR}")
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


def build(force: bool = False, patches: list[Path] | None = None,
          series: str | None = None) -> BuildResult:
    """Build (or reuse) the patched modules for the newest installed kernel of
    ``series`` (default: :func:`default_series`), installing it if need be."""
    kernel = ensure_toolchain(series)
    if patches is None:
        patches = read_series(series=kernel.series)
    key = series_key(patches, kernel)
    out = cached_build(kernel, key)
    manifest = out / "manifest.json"
    if manifest.exists() and not force:
        return _result(kernel, key, out, rebuilt=False)

    src = pristine_source(kernel.series)
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


def dkms_exclusive(series: str) -> str:
    """DKMS's BUILD_EXCLUSIVE_KERNEL for a series: a regex of its releases only."""
    return "^" + series.replace(".", r"\.") + r"\."


_OBJ_LINE = re.compile(r"^obj-\$\((CONFIG_IP_VS[A-Z0-9_]*)\)\s*\+=\s*(.+)$")
_IPVS_DIR = "net/netfilter/ipvs"


def kernel_config(kernel: Kernel) -> dict[str, str]:
    """The kernel's build configuration (``CONFIG_X`` -> value), from its headers."""
    for path in (kernel.build_tree / ".config", Path("/boot") / f"config-{kernel.version}"):
        if path.exists():
            config = {}
            for line in path.read_text().splitlines():
                key, eq, value = line.partition("=")
                if eq and key.startswith("CONFIG_"):
                    config[key] = value
            return config
    raise KmodError(f"no build configuration for {kernel.version} "
                    f"(looked for {kernel.build_tree / '.config'})")


def tree_modules(tree: Path, config: dict[str, str]) -> list[str]:
    """The modules the IPVS Makefile of a source tree builds for a kernel of
    ``config``, in the Makefile's order: an out-of-tree build follows the
    kernel's configuration, and Debian's 6.1 leaves ip_vs_twos out although
    its source has it."""
    names: list[str] = []
    makefile = tree / _IPVS_DIR / "Makefile"
    for line in makefile.read_text().splitlines():
        m = _OBJ_LINE.match(line.strip())
        if m and config.get(m.group(1)) == "m":
            names += [o[:-2] for o in m.group(2).split() if o.endswith(".o")]
    if not names:
        raise KmodError(f"{makefile} names no IPVS module that the kernel's "
                        "configuration builds as a module")
    return names


def dkms_modules(names: list[str], base: str = "") -> str:
    """dkms.conf's per-module lines: where each is built (below ``base`` of
    the DKMS tree) and where it lands."""
    lines: list[str] = []
    for i, name in enumerate(names):
        lines += [f'BUILT_MODULE_NAME[{i}]="{name}"',
                  f'BUILT_MODULE_LOCATION[{i}]="{base}{_IPVS_DIR}/"',
                  f'DEST_MODULE_LOCATION[{i}]="/updates/dkms"']
    return "\n".join(lines)


def export_tree(dest: Path, version: str, series: str | None = None) -> Path:
    """Write the patched source tree of ``series`` for DKMS (or a manual build)
    to ``dest``; its dkms.conf refuses every kernel of another series and
    lists the modules the newest installed kernel of the series configures."""
    if dest.exists() and any(dest.iterdir()):
        raise KmodError(f"{dest} exists and is not empty")
    series = check_series(series or default_series())
    config = kernel_config(find_kernel(series))
    patches = read_series(series=series)
    src = pristine_source(series)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=dest.parent if dest.parent.exists()
                                else None))
    try:
        tree = tmp / "tree"
        assemble_tree(src, tree)
        for p in patches:
            apply_patch(tree, p)
        glue = paths.patches_dir()
        shutil.copy2(glue / "dkms" / "Makefile", tree / "Makefile")
        conf = (glue / "dkms.conf").read_text().replace("@VERSION@", version) \
            .replace("@KERNEL_REGEX@", dkms_exclusive(series)) \
            .replace("@MODULES@", dkms_modules(tree_modules(tree, config)))
        (tree / "dkms.conf").write_text(conf)
        (tree / "PATCHES").write_text("".join(p.name + "\n" for p in patches))
        if dest.exists():
            dest.rmdir()
        shutil.move(str(tree), dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def export_all(dest: Path, version: str, series: Sequence[str] | None = None) -> Path:
    """One DKMS source tree for several kernel series (default: every
    supported one apt serves), as a distribution package ships it: each
    series' tree under ``linux-<series>/`` and a dkms.conf that picks the tree
    by the kernel's version and refuses every other series."""
    chosen = [check_series(s) for s in (series or served_series())]
    if not chosen:
        raise KmodError("no kernel series to export (apt serves none of "
                        f"{', '.join(SUPPORTED_SERIES)})")
    if dest.exists() and any(dest.iterdir()):
        raise KmodError(f"{dest} exists and is not empty")
    dest.mkdir(parents=True, exist_ok=True)
    branches = []
    for s in chosen:
        sub = export_tree(dest / f"linux-{s}", version, s)
        names = tree_modules(sub, kernel_config(find_kernel(s)))
        branches.append((s, dkms_modules(names, f"linux-{s}/").splitlines()))
    (dest / "dkms.conf").write_text(_multi_dkms_conf(version, branches))
    return dest


def _multi_dkms_conf(version: str, branches: list[tuple[str, list[str]]]) -> str:
    """dkms.conf is shell that DKMS sources with $kernelver set."""
    regex = "^(" + "|".join(s.replace(".", r"\.") for s, _ in branches) + r")\."
    lines = ["# DKMS configuration of ipvs-synproxy for several kernel series: the tree",
             "# under linux-<series>/ that matches the kernel is built; other series are",
             "# refused (BUILD_EXCLUSIVE_KERNEL). Written by ipvs-synproxy kmod dkms-tree.",
             'PACKAGE_NAME="ipvs-synproxy"', f'PACKAGE_VERSION="{version}"',
             'AUTOINSTALL="yes"', f'BUILD_EXCLUSIVE_KERNEL="{regex}"',
             f'SERIES="{branches[-1][0]}"', 'case "${kernelver}" in']
    lines += [f'    {s}.*) SERIES="{s}" ;;' for s, _ in branches]
    lines += ["esac", 'MAKE[0]="make -C linux-${SERIES} KVER=${kernelver}"',
              'CLEAN="make -C linux-${SERIES} KVER=${kernelver} clean"']
    for s, located in branches:
        lines += [f'if [ "$SERIES" = "{s}" ]; then', *(f"    {ln}" for ln in located), "fi"]
    return "\n".join(lines) + "\n"


def checkpatch(patches: list[Path] | None = None,
               sources: list[Path] | None = None,
               series: str = SUPPORTED_SERIES[-1]) -> list[tuple[Path, str]]:
    """Run the checkpatch.pl of ``series``' source --strict over its patches
    (and, as plain files, the real-server module's C sources); return (file,
    report) for every file with findings."""
    src = pristine_source(series)
    script = src / "scripts" / "checkpatch.pl"
    if sources is None:
        sources = sorted((paths.patches_dir() / "toa").glob("*.c"))
    jobs: list[tuple[Path, list[str]]] = [
        (p, []) for p in (read_series(series=series) if patches is None else patches)]
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


def build_toa(force: bool = False, series: str | None = None) -> BuildResult:
    """Build (or reuse) ``toa.ko`` for the newest installed kernel of ``series``,
    cached under ``build/kmod/<kver>/toa-<key>/`` and renamed into place only
    when complete."""
    kernel = ensure_toolchain(series)
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
