"""Enter named network namespaces (``ip netns`` names) from Python.

The control plane works on another namespace's IPVS (``--netns lb``) and the
testbed runs whole topologies this way: a socket belongs to the namespace of
the thread that created it and keeps it for life, so :func:`socket_in` makes
the socket in a short helper thread and the caller's namespace is never
touched. Spawning ``ip netns exec`` would cost a whole process.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import socket
import threading
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def netns(name: str) -> Iterator[None]:
    """Run the body of the ``with`` in network namespace ``name`` (this thread only)."""
    with open("/proc/thread-self/ns/net", "rb") as orig:
        with open(os.path.join(NETNS_RUN_DIR, name), "rb") as target:
            _setns(target.fileno())
        try:
            yield
        finally:
            _setns(orig.fileno())


def socket_in(ns: str, family: int, kind: int, proto: int = 0) -> socket.socket:
    """A socket created in namespace ``ns`` (it stays there, whichever thread uses
    it later). Made in a short helper thread so the caller's namespace is never
    touched."""
    box: list[socket.socket | BaseException] = []

    def make() -> None:
        try:
            with netns(ns):
                box.append(socket.socket(family, kind, proto))
        except BaseException as exc:  # re-raised in the caller's thread
            box.append(exc)

    t = threading.Thread(target=make, name=f"netns-{ns}")
    t.start()
    t.join()
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]
