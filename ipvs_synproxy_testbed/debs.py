"""``make deb``: the Debian packages, built by Debian's own tooling.

Copies the checkout's files (tracked, or new and not ignored: what a clean
clone of the next commit holds) to ``DIR/src`` and runs ``dpkg-buildpackage``
there, with the project's virtualenv as the build's Python (its pip fetches
the private libraries from PyPI) and the checkout's build cache (kernel
sources, keepalived). The packages land in DIR.
Usage: ``python -m ipvs_synproxy_testbed.debs DIR``
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ipvs_synproxy.build import paths

PACKAGES = ("ipvs-synproxy", "ipvs-synproxy-dkms", "toa-dkms", "keepalived-synproxy")


def checkout_files() -> list[str]:
    """The checkout's files, sorted: tracked, or new and not ignored (what a
    clean clone of the next commit holds)."""
    root = paths.project_root()
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], cwd=root, capture_output=True,
                           check=True).stdout.decode().split("\0")
    return sorted(n for n in names if n and (root / n).is_file())


def copy_checkout(dest: Path) -> None:
    root = paths.project_root()
    for name in checkout_files():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, dest / name, follow_symlinks=False)


def content_key() -> str:
    """A hash of the files a build copies: equal keys, equal packages."""
    root = paths.project_root()
    h = hashlib.sha256()
    for name in checkout_files():
        h.update(name.encode() + b"\0" + (root / name).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build_cached() -> list[Path]:
    """The packages of the checkout as it is, built once per content (the
    DKMS tests of two kernel series run at the same time and share them)."""
    out = paths.build_dir() / "deb-cache" / content_key()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / ".complete").exists():
            return sorted(out.glob("*.deb"))
        shutil.rmtree(out, ignore_errors=True)
        for old in out.parent.iterdir():    # earlier contents' packages
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
        debs = build(out)
        (out / ".complete").touch()
        return debs


def build(out: Path) -> list[Path]:
    """Build the packages into ``out``; their paths."""
    src = out / "src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    copy_checkout(src)
    env = {**os.environ, "PYTHON": sys.executable,
           "IPVS_SYNPROXY_BUILD": str(paths.build_dir())}
    res = subprocess.run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=src, env=env,
                         capture_output=True, text=True, check=False)
    (out / "build.log").write_text(res.stdout + res.stderr)
    if res.returncode != 0:
        raise RuntimeError(f"dpkg-buildpackage failed ({res.returncode}); the end of "
                           f"{out / 'build.log'}:\n" + "\n".join(
                               (res.stdout + res.stderr).splitlines()[-40:]))
    debs = sorted(out.glob("*.deb"))
    missing = [p for p in PACKAGES if not any(d.name.startswith(f"{p}_") for d in debs)]
    if missing:
        raise RuntimeError(f"dpkg-buildpackage made no package {missing}")
    return debs


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        debs = build(Path(argv[1]).resolve())
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"make deb: {exc}", file=sys.stderr)
        return 1
    for d in debs:
        print(d)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
