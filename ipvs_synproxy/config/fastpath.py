"""The config file's ``xdp:`` interfaces against the namespace's XDP programs
(:mod:`ipvs_synproxy.kernel.xdp`): what is attached now, what stops an
apply before it changes anything, and the target that attaches and detaches.

Only our programs are managed: those pinned under the namespace's directory
of ``/sys/fs/bpf/ipvs-synproxy/``. A device that runs somebody else's XDP
program is a problem of the plan, never overwritten.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from pyroute2.netlink.exceptions import NetlinkError as RtnlError

from ipvs_synproxy.config.state import XdpAttachment
from ipvs_synproxy.kernel import xdp
from ipvs_synproxy.kernel.netlink import IPVS

DETACHED = "detached"  # our pins, on no device
SECRET_LEN = 16


def _mode(dev: str, netns: str | None) -> str:
    return xdp.pinned_mode(dev, netns) or DETACHED


def read_attachments(netns: str | None) -> dict[str, str]:
    """Device -> mode of each program of ours pinned in ``netns``: native,
    generic (offload, unknown) or :data:`DETACHED`."""
    try:
        devs = xdp.attached_devices(netns)
    except OSError:  # no BPF file system, or no right to read it: nothing of ours
        return {}
    return {dev: _mode(dev, netns) for dev in devs}


def satisfies(have: str, want: str) -> bool:
    """Whether a program attached in mode ``have`` is what the file's ``want``
    asks for: auto takes either mode the kernel chose."""
    return have == want or (want == "auto" and have in ("native", "generic"))


def _where(netns: str | None) -> str:
    return f" in netns {netns}" if netns else ""


def _device_problem(dev: str, netns: str | None, ours: bool) -> str | None:
    try:
        mode, prog_id = xdp.device_state(dev, netns)
    except (xdp.XdpError, OSError, RtnlError):
        return f"xdp: no device {dev}{_where(netns)}"
    if mode is not None and not ours:
        return (f"xdp: {dev} runs an XDP program that is not ours (id {prog_id}): take it "
                f"off first (ip link set dev {dev} xdp off)")
    return None


def problems(netns: str | None, attach: Sequence[XdpAttachment], current: dict[str, str],
             can_set_secret: bool) -> list[str]:
    """What stops the programs of ``attach`` from being attached in ``netns``
    (checked before anything is changed)."""
    out = []
    for a in attach:
        why = _device_problem(a.dev, netns, current.get(a.dev, DETACHED) != DETACHED)
        if why is not None:
            out.append(why)
    if attach and not can_set_secret:
        out.append("xdp: the loaded IPVS modules cannot set the SYN proxy secret, which the "
                   "XDP program must share with them (needs the ipvs-synproxy modules with "
                   "the SYN proxy)")
    return out


class KernelXdp:
    """The target of the plan's XDP changes (:class:`plan.XdpTarget`).

    The first attach sets ``secret`` (the file's, or a new random one) in the
    module and in every program pinned in the namespace, the new one
    included, through :func:`xdp.set_secret`; the later ones only write
    their own program, the module holding it already. Re-attaching what an
    undo needs is possible only once the module is known to hold a secret."""

    def __init__(self, ipvs: IPVS, build: Callable[[], Path] | None,
                 secret: bytes | None) -> None:
        self.ipvs = ipvs
        self.build = build
        self.secret = secret
        self.module_holds: bytes | None = None  # the secret this apply set in the module
        self._obj: Path | None = None

    def obj(self) -> Path:
        """The program's object, built (or found in the cache) once."""
        if self._obj is None:
            if self.build is None:
                raise xdp.XdpError("no way to build the XDP program was given")
            self._obj = self.build()
        return self._obj

    def attach_xdp(self, dev: str, mode: str) -> None:
        if mode == DETACHED:  # undoing the removal of stale pins: nothing to put back
            return
        secret = self.module_holds if self.module_holds is not None else self.secret
        if secret is None:
            raise xdp.XdpError(f"cannot attach XDP to {dev}: the module's cookie secret "
                               "cannot be read back (ipvs-synproxy xdp attach sets a new one)")
        want = mode if mode in xdp.MODES else "auto"
        xdp.attach(self.obj(), dev, self.ipvs.netns, self.ipvs, secret, want,
                   module=self.module_holds is None)
        self.module_holds = secret

    def detach_xdp(self, dev: str) -> None:
        xdp.detach(dev, self.ipvs.netns, missing_ok=True)


def new_secret() -> bytes:
    """A random cookie secret, for the module and the programs at once: the
    module's own cannot be read back to give to a program."""
    return os.urandom(SECRET_LEN)
