"""Generate the guest's initramfs: a static busybox, the modules needed to
mount the host root over 9p with an overlay, and ``initramfs_init.sh`` as /init.

Cached under ``build/guest/<kver>/`` keyed by the kernel, busybox and script.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import tempfile
from pathlib import Path

from ipvs_synproxy.build import apt, paths
from ipvs_synproxy.build.kmod import Kernel

# Load order matters: each module's dependencies come before it.
INITRAMFS_MODULES = (
    "virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
    "virtio_pci", "netfs", "fscache", "9pnet", "9pnet_virtio", "9p", "overlay",
)
BUSYBOX = Path("/bin/busybox")
INIT_SCRIPT = Path(__file__).with_name("initramfs_init.sh")


def _find_module(kernel: Kernel, name: str) -> Path:
    hits = list((kernel.modules_dir / "kernel").rglob(f"{name}.ko"))
    if not hits:
        raise FileNotFoundError(f"module {name}.ko not found under {kernel.modules_dir}")
    return hits[0]


def _key(kernel: Kernel, files: list[Path]) -> str:
    h = hashlib.sha256(kernel.version.encode())
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def build_initramfs(kernel: Kernel) -> Path:
    apt.ensure_debs(["busybox-static", "cpio"])
    modules = [_find_module(kernel, m) for m in INITRAMFS_MODULES]
    key = _key(kernel, [BUSYBOX, INIT_SCRIPT, *modules])
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
        for m in modules:
            shutil.copy2(m, root / "modules" / m.name)
        (root / "modules.list").write_text("\n".join(INITRAMFS_MODULES) + "\n")
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

