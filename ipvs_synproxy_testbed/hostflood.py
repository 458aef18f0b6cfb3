"""A SYN flood from outside the guest, into lb's NIC of the NIC pair.

trafgen in the client namespace shares the guest's two vCPUs with lb: with
lb's part on one and the generator on the other, a flood reaches 12-17 kpps
and never saturates lb's vCPU, so every SYN pays a NIC interrupt of its own
and batching (NAPI, XDP's transmit flush) never shows. ``vm exec --nic-pair``
therefore gives the NIC pair's QEMU hub a third port: a datagram socket
(``-netdev dgram``, Unix sockets in the job directory, no network) served by
:class:`HostFlooder` in the ``vm exec`` process on the host. The guest asks
for a flood by writing a request file into the job directory (the build
share) and reads the answer the host writes back (:func:`flood`).

The frames are SYNs as trafgen's (flood.py: Linux's options, random sources
in the spoofed pool 198.51.100.128/25, random ports, sequence numbers and
timestamps) from the client's MAC to lb's, to the VIP's port 80: the hub
carries them to lb's NIC and to nothing outside QEMU.
"""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import threading
import time
from pathlib import Path

from ipvs_synproxy_testbed import topology

REQUEST = "hostflood-req.json"
ENV = "IPVS_SP_HOSTFLOOD"       # the job directory, in the guest, when available
QEMU_SOCK, HOST_SOCK = "gen-qemu.sock", "gen-host.sock"
LB_MAC = "02:00:00:00:01:01"
CLIENT_MAC = "02:00:00:00:01:02"
FRAMES = 8192


def qemu_args(job: Path, hub: int) -> list[str]:
    """The hub's third port: datagrams to and from HostFlooder's socket."""
    return ["-netdev", f"dgram,id=pair-gen,local.type=unix,local.path={job / QEMU_SOCK},"
            f"remote.type=unix,remote.path={job / HOST_SOCK}",
            "-netdev", f"hubport,id=pair-genport,hubid={hub},netdev=pair-gen"]


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def syn_frame(rng: random.Random, vip: str = topology.VIP4, port: int = 80) -> bytes:
    """One SYN with Linux's options from a random source in the spoofed pool."""
    src = bytes([198, 51, 100, rng.randint(128, 254)])
    dst = socket.inet_aton(vip)
    opts = (struct.pack("!BBH", 2, 4, 1460) + b"\x04\x02"
            + struct.pack("!BBII", 8, 10, rng.getrandbits(32), 0) + b"\x01"
            + struct.pack("!BBB", 3, 3, 7))
    tcp = struct.pack("!HHIIBBHHH", rng.randint(1024, 65535), port, rng.getrandbits(32), 0,
                      (20 + len(opts)) // 4 << 4, 0x02, 64240, 0, 0) + opts
    pseudo = src + dst + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", _csum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), rng.getrandbits(16), 0x4000,
                     64, 6, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    eth = bytes.fromhex(LB_MAC.replace(":", "")) + bytes.fromhex(CLIENT_MAC.replace(":", ""))
    return eth + b"\x08\x00" + ip + tcp


class HostFlooder(threading.Thread):
    """On the host: serves the guest's flood requests through the hub's third
    port, and drains what the hub sends it (lb's answers reach it too)."""

    def __init__(self, job: Path, seed: int = 22) -> None:
        super().__init__(daemon=True)
        self.job = job
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(job / HOST_SOCK))
        self.sock.setblocking(False)
        rng = random.Random(seed)
        self.frames = [syn_frame(rng) for _ in range(FRAMES)]
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def _drain(self) -> None:
        try:
            while True:
                self.sock.recv(65536)
        except (BlockingIOError, OSError):
            pass

    def _flood(self, seconds: float) -> dict[str, float]:
        dest = str(self.job / QEMU_SOCK)
        sent = dropped = 0
        frames, n = self.frames, len(self.frames)
        t0 = time.monotonic()
        end = t0 + seconds
        while True:
            for _ in range(256):
                try:
                    self.sock.sendto(frames[sent % n], dest)
                    sent += 1
                except BlockingIOError:
                    dropped += 1
            self._drain()
            if time.monotonic() >= end:
                break
        return {"sent": sent, "seconds": time.monotonic() - t0, "refused": dropped}

    def run(self) -> None:
        req = self.job / REQUEST
        while not self._stop.wait(0.01):
            self._drain()
            if not req.exists():
                continue
            try:
                ask = json.loads(req.read_text())
            except (OSError, ValueError):
                continue   # being written
            req.unlink()
            try:
                res: dict[str, object] = dict(self._flood(float(ask["seconds"])))
            except OSError as exc:   # QEMU's socket gone: the guest is stopping
                res = {"sent": 0, "seconds": 0.0, "error": str(exc)}
            tmp = self.job / f".done-{ask['id']}"
            tmp.write_text(json.dumps(res))
            tmp.rename(self.job / f"hostflood-done-{ask['id']}.json")


# -- the guest's side ---------------------------------------------------------------------

def available() -> bool:
    return bool(os.environ.get(ENV))


_ids = iter(range(1, 1 << 30))


def start(seconds: float) -> tuple[int, float]:
    """In the guest: ask the host to flood lb's NIC for ``seconds``; a handle
    for :func:`wait`."""
    job = Path(os.environ[ENV])
    n = next(_ids)
    tmp = job / f".req-{n}"
    tmp.write_text(json.dumps({"id": n, "seconds": seconds}))
    tmp.rename(job / REQUEST)
    return n, time.monotonic() + seconds


def wait(handle: tuple[int, float], timeout: float = 60.0) -> dict[str, float]:
    """What the host sent for the request ``handle``, once it is done."""
    n, end = handle
    done = Path(os.environ[ENV]) / f"hostflood-done-{n}.json"
    while not done.exists():
        if time.monotonic() > end + timeout:
            raise TimeoutError("the host did not answer the flood request")
        time.sleep(0.05)
    res: dict[str, float] = json.loads(done.read_text())
    done.unlink()
    return res


def flood(seconds: float) -> dict[str, float]:
    """In the guest: have the host flood lb's NIC for ``seconds``; what it sent."""
    return wait(start(seconds))
