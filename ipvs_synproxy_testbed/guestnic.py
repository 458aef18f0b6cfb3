"""The guest's only way out: a NIC whose ports QEMU forwards from the host.

``vm exec --forward PORT`` gives the guest a virtio NIC on QEMU user networking
(``restrict=on``: no traffic beyond the forwarded ports); the guest init loads no
NIC driver, so a guest command that serves the host calls :func:`nic_up` first
and listens on PORT in the guest's root namespace.
"""

from __future__ import annotations

import os
import subprocess
import time

SLIRP_GUEST = "10.0.2.15/24"  # QEMU user networking's guest address


def nic_up(timeout: float = 30.0) -> str:
    """Load virtio_net, address the forwarded NIC and return its name."""
    subprocess.run(["modprobe", "virtio_net"], check=True)
    deadline = time.monotonic() + timeout
    while True:
        # the NIC is the interface backed by a device, unlike the topology's veths
        names = [n for n in sorted(os.listdir("/sys/class/net"))
                 if os.path.exists(f"/sys/class/net/{n}/device")]
        if names:
            break
        if time.monotonic() > deadline:
            raise RuntimeError("no forwarded NIC in the guest (vm exec --forward PORT?)")
        time.sleep(0.2)
    subprocess.run(["ip", "link", "set", names[0], "up"], check=True)
    subprocess.run(["ip", "addr", "replace", SLIRP_GUEST, "dev", names[0]], check=True)
    return names[0]
