"""The few bpf(2) commands the XDP fast path needs, on pinned objects.

Loading the program is left to Debian's bpftool (``xdp.py``); what the
control plane does afterwards -- open a pinned map, write the services and the
cookie configuration into it, read its per-CPU counters -- is a handful of
syscalls, done here with ctypes so that no extra package is needed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct

_NR_BPF = 321  # x86_64

BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_GET = 7
BPF_OBJ_GET_INFO_BY_FD = 15

BPF_ANY = 0

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BpfError(OSError):
    """A bpf(2) call failed; errno and a sentence saying what was tried."""


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
    ret = _libc.syscall(_NR_BPF, cmd, attr, len(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return int(ret)


def _attr(size: int = 128) -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(size)


def obj_get(path: str) -> int:
    """A file descriptor of the object pinned at ``path`` (close it)."""
    name = ctypes.create_string_buffer(os.fsencode(path))
    attr = _attr()
    struct.pack_into("=QII", attr, 0, ctypes.addressof(name), 0, 0)
    return _bpf(BPF_OBJ_GET, attr, f"opening {path}")


def _elem_attr(fd: int, key: ctypes.Array[ctypes.c_char],
               value: ctypes.Array[ctypes.c_char] | None, flags: int = 0
               ) -> ctypes.Array[ctypes.c_char]:
    attr = _attr()
    struct.pack_into("=IIQQQ", attr, 0, fd, 0, ctypes.addressof(key),
                     ctypes.addressof(value) if value is not None else 0, flags)
    return attr


def update(fd: int, key: bytes, value: bytes) -> None:
    k, v = ctypes.create_string_buffer(key, len(key)), ctypes.create_string_buffer(value,
                                                                                   len(value))
    _bpf(BPF_MAP_UPDATE_ELEM, _elem_attr(fd, k, v, BPF_ANY), "updating a map entry")


def delete(fd: int, key: bytes) -> bool:
    """Remove ``key``; False when it was not there."""
    k = ctypes.create_string_buffer(key, len(key))
    try:
        _bpf(BPF_MAP_DELETE_ELEM, _elem_attr(fd, k, None), "deleting a map entry")
    except BpfError as exc:
        if exc.errno == 2:  # ENOENT
            return False
        raise
    return True


def lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value of ``key`` (``value_size`` bytes: for a per-CPU map, the value
    size times :func:`possible_cpus`), or None when there is none."""
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    try:
        _bpf(BPF_MAP_LOOKUP_ELEM, _elem_attr(fd, k, v), "reading a map entry")
    except BpfError as exc:
        if exc.errno == 2:
            return None
        raise
    return v.raw


def keys(fd: int, key_size: int) -> list[bytes]:
    """Every key of a hash map."""
    out: list[bytes] = []
    cur: bytes | None = None
    while True:
        k = ctypes.create_string_buffer(cur or b"", key_size)
        nxt = ctypes.create_string_buffer(key_size)
        attr = _attr()
        struct.pack_into("=IIQQ", attr, 0, fd, 0,
                         ctypes.addressof(k) if cur is not None else 0, ctypes.addressof(nxt))
        try:
            _bpf(BPF_MAP_GET_NEXT_KEY, attr, "walking a map")
        except BpfError as exc:
            if exc.errno == 2:
                return out
            raise
        cur = nxt.raw
        out.append(cur)


def possible_cpus() -> int:
    """How many values a per-CPU map entry holds."""
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n = max(n, int(hi or lo) + 1)
    return n
