"""The standard testbed topology (DESIGN.md, "The testbed"), built in the guest.

Two L2 segments, each a bridge in the guest's root namespace that carries no
address itself: ``br-client`` (198.51.100.0/24, 2001:db8:1::/64) joins client
and lb; ``br-server`` (192.0.2.0/24, 2001:db8:2::/64) joins lb, rs1 and rs2.
Keeping the segments outside the hosts lets later tests add a second balancer
to the same segments. Every veth in a host is ``eth0`` (and ``eth1`` on lb) with
a fixed MAC, so crafted frames and flood generators can name them.

Run ``python -m ipvs_synproxy_testbed.topology up`` (the guest init does) or
``down``.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field

from ipvs_synproxy_testbed.netns import write_sysctl

CLIENT_BRIDGE = "br-client"
SERVER_BRIDGE = "br-server"

VIP4 = "198.51.100.10"
VIP6 = "2001:db8:1::10"
CLIENT4 = "198.51.100.2"
CLIENT6 = "2001:db8:1::2"
LB_CLIENT4 = "198.51.100.1"
LB_CLIENT6 = "2001:db8:1::1"
LB_SERVER4 = "192.0.2.1"
LB_SERVER6 = "2001:db8:2::1"
LADDRS4 = tuple(f"192.0.2.{i}" for i in range(100, 104))
LADDRS6 = tuple(f"2001:db8:2::{i}" for i in range(100, 104))
# What the real servers' toa.ko believes TOA options from: lb's own
# server-side addresses (its laddrs and the raw-socket tests' source).
TOA_TRUSTED = "192.0.2.1,192.0.2.100/30,2001:db8:2::1,2001:db8:2::100/126"
RS4 = {"rs1": "192.0.2.11", "rs2": "192.0.2.12"}
RS6 = {"rs1": "2001:db8:2::11", "rs2": "2001:db8:2::12"}
CLIENT_NET4, CLIENT_NET6 = "198.51.100.0/24", "2001:db8:1::/64"
SERVER_NET4, SERVER_NET6 = "192.0.2.0/24", "2001:db8:2::/64"


@dataclass(frozen=True)
class Iface:
    name: str
    bridge: str
    mac: str
    addrs: tuple[str, ...]


@dataclass(frozen=True)
class Host:
    name: str
    ifaces: tuple[Iface, ...]
    routes: tuple[str, ...] = ()
    forwarding: bool = False
    sysctls: dict[str, str] = field(default_factory=dict)


# Client source ports that tests craft their own segments from (40000-49999)
# lie below the client's ephemeral range: a crafted handshake may leave its
# connection behind in lb, and no real client's connect lands on its tuple.
# (Reserving them inside the range instead would make every destination whose
# random start falls among them begin at the same port, 50000.)
EPHEMERAL_PORTS = "50000 64999"

HOSTS: tuple[Host, ...] = (
    Host("client",
         (Iface("eth0", CLIENT_BRIDGE, "02:00:00:00:01:02",
                (f"{CLIENT4}/24", f"{CLIENT6}/64")),),
         routes=(f"default via {LB_CLIENT4}", f"default via {LB_CLIENT6}"),
         sysctls={"net.ipv4.ip_local_port_range": EPHEMERAL_PORTS}),
    Host("lb",
         (Iface("eth0", CLIENT_BRIDGE, "02:00:00:00:01:01",
                (f"{LB_CLIENT4}/24", f"{VIP4}/32", f"{LB_CLIENT6}/64", f"{VIP6}/128")),
          Iface("eth1", SERVER_BRIDGE, "02:00:00:00:02:01",
                (f"{LB_SERVER4}/24", f"{LB_SERVER6}/64",
                 *(f"{a}/32" for a in LADDRS4), *(f"{a}/128" for a in LADDRS6)))),
         forwarding=True),
    *(Host(rs,
           (Iface("eth0", SERVER_BRIDGE, f"02:00:00:00:02:{RS4[rs].rsplit('.', 1)[1]}",
                  (f"{RS4[rs]}/24", f"{RS6[rs]}/64")),),
           routes=(f"default via {LB_SERVER4}", f"default via {LB_SERVER6}"))
      for rs in ("rs1", "rs2")),
)

NETNS = tuple(h.name for h in HOSTS)


def _ip(*args: str, ns: str | None = None) -> None:
    argv = ["ip", *(["-n", ns] if ns else []), *args]
    res = subprocess.run(argv, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {res.stderr.strip()}")


def _ip_batch(lines: list[str], ns: str | None = None) -> None:
    argv = ["ip", *(["-n", ns] if ns else []), "-batch", "-"]
    res = subprocess.run(argv, input="\n".join(lines) + "\n", capture_output=True,
                         text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {res.stderr.strip()}")


def _host_sysctls(h: Host) -> dict[str, str]:
    s = {
        # Addresses are fixed and unique: skip DAD so v6 is usable at once.
        "net.ipv6.conf.all.accept_dad": "0",
        "net.ipv6.conf.default.accept_dad": "0",
        "net.ipv6.conf.all.forwarding": "1" if h.forwarding else "0",
        "net.ipv4.ip_forward": "1" if h.forwarding else "0",
        "net.ipv4.conf.all.rp_filter": "0",
        "net.ipv4.conf.default.rp_filter": "0",
    }
    s.update(h.sysctls)
    return s


def up() -> None:
    root = []
    for br in (CLIENT_BRIDGE, SERVER_BRIDGE):
        root += [f"link add {br} type bridge forward_delay 0 stp_state 0",
                 f"link set {br} up"]
    for h in HOSTS:
        _ip("netns", "add", h.name)
        for s_key, s_val in _host_sysctls(h).items():
            write_sysctl(h.name, s_key, s_val)
        for i in h.ifaces:
            peer = f"{h.name}-{i.name}"
            root += [
                f"link add {peer} type veth peer name {i.name} netns {h.name}",
                f"link set {peer} master {i.bridge} up",
            ]
    write_sysctl(None, "net.ipv6.conf.all.disable_ipv6", "0")
    _ip_batch(root)
    for h in HOSTS:
        lines = ["link set lo up"]
        for i in h.ifaces:
            lines.append(f"link set {i.name} address {i.mac}")
            for a in i.addrs:
                lines.append(f"addr add {a} dev {i.name}" + (" nodad" if ":" in a else ""))
            lines.append(f"link set {i.name} up")
        # The gateway's address family selects the table (v4 or v6).
        lines += [f"route add {r}" for r in h.routes]
        _ip_batch(lines, ns=h.name)


def down() -> None:
    for h in HOSTS:
        subprocess.run(["ip", "netns", "del", h.name], capture_output=True, check=False)
    for br in (CLIENT_BRIDGE, SERVER_BRIDGE):
        subprocess.run(["ip", "link", "del", br], capture_output=True, check=False)


def main(argv: list[str]) -> int:
    if argv[1:] == ["up"]:
        up()
    elif argv[1:] == ["down"]:
        down()
    else:
        print("usage: python -m ipvs_synproxy_testbed.topology up|down", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
