"""The client-lb link as two real NICs: virtio NICs joined by a QEMU hub.

On the standard topology client and lb meet through veths and a bridge. A
veth starts every packet as an skb, so XDP on one (native or generic) runs on
an skb's copy, and what XDP saves on a NIC (the skb, the stack) cannot show.
``vm exec --nic-pair`` gives the guest two virtio-net NICs on a QEMU hub that
joins them to each other and to nothing else: no backend on the host, so no
frame can leave the guest. :func:`swap_in` puts one in client and one in lb
as their ``eth0`` (same MACs and addresses as the veths, which stand aside
as ``veth0``); :func:`swap_out` restores the veths. Each NIC's receive
interrupt goes to one vCPU, as a NIC's IRQ affinity would.
"""

from __future__ import annotations

import os
import subprocess
import time

from ipvs_synproxy_testbed import topology

HUB_ID = 7
# NIC MACs as QEMU gives them (locally administered); swap_in sets the topology's.
QEMU_MACS = {"client": "02:00:00:00:0a:02", "lb": "02:00:00:00:0a:01"}
ASIDE = "veth0"  # the host's veth while its eth0 is the NIC


def qemu_args() -> list[str]:
    """Two virtio-net NICs on hub HUB_ID, which has no other port."""
    out: list[str] = []
    for ns, mac in QEMU_MACS.items():
        out += ["-netdev", f"hubport,id=pair-{ns},hubid={HUB_ID}",
                "-device", f"virtio-net-pci,netdev=pair-{ns},mac={mac}"]
    return out


def _ip(*args: str, ns: str | None = None) -> None:
    argv = ["ip", *(["-n", ns] if ns else []), *args]
    res = subprocess.run(argv, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {res.stderr.strip()}")


def nic_names(timeout: float = 30.0) -> dict[str, str]:
    """Root-namespace name of each NIC, by its QEMU MAC."""
    subprocess.run(["modprobe", "virtio_net"], check=True)
    want = {mac: ns for ns, mac in QEMU_MACS.items()}
    deadline = time.monotonic() + timeout
    while True:
        found: dict[str, str] = {}
        for name in os.listdir("/sys/class/net"):
            try:
                with open(f"/sys/class/net/{name}/address") as f:
                    mac = f.read().strip()
            except OSError:
                continue
            if mac in want:
                found[want[mac]] = name
        if len(found) == len(want):
            return found
        if time.monotonic() > deadline:
            raise RuntimeError("no NIC pair in the guest (vm exec --nic-pair?)")
        time.sleep(0.2)


def _host(ns: str) -> topology.Host:
    return next(h for h in topology.HOSTS if h.name == ns)


# what swap_in did, for swap_out: the namespaces whose eth0 is a NIC, and
# each NIC's virtio device
_moved: dict[str, str] = {}
_virtio: dict[str, str] = {}


def _input_irqs(virtio: str) -> list[str]:
    """The receive interrupts of virtio device ``virtio`` ("virtioN-input.Q")."""
    with open("/proc/interrupts") as f:
        return [line.split(":", 1)[0].strip() for line in f if f"{virtio}-input." in line]


def swap_in(cpus: dict[str, int]) -> None:
    """client's and lb's eth0 become the NICs; each NIC's receive interrupts go
    to ``cpus[ns]``."""
    names = nic_names()
    for ns, dev in names.items():
        # the virtio device (virtioN) names the interrupts
        _virtio[ns] = os.path.basename(os.path.realpath(f"/sys/class/net/{dev}/device"))
        iface = _host(ns).ifaces[0]
        _ip("link", "set", "eth0", "down", ns=ns)
        _ip("link", "set", "eth0", "name", ASIDE, ns=ns)
        _ip("link", "set", dev, "down")
        _ip("link", "set", dev, "name", f"nic-{ns}")
        _ip("link", "set", f"nic-{ns}", "netns", ns)
        _ip("link", "set", f"nic-{ns}", "name", "eth0", ns=ns)
        _ip("link", "set", "eth0", "address", iface.mac, ns=ns)
        for a in iface.addrs:
            _ip("addr", "add", a, "dev", "eth0", *(["nodad"] if ":" in a else []), ns=ns)
        _ip("link", "set", "eth0", "up", ns=ns)
        for r in _host(ns).routes:
            _ip("route", "replace", *r.split(), ns=ns)
        _moved[ns] = "eth0"
        for irq in _input_irqs(_virtio[ns]):
            with open(f"/proc/irq/{irq}/smp_affinity_list", "w") as f:
                f.write(str(cpus[ns]))


def swap_out() -> None:
    """The veths back as eth0, the NICs back in the root namespace."""
    for ns in list(_moved):
        iface = _host(ns).ifaces[0]
        _ip("link", "set", "eth0", "down", ns=ns)
        _ip("link", "set", "eth0", "name", f"nic-{ns}", ns=ns)
        _ip("link", "set", f"nic-{ns}", "address", QEMU_MACS[ns], ns=ns)  # found again by it
        _ip("link", "set", f"nic-{ns}", "netns", "1", ns=ns)
        _ip("link", "set", ASIDE, "name", "eth0", ns=ns)
        # a link that goes down loses its IPv6 addresses
        for a in iface.addrs:
            _ip("addr", "replace", a, "dev", "eth0", *(["nodad"] if ":" in a else []), ns=ns)
        _ip("link", "set", "eth0", "up", ns=ns)
        for r in _host(ns).routes:
            _ip("route", "replace", *r.split(), ns=ns)
        del _moved[ns]
