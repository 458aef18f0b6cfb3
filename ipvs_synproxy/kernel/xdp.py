"""The XDP fast path of the SYN proxy (xdp/ipvs_synproxy_xdp.c): attach it
to a client-facing interface, keep its maps in step with the kernel, read its
counters.

The program answers SYNs to SYN-proxy VIPs with the cookie the IPVS module
checks, so it needs what the module signs with: the secret (the module's,
which cannot be read back: whoever sets it sets both, :func:`set_secret`), the
module's sysctls, and the services. Its objects are pinned under
``/sys/fs/bpf/ipvs-synproxy/<netns>/<dev>/`` (``prog`` and ``maps/``), so
that any later command finds them; a namespace's devices share nothing.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute

from ipvs_synproxy.kernel import bpf
from ipvs_synproxy.kernel.model import Protocol, Service
from ipvs_synproxy.kernel.netlink import IPVS
from ipvs_synproxy.kernel.netns import netns as enter_netns
from ipvs_synproxy.kernel.sysctl import Sysctls

PIN_ROOT = Path("/sys/fs/bpf/ipvs-synproxy")

# ip link's XDP flags (linux/if_link.h) and IFLA_XDP_ATTACHED values
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
ATTACHED: dict[int | str, str] = {1: "native", 2: "generic", 3: "offload",
                                  # pyroute2 names XDP_ATTACHED_* values
                                  "xdpdrv": "native", "xdpgeneric": "generic",
                                  "xdpoffload": "offload", "xdp": "native"}
MODES = ("auto", "native", "generic")

# The program's counters (enum sp_xdp_stat), in map order
STATS = ("syn_answered", "syn_malformed", "passed", "not_ready", "no_room", "syn_known")

# struct sp_service_key, struct sp_config (xdp/ipvs_synproxy_xdp.c)
_SVC_KEY = struct.Struct("<BBH16s")
_CONFIG = struct.Struct("<QQqIHBBBBBx4xQ")
_TTL = 64


class XdpError(RuntimeError):
    """An XDP step failed; the message says which and why."""


@dataclass(frozen=True)
class Status:
    dev: str
    netns: str | None
    attached: str | None      # native, generic, offload; None: not attached
    pinned: bool              # our objects are pinned
    prog_id: int | None
    services: int             # VIP:ports in the program's map
    ready: bool               # the program has a secret
    stats: dict[str, int]


def pin_dir(dev: str, netns: str | None) -> Path:
    return PIN_ROOT / (netns or "init") / dev


def _bpftool(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("bpftool") is None:
        raise XdpError("bpftool is missing: install Debian's bpftool package")
    res = subprocess.run(["bpftool", *args], capture_output=True, text=True, check=False)
    if res.returncode:
        tail = (res.stderr or res.stdout).strip().splitlines()[-12:]
        raise XdpError(f"bpftool {' '.join(args[:2])} failed:\n" + "\n".join(tail))
    return res


def _ensure_bpffs() -> None:
    root = Path("/sys/fs/bpf")
    if not root.is_dir():
        raise XdpError("/sys/fs/bpf is missing: the kernel has no BPF file system")
    with open("/proc/self/mounts") as f:
        if any(line.split()[1:3] == [str(root), "bpf"] for line in f):
            return
    res = subprocess.run(["mount", "-t", "bpf", "bpf", str(root)], capture_output=True,
                         text=True, check=False)
    if res.returncode:
        raise XdpError(f"cannot mount the BPF file system on {root}: {res.stderr.strip()}")


@contextlib.contextmanager
def _map(dev: str, netns: str | None, name: str) -> Iterator[int]:
    path = pin_dir(dev, netns) / "maps" / name
    try:
        fd = bpf.obj_get(str(path))
    except bpf.BpfError as exc:
        raise XdpError(f"the XDP program is not attached to {dev}: {exc}") from None
    try:
        yield fd
    finally:
        os.close(fd)


# -- what the program's maps hold -------------------------------------------------------

def service_key(svc: Service) -> bytes | None:
    """The program's key of a SYN-proxy TCP VIP:port; None for what it does
    not answer (other services, fwmark services: the module does)."""
    if not svc.synproxy or svc.fwmark or svc.addr is None or svc.protocol is not Protocol.TCP:
        return None
    return _SVC_KEY.pack(svc.addr.version, 0, socket.htons(svc.port),
                         svc.addr.packed.ljust(16, b"\0"))


def _tai_offset_ns() -> int:
    """CLOCK_TAI - CLOCK_REALTIME, whole seconds: the program has only the
    former, the module's epochs count the latter."""
    diff = time.clock_gettime_ns(time.CLOCK_TAI) - time.clock_gettime_ns(time.CLOCK_REALTIME)
    return round(diff / 1e9) * 10**9


def config_value(secret: bytes, sysctls: dict[str, int], generation: int) -> bytes:
    """struct sp_config for ``secret`` (16 bytes, as IPVS_CMD_SET_SYNPROXY_SECRET
    takes it) and the module's ``synproxy_*`` sysctls."""
    k0, k1 = struct.unpack("<QQ", secret)
    return _CONFIG.pack(k0, k1, _tai_offset_ns(), sysctls["synproxy_secret_period"],
                        sysctls["synproxy_mss"], sysctls["synproxy_wscale"],
                        sysctls["synproxy_sack"], sysctls["synproxy_timestamp"], _TTL, 1,
                        generation)


def module_sysctls(netns: str | None) -> dict[str, int]:
    s, out = Sysctls(netns), {}
    for n in ("synproxy_secret_period", "synproxy_mss", "synproxy_wscale", "synproxy_sack",
              "synproxy_timestamp"):
        value = s.read(n)
        out[n] = value[0]
    return out


# -- per device -------------------------------------------------------------------------

def attached_devices(netns: str | None) -> list[str]:
    """The devices of ``netns`` whose program we pinned."""
    d = PIN_ROOT / (netns or "init")
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def write_config(dev: str, netns: str | None, secret: bytes,
                 sysctls: dict[str, int] | None = None) -> None:
    """The secret and sysctls the program signs with; the per-CPU key caches
    derive anew (generation)."""
    sysctls = sysctls or module_sysctls(netns)
    with _map(dev, netns, "sp_config") as fd:
        old = bpf.lookup(fd, b"\0\0\0\0", _CONFIG.size)
        generation = _CONFIG.unpack(old)[-1] + 1 if old else 1
        bpf.update(fd, b"\0\0\0\0", config_value(secret, sysctls, generation))


def write_services(dev: str, netns: str | None, services: Iterable[Service]) -> int:
    """Make the program's VIP:port map exactly ``services``' SYN-proxy ones."""
    want = {k for k in (service_key(s) for s in services) if k is not None}
    with _map(dev, netns, "sp_services") as fd:
        have = set(bpf.keys(fd, _SVC_KEY.size))
        for k in have - want:
            bpf.delete(fd, k)
        for k in want - have:
            bpf.update(fd, k, b"\x01")
    return len(want)


def read_stats(dev: str, netns: str | None) -> dict[str, int]:
    ncpu = bpf.possible_cpus()
    out = {}
    with _map(dev, netns, "sp_stats") as fd:
        for i, name in enumerate(STATS):
            raw = bpf.lookup(fd, struct.pack("<I", i), 8 * ncpu) or b""
            out[name] = sum(struct.unpack(f"<{len(raw) // 8}Q", raw))
    return out


def _link_xdp(dev: str, netns: str | None, fd: int, flags: int) -> None:
    ctx = enter_netns(netns) if netns else contextlib.nullcontext()
    with ctx, IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=dev)
        if not idx:
            raise XdpError(f"no device {dev}" + (f" in netns {netns}" if netns else ""))
        ipr.link("set", index=idx[0],
                 xdp={"attrs": [["IFLA_XDP_FD", fd], ["IFLA_XDP_FLAGS", flags]]})


def device_state(dev: str, netns: str | None) -> tuple[str | None, int | None]:
    """The mode of the XDP program attached to ``dev`` (ours or not) and its
    id; (None, None) when there is none. Raises :class:`XdpError` when
    ``netns`` has no such device."""
    ctx = enter_netns(netns) if netns else contextlib.nullcontext()
    with ctx, IPRoute() as ipr:
        links = ipr.get_links(ifname=dev)
    if not links:
        raise XdpError(f"no device {dev}" + (f" in netns {netns}" if netns else ""))
    xdp = links[0].get_attr("IFLA_XDP")
    if xdp is None:
        return None, None
    mode = ATTACHED.get(xdp.get_attr("IFLA_XDP_ATTACHED") or 0)
    if mode is None and xdp.get_attr("IFLA_XDP_PROG_ID"):
        mode = "unknown"
    return mode, xdp.get_attr("IFLA_XDP_PROG_ID")


def load(obj: Path, dev: str, netns: str | None) -> None:
    """Load ``obj`` and pin it and its maps for ``dev``, replacing pins of ours
    there. Not attached yet, and without a secret: :func:`set_secret` gives
    it one (it counts as attached in the namespace from now on)."""
    _ensure_bpffs()
    d = pin_dir(dev, netns)
    _unpin(d)
    d.mkdir(parents=True, exist_ok=True)
    _bpftool("prog", "load", str(obj), str(d / "prog"), "type", "xdp",
             "pinmaps", str(d / "maps"))


def link(dev: str, netns: str | None, services: Iterable[Service],
         mode: str = "auto") -> Status:
    """Fill the pinned program's VIP:ports and attach it to ``dev``: native
    where the driver has it (``auto``), else generic. The program has its
    secret already (:func:`set_secret` after :func:`load`), so the first SYN
    it sees is answered right. Unpins it when no mode takes."""
    if mode not in MODES:
        raise XdpError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    write_services(dev, netns, services)
    d = pin_dir(dev, netns)
    fd = bpf.obj_get(str(d / "prog"))
    try:
        tries = {"auto": [XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE],
                 "native": [XDP_FLAGS_DRV_MODE], "generic": [XDP_FLAGS_SKB_MODE]}[mode]
        err: Exception | None = None
        for flags in tries:
            try:
                _link_xdp(dev, netns, fd, flags)
                break
            except Exception as exc:  # the driver refuses this mode: try the next
                err = exc
        else:
            _unpin(d)
            raise XdpError(f"cannot attach XDP to {dev} ({mode}): {err}")
    finally:
        os.close(fd)
    return status(dev, netns)


def attach(obj: Path, dev: str, netns: str | None, ipvs: IPVS, secret: bytes,
           mode: str = "auto", *, module: bool = True) -> Status:
    """Load ``obj`` for ``dev``, set ``secret`` through :func:`set_secret` (in
    the module and in every program pinned in the namespace, this one
    included; ``module=False``: the module holds it already), fill its
    VIP:ports from ``ipvs`` and attach it. Replaces a program of ours
    already there."""
    if mode not in MODES:
        raise XdpError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    load(obj, dev, netns)
    try:
        set_secret(ipvs, secret, module=module)
    except BaseException:
        _unpin(pin_dir(dev, netns))
        raise
    return link(dev, netns, ipvs.services(), mode)


def _unpin(d: Path) -> None:
    if d.exists():
        shutil.rmtree(d)


def _pinned_prog_id(dev: str, netns: str | None) -> int | None:
    """The id of our program pinned for ``dev``; None when none is."""
    pin = pin_dir(dev, netns) / "prog"
    if not pin.exists():
        return None
    info = json.loads(_bpftool("-j", "prog", "show", "pinned", str(pin)).stdout)
    return int(info["id"]) if "id" in info else None


def detach(dev: str, netns: str | None, *, missing_ok: bool = False) -> None:
    """Take our program off ``dev`` (SYNs go to the module again) and unpin it.
    A program on ``dev`` that is not ours stays. ``missing_ok``: a device that
    is gone only loses its pins."""
    try:
        mode, prog_id = device_state(dev, netns)
    except XdpError:
        if not missing_ok or not pin_dir(dev, netns).exists():
            raise
        mode, prog_id = None, None
    if mode is not None and prog_id is not None and prog_id == _pinned_prog_id(dev, netns):
        flags = XDP_FLAGS_DRV_MODE if mode == "native" else XDP_FLAGS_SKB_MODE
        _link_xdp(dev, netns, -1, flags)
    _unpin(pin_dir(dev, netns))


def status(dev: str, netns: str | None) -> Status:
    mode, prog_id = device_state(dev, netns)
    pinned = (pin_dir(dev, netns) / "prog").exists()
    services, ready, stats = 0, False, dict.fromkeys(STATS, 0)
    if pinned:
        with _map(dev, netns, "sp_services") as fd:
            services = len(bpf.keys(fd, _SVC_KEY.size))
        with _map(dev, netns, "sp_config") as fd:
            raw = bpf.lookup(fd, b"\0\0\0\0", _CONFIG.size)
            ready = bool(raw and _CONFIG.unpack(raw)[9])
        stats = read_stats(dev, netns)
    return Status(dev, netns, mode, pinned, prog_id, services, ready, stats)


def vip_of(key: bytes) -> str:
    fam, _, port, addr = _SVC_KEY.unpack(key)
    ip = ipaddress.ip_address(addr[:4] if fam == 4 else addr)
    return f"[{ip}]:{socket.ntohs(port)}" if fam == 6 else f"{ip}:{socket.ntohs(port)}"


# -- the one path that keeps program and module in step ----------------------------------

def set_secret(ipvs: IPVS, secret: bytes, *, module: bool = True) -> None:
    """Set the cookie secret of ``ipvs``'s namespace in the module and in every
    XDP program pinned there, in that order. Between the two writes the
    program still signs with the old secret's key, which the module keeps
    accepting as its previous key until the next period boundary: no cookie
    is refused for it as long as the second write follows within a period.

    ``module=False`` writes only the programs: for a caller that set this
    very secret in the module a moment ago (setting it twice would drop the
    secret before it from the module's previous key)."""
    if module:
        ipvs.set_synproxy_secret(secret)
    for dev in attached_devices(ipvs.netns):
        write_config(dev, ipvs.netns, secret)


def mirror_services(netns: str | None, services: Callable[[], Iterable[Service]]) -> None:
    """Make every program attached in ``netns`` answer exactly the SYN-proxy
    VIP:ports among ``services()`` (read only when one is attached)."""
    devs = attached_devices(netns)
    if devs:
        now = list(services())
        for dev in devs:
            write_services(dev, netns, now)


def mirror(ipvs: IPVS) -> None:
    """After adm, apply or the console changed services: the programs attached
    in ``ipvs``'s namespace answer exactly the kernel's SYN-proxy VIP:ports."""
    mirror_services(ipvs.netns, ipvs.services)


# -- the counters of every program of a namespace (stats, the console, /metrics) ----------

@dataclass(frozen=True)
class DeviceStats:
    """One device's program: the mode it is attached in and its counters
    (:data:`STATS`, summed over CPUs)."""

    dev: str
    mode: str | None  # native, generic, offload; None: pinned but not attached
    stats: dict[str, int]


def pinned_mode(dev: str, netns: str | None) -> str | None:
    """The mode ``dev``'s program is attached in; None when none is, or when
    the device is gone (its pins may outlive it)."""
    from pyroute2.netlink.exceptions import NetlinkError as RtnlError

    try:
        return device_state(dev, netns)[0]
    except (XdpError, OSError, RtnlError):  # the device is gone; its pins are not
        return None


def _device_stats(dev: str, netns: str | None) -> DeviceStats | None:
    try:
        counters = read_stats(dev, netns)
    except (XdpError, OSError):  # detached while we listed, or not ours to read
        return None
    return DeviceStats(dev, pinned_mode(dev, netns), counters)


def all_stats(netns: str | None) -> list[DeviceStats]:
    """The counters of every program pinned in ``netns``, by device name; empty,
    never an error, when there is none to read (nothing attached, no BPF file
    system, no right to read the pins)."""
    try:
        devs = attached_devices(netns)
    except OSError:
        return []
    return [s for s in (_device_stats(d, netns) for d in devs) if s is not None]
