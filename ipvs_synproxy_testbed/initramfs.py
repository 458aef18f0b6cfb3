"""Generate the guest's initramfs: a static busybox, the modules needed to
mount the host root over 9p with an overlay, and ``initramfs_init.sh`` as /init.

Cached under ``build/guest/<kver>/`` keyed by the kernel, busybox and script.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import shutil
import tempfile
from pathlib import Path

from ipvs_synproxy.build import apt, paths
from ipvs_synproxy.build.kmod import Kernel

# What the guest's /init needs to mount the host's root; their dependencies
# come from the kernel's modules.dep (6.1 has fscache and virtio as modules,
# 6.12 folds fscache into netfs and builds virtio in).
INITRAMFS_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
BUSYBOX = Path("/bin/busybox")
INIT_SCRIPT = Path(__file__).with_name("initramfs_init.sh")


def _module_name(rel: str) -> str:
    name = rel.rsplit("/", 1)[-1]
    for suffix in (".xz", ".zst", ".gz"):
        name = name.removesuffix(suffix)
    return name.removesuffix(".ko").replace("-", "_")


def _module_table(kernel: Kernel) -> tuple[dict[str, tuple[Path, list[str]]], set[str]]:
    """name -> (file, dependency names) from modules.dep; the built-in names."""
    table: dict[str, tuple[Path, list[str]]] = {}
    for line in (kernel.modules_dir / "modules.dep").read_text().splitlines():
        mod, _, deps = line.partition(":")
        table[_module_name(mod)] = (kernel.modules_dir / mod,
                                    [_module_name(d) for d in deps.split()])
    builtin_file = kernel.modules_dir / "modules.builtin"
    builtin = {_module_name(x) for x in builtin_file.read_text().split()} \
        if builtin_file.exists() else set()
    return table, builtin


def load_order(kernel: Kernel, wanted: tuple[str, ...] = INITRAMFS_MODULES
               ) -> list[tuple[str, Path]]:
    """The modules to insmod, each after its dependencies; built-ins left out."""
    table, builtin = _module_table(kernel)
    order: list[tuple[str, Path]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or name in builtin:
            return
        seen.add(name)
        if name not in table:
            raise FileNotFoundError(f"module {name} is neither built in nor in "
                                    f"{kernel.modules_dir}/modules.dep")
        path, deps = table[name]
        for dep in deps:
            visit(dep)
        order.append((name, path))

    for name in wanted:
        visit(name)
    return order


def _module_bytes(path: Path) -> bytes:
    """The module as busybox insmod takes it: decompressed."""
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".gz":
        return gzip.decompress(data)
    if path.suffix == ".zst":
        raise FileNotFoundError(f"{path}: zstd-compressed modules are not supported")
    return data


def _key(kernel: Kernel, files: list[Path]) -> str:
    h = hashlib.sha256(kernel.version.encode())
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def build_initramfs(kernel: Kernel) -> Path:
    apt.ensure_debs(["busybox-static", "cpio"])
    modules = load_order(kernel)
    key = _key(kernel, [BUSYBOX, INIT_SCRIPT, *(path for _, path in modules)])
    out = paths.build_dir() / "guest" / kernel.version / f"initramfs-{key}.cpio.gz"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="initramfs-") as t:
        root = Path(t)
        for d in ("bin", "dev", "proc", "sys", "modules"):
            (root / d).mkdir()
        shutil.copy2(BUSYBOX, root / "bin" / "busybox")
        shutil.copy2(INIT_SCRIPT, root / "init")
        os.chmod(root / "init", 0o755)
        for name, path in modules:
            (root / "modules" / f"{name}.ko").write_bytes(_module_bytes(path))
        (root / "modules.list").write_text("".join(f"{name}\n" for name, _ in modules))
        data = _newc_archive(root)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(data, compresslevel=1))
    tmp.rename(out)
    return out


def _newc_archive(root: Path) -> bytes:
    """A cpio 'newc' archive of ``root`` (what the kernel unpacks)."""
    buf = io.BytesIO()
    ino = 1
    entries = sorted(root.rglob("*"))
    for p in entries:
        rel = p.relative_to(root).as_posix()
        st = p.lstat()
        body = p.read_bytes() if p.is_file() else b""
        _cpio_entry(buf, rel, st.st_mode, ino, len(body), body)
        ino += 1
    # The console device node must exist before devtmpfs is mounted.
    _cpio_entry(buf, "dev/console", 0o020600, ino, 0, b"", rdev=(5, 1))
    _cpio_entry(buf, "TRAILER!!!", 0, 0, 0, b"")
    return buf.getvalue()


def _cpio_entry(buf: io.BytesIO, name: str, mode: int, ino: int, size: int, body: bytes,
                rdev: tuple[int, int] = (0, 0)) -> None:
    nameb = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, 0, size, 0, 0, rdev[0], rdev[1], len(nameb), 0)
    buf.write(b"070701" + b"".join(f"{v:08x}".encode() for v in fields))
    buf.write(nameb)
    buf.write(b"\0" * ((4 - (110 + len(nameb)) % 4) % 4))
    buf.write(body)
    buf.write(b"\0" * ((4 - size % 4) % 4))

