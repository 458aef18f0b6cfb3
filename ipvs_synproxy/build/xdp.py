"""Build the SYN proxy's XDP program (xdp/ipvs_synproxy_xdp.c) with Debian's
clang for the BPF target, against libbpf-dev's helper headers; the object is
cached under ``build/xdp/`` by the source's hash."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

from ipvs_synproxy.build import apt, paths

# clang (BPF target), llvm (its tools), libbpf-dev (bpf_helpers.h), bpftool
# (loads and pins the program)
BUILD_DEBS = ["clang", "llvm", "libbpf-dev", "bpftool"]
CFLAGS = ["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"]


class XdpBuildError(RuntimeError):
    """The program did not build; the message has clang's output."""


def _multiarch_include() -> list[str]:
    """<asm/types.h> lives under the host's multiarch directory."""
    res = subprocess.run(["gcc", "-print-multiarch"], capture_output=True, text=True,
                         check=False)
    arch = res.stdout.strip()
    return [f"-I/usr/include/{arch}"] if res.returncode == 0 and arch else []


def build(source: Path | None = None) -> Path:
    """The object of ``source`` (default: the project's), built if needed."""
    src = source or paths.xdp_source()
    apt.ensure_debs(BUILD_DEBS)
    if shutil.which("clang") is None:
        raise XdpBuildError("clang is missing (Debian package clang)")
    key = hashlib.sha256(src.read_bytes() + " ".join(CFLAGS).encode()).hexdigest()[:16]
    out = paths.build_dir() / "xdp" / key / "ipvs_synproxy_xdp.o"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    res = subprocess.run(["clang", *CFLAGS, *_multiarch_include(), "-c", str(src),
                          "-o", str(tmp)], capture_output=True, text=True, check=False)
    if res.returncode:
        raise XdpBuildError(f"clang failed on {src}:\n{res.stderr.strip()}")
    tmp.replace(out)
    return out
