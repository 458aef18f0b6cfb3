"""IPVS connection-sync messages, protocol version 1, with this project's
options (kernel_patches/UAPI.md, "Connection sync options"): built byte by
byte for guest tests that play a master toward a backup, and sent the way a
master's sync thread sends them (UDP to 224.0.0.81:8848 from one interface).

The layout follows ip_vs_sync.c: an 8-byte header (reserved 0, syncid,
size, connection count, version 1, spare 0), then per connection a fixed
part (36 bytes for IPv4, 72 for IPv6) and its options, each connection
padded to 4 bytes before the next.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass, field

from ipvs_synproxy_testbed import netns

SYNC_GROUP = "224.0.0.81"
SYNC_PORT = 8848
VERSION = 1

OPT_F_PARAM = 0x40  # the "optional" bit of an option type
OPT_FNAT = 0x30
OPT_SYNPROXY = 0x31

# ip_vs_conn flags (include/uapi/linux/ip_vs.h)
CONN_F_MASQ = 0x0000
CONN_F_FULLNAT = 0x0005
CONN_F_INACTIVE = 0x0100
# IPVS's TCP states (ip_vs_proto_tcp.c)
TCP_S_ESTABLISHED = 1

SP_F_PROXIED, SP_F_TS, SP_F_WSCALE, SP_F_WSCALE_IN = 1, 2, 4, 8


def fnat_option(laddr: str, lport: int, toa: int = 0, reserved: int = 0) -> tuple[int, bytes]:
    """IPVS_OPT_FNAT, optional: lport, TOA flags, reserved, laddr."""
    addr = ipaddress.ip_address(laddr).packed
    return OPT_FNAT | OPT_F_PARAM, struct.pack("!HBB", lport, toa, reserved) + addr


def synproxy_option(isn: int, seq_delta: int, ts_delta: int = 0, client_nxt: int = 0,
                    flags: int = SP_F_PROXIED, lb_wscale: int = 0, rs_wscale: int = 0,
                    client_wscale: int = 0) -> tuple[int, bytes]:
    """IPVS_OPT_SYNPROXY, optional: the SYN proxy's translation of a connection."""
    return OPT_SYNPROXY | OPT_F_PARAM, struct.pack(
        "!BBBBIIII", flags, lb_wscale, rs_wscale, client_wscale, isn & 0xFFFFFFFF,
        seq_delta & 0xFFFFFFFF, ts_delta & 0xFFFFFFFF, client_nxt & 0xFFFFFFFF)


@dataclass
class SyncConn:
    """One connection of a sync message."""

    caddr: str
    cport: int
    vaddr: str
    vport: int
    daddr: str
    dport: int
    flags: int = CONN_F_MASQ
    state: int = TCP_S_ESTABLISHED
    protocol: int = socket.IPPROTO_TCP
    timeout: int = 900
    fwmark: int = 0
    options: list[tuple[int, bytes]] = field(default_factory=list)

    def encode(self) -> bytes:
        """The connection's bytes, options included, padding not."""
        addrs = [ipaddress.ip_address(a) for a in (self.caddr, self.vaddr, self.daddr)]
        v6 = addrs[0].version == 6
        opts = b"".join(struct.pack("!BB", t, len(d)) + d for t, d in self.options)
        size = (72 if v6 else 36) + len(opts)
        head = struct.pack("!BBHIHHHHII", 1 if v6 else 0, self.protocol, size & 0x0FFF,
                           self.flags, self.state, self.cport, self.vport, self.dport,
                           self.fwmark, self.timeout)
        return head + b"".join(a.packed for a in addrs) + opts


def encode(conns: list[SyncConn], syncid: int) -> bytes:
    """A version 1 message holding conns."""
    body = b""
    for c in conns:
        body += b"\0" * (-len(body) % 4) + c.encode()
    return struct.pack("!BBHBbH", 0, syncid, 8 + len(body), len(conns), VERSION, 0) + body


def send(ns: str, dev: str, message: bytes, group: str = SYNC_GROUP,
         port: int = SYNC_PORT) -> None:
    """Send message from ns out of dev to the sync group, as a master does."""
    sock = netns.socket_in(ns, socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, dev.encode())
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        sock.sendto(message, (group, port))
