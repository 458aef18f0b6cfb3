"""The IPVS generic-netlink client: the only module that speaks netlink.

The wire format is declared as data, the way pyroute2 declares it
(``nla_map`` tuples in message classes derived from pyroute2's own IPVS
classes), extended with the ipvs-synproxy UAPI (kernel_patches/UAPI.md):
FULLNAT forwarding (method 5), the SYNPROXY service flag, the laddr commands,
extended statistics and the cookie secret. Callers see only :mod:`model`
values and :class:`NetlinkError` subclasses.

pyroute2 encodes and decodes the messages; the transport is a plain netlink
socket driven here, for three reasons: replies are decoded per generic-netlink
command (``GET_INFO`` replies reuse attribute numbers with another meaning),
a socket made in another network namespace can be used as is, and no event
loop or helper thread is involved in a request.

Two pyroute2 traps are avoided on purpose: its high-level ``IPVS`` helper maps
``"update"`` to a DEL command (we always name the command explicitly), and a
message class that inherits from an already used pyroute2 class inherits its
compiled attribute table, so new attributes would be silently dropped
(:func:`_own_nla_table` gives every class here its own).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, TypeVar

from pyroute2.netlink import CTRL_CMD_GETFAMILY, GENL_ID_CTRL, ctrlmsg, genlmsg, nla
from pyroute2.netlink.generic import ipvs as pr_ipvs

from ipvs_synproxy.kernel.model import (
    IP_VS_SVC_F_PERSISTENT,
    IP_VS_SVC_F_SYNPROXY,
    SETTABLE_FLAGS,
    Dest,
    Family,
    FwdMethod,
    Info,
    IPAddress,
    Laddr,
    ModelError,
    Protocol,
    ProxyProtocol,
    Service,
    Stats,
    SyncDaemon,
    Timeouts,
    TunnelType,
)

GENL_NAME = "IPVS"
GENL_VERSION = 1

# Commands (enum IPVS_CMD_*): upstream 6.1, then UAPI.md.
IPVS_CMD_NEW_SERVICE = 1
IPVS_CMD_SET_SERVICE = 2
IPVS_CMD_DEL_SERVICE = 3
IPVS_CMD_GET_SERVICE = 4
IPVS_CMD_NEW_DEST = 5
IPVS_CMD_SET_DEST = 6
IPVS_CMD_DEL_DEST = 7
IPVS_CMD_GET_DEST = 8
IPVS_CMD_NEW_DAEMON = 9
IPVS_CMD_DEL_DAEMON = 10
IPVS_CMD_GET_DAEMON = 11
IPVS_CMD_SET_CONFIG = 12
IPVS_CMD_GET_CONFIG = 13
IPVS_CMD_SET_INFO = 14
IPVS_CMD_GET_INFO = 15
IPVS_CMD_ZERO = 16
IPVS_CMD_FLUSH = 17
IPVS_CMD_NEW_LADDR = 18
IPVS_CMD_DEL_LADDR = 19
IPVS_CMD_GET_LADDR = 20
IPVS_CMD_GET_EXT_STATS = 21
IPVS_CMD_SET_SYNPROXY_SECRET = 22

SYNPROXY_SECRET_LEN = 16
U32 = 0xFFFF_FFFF
_INET_ADDR_LEN = 16  # union nf_inet_addr

# netlink(7) constants the socket module does not export.
NETLINK_GENERIC = 16
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x01
NLM_F_MULTI = 0x02
NLM_F_ACK = 0x04
NLM_F_DUMP = 0x300
NLM_F_ACK_TLVS = 0x200
NLMSGERR_ATTR_MSG = 1
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
GENL_CMD_CAP_DO = 0x02
GENL_CMD_CAP_DUMP = 0x04
_NLMSGHDR = struct.Struct("=IHHII")

_C = TypeVar("_C", bound=type)


def _own_nla_table(cls: _C) -> _C:
    """Make ``cls`` compile its own ``nla_map`` instead of reusing the table its
    pyroute2 base class compiled (and cached on the class) the first time it was
    used: without this, attributes added here would decode as unknown and be
    dropped without a word."""
    for name in ("compiled_nla", "t_nla_map", "r_nla_map"):
        setattr(cls, f"_nlmsg_base__{name}", False if name == "compiled_nla" else None)
    return cls


# ---- the wire format --------------------------------------------------------------------
#
# Addresses are declared as raw bytes (a 16-byte union nf_inet_addr on the
# wire, whatever the family); the conversion to model types below knows the
# family. The persistence netmask is raw too: a network-order mask for IPv4, a
# prefix length in host order for IPv6.


@_own_nla_table
class IpvsExtStats(nla):  # type: ignore[misc]
    prefix = "IPVS_EXT_STATS_ATTR_"
    nla_map = (
        ("IPVS_EXT_STATS_ATTR_UNSPEC", "none"),
        ("IPVS_EXT_STATS_ATTR_ENTRY", "entry"),
    )

    @_own_nla_table
    class entry(nla):  # type: ignore[misc]
        prefix = "IPVS_EXT_STATS_ATTR_"
        nla_map = (
            ("IPVS_EXT_STATS_ATTR_UNSPEC", "none"),
            ("IPVS_EXT_STATS_ATTR_ENTRY", "none"),
            ("IPVS_EXT_STATS_ATTR_NAME", "asciiz"),
            ("IPVS_EXT_STATS_ATTR_VALUE", "uint64"),
            ("IPVS_EXT_STATS_ATTR_PAD", "none"),
        )


@_own_nla_table
class IpvsService(pr_ipvs.ipvsmsg.service):  # type: ignore[misc]
    prefix = "IPVS_SVC_ATTR_"
    nla_map = (
        ("IPVS_SVC_ATTR_UNSPEC", "none"),
        ("IPVS_SVC_ATTR_AF", "uint16"),
        ("IPVS_SVC_ATTR_PROTOCOL", "uint16"),
        ("IPVS_SVC_ATTR_ADDR", "cdata"),
        ("IPVS_SVC_ATTR_PORT", "be16"),
        ("IPVS_SVC_ATTR_FWMARK", "uint32"),
        ("IPVS_SVC_ATTR_SCHED_NAME", "asciiz"),
        ("IPVS_SVC_ATTR_FLAGS", "flags"),
        ("IPVS_SVC_ATTR_TIMEOUT", "uint32"),
        ("IPVS_SVC_ATTR_NETMASK", "cdata"),
        ("IPVS_SVC_ATTR_STATS", "stats"),
        ("IPVS_SVC_ATTR_PE_NAME", "asciiz"),
        ("IPVS_SVC_ATTR_STATS64", "stats64"),
        # ours (0029): the service's SYN proxy counters, ext-stats entries
        ("IPVS_SVC_ATTR_SYNPROXY_STATS", "sp_stats"),
    )
    sp_stats = IpvsExtStats


@_own_nla_table
class IpvsDest(pr_ipvs.ipvsmsg.dest):  # type: ignore[misc]
    prefix = "IPVS_DEST_ATTR_"
    nla_map = (
        ("IPVS_DEST_ATTR_UNSPEC", "none"),
        ("IPVS_DEST_ATTR_ADDR", "cdata"),
        ("IPVS_DEST_ATTR_PORT", "be16"),
        ("IPVS_DEST_ATTR_FWD_METHOD", "uint32"),
        ("IPVS_DEST_ATTR_WEIGHT", "uint32"),
        ("IPVS_DEST_ATTR_U_THRESH", "uint32"),
        ("IPVS_DEST_ATTR_L_THRESH", "uint32"),
        ("IPVS_DEST_ATTR_ACTIVE_CONNS", "uint32"),
        ("IPVS_DEST_ATTR_INACT_CONNS", "uint32"),
        ("IPVS_DEST_ATTR_PERSIST_CONNS", "uint32"),
        ("IPVS_DEST_ATTR_STATS", "stats"),
        ("IPVS_DEST_ATTR_ADDR_FAMILY", "uint16"),
        ("IPVS_DEST_ATTR_STATS64", "stats64"),
        ("IPVS_DEST_ATTR_TUN_TYPE", "uint8"),
        ("IPVS_DEST_ATTR_TUN_PORT", "be16"),
        ("IPVS_DEST_ATTR_TUN_FLAGS", "uint16"),
        # ours (0030): PROXY protocol header for FULLNAT, 0 off / 1 v1 / 2 v2
        ("IPVS_DEST_ATTR_PROXY_PROTOCOL", "uint8"),
    )


@_own_nla_table
class IpvsLaddr(nla):  # type: ignore[misc]
    prefix = "IPVS_LADDR_ATTR_"
    nla_map = (
        ("IPVS_LADDR_ATTR_UNSPEC", "none"),
        ("IPVS_LADDR_ATTR_ADDR", "cdata"),
        ("IPVS_LADDR_ATTR_PORT_CONFLICT", "uint64"),
        ("IPVS_LADDR_ATTR_CONN_COUNTS", "uint32"),
        ("IPVS_LADDR_ATTR_ADDR_FAMILY", "uint16"),
        ("IPVS_LADDR_ATTR_PAD", "none"),  # alignment before the u64 (nla_put_u64_64bit)
    )


@_own_nla_table
class IpvsDaemon(nla):  # type: ignore[misc]
    prefix = "IPVS_DAEMON_ATTR_"
    nla_map = (
        ("IPVS_DAEMON_ATTR_UNSPEC", "none"),
        ("IPVS_DAEMON_ATTR_STATE", "uint32"),
        ("IPVS_DAEMON_ATTR_MCAST_IFN", "asciiz"),
        ("IPVS_DAEMON_ATTR_SYNC_ID", "uint32"),
        ("IPVS_DAEMON_ATTR_SYNC_MAXLEN", "uint16"),
        ("IPVS_DAEMON_ATTR_MCAST_GROUP", "cdata"),
        ("IPVS_DAEMON_ATTR_MCAST_GROUP6", "cdata"),
        ("IPVS_DAEMON_ATTR_MCAST_PORT", "uint16"),
        ("IPVS_DAEMON_ATTR_MCAST_TTL", "uint8"),
    )


@_own_nla_table
class IpvsMessage(pr_ipvs.ipvsmsg):  # type: ignore[misc]
    """Requests and replies of every command except GET_INFO's reply."""

    prefix = "IPVS_CMD_ATTR_"
    nla_map = (
        ("IPVS_CMD_ATTR_UNSPEC", "none"),
        ("IPVS_CMD_ATTR_SERVICE", "service"),
        ("IPVS_CMD_ATTR_DEST", "dest"),
        ("IPVS_CMD_ATTR_DAEMON", "daemon"),
        ("IPVS_CMD_ATTR_TIMEOUT_TCP", "uint32"),
        ("IPVS_CMD_ATTR_TIMEOUT_TCP_FIN", "uint32"),
        ("IPVS_CMD_ATTR_TIMEOUT_UDP", "uint32"),
        ("IPVS_CMD_ATTR_LADDR", "laddr"),
        ("IPVS_CMD_ATTR_EXT_STATS", "ext_stats"),
        ("IPVS_CMD_ATTR_SYNPROXY_SECRET", "cdata"),
    )
    service = IpvsService
    dest = IpvsDest
    laddr = IpvsLaddr
    ext_stats = IpvsExtStats
    daemon = IpvsDaemon


@_own_nla_table
class IpvsInfoMessage(genlmsg):  # type: ignore[misc]
    """The reply to GET_INFO (command SET_INFO): its own attribute numbering."""

    prefix = "IPVS_INFO_ATTR_"
    nla_map = (
        ("IPVS_INFO_ATTR_UNSPEC", "none"),
        ("IPVS_INFO_ATTR_VERSION", "uint32"),
        ("IPVS_INFO_ATTR_CONN_TAB_SIZE", "uint32"),
    )


# ---- errors -----------------------------------------------------------------------------


class NetlinkError(Exception):
    """The kernel refused a request (or IPVS cannot be reached)."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class IpvsUnavailable(NetlinkError):
    """No IPVS generic-netlink family: the ip_vs module is not loaded."""


class NotSupported(NetlinkError):
    """The loaded IPVS lacks the command (stock modules, not ipvs-synproxy's)."""


class NotFound(NetlinkError):
    pass


class ServiceNotFound(NotFound):
    pass


class DestNotFound(NotFound):
    pass


class LaddrNotFound(NotFound):
    pass


class AlreadyExists(NetlinkError):
    pass


class InvalidRequest(NetlinkError):
    pass


class PermissionDenied(NetlinkError):
    pass


class Busy(NetlinkError):
    pass


# ---- conversion between model values and attributes ------------------------------------


def _addr_bytes(addr: IPAddress) -> bytes:
    return addr.packed.ljust(_INET_ADDR_LEN, b"\0")


def _addr_from(raw: bytes, af: int) -> IPAddress:
    if af == socket.AF_INET and len(raw) >= 4:
        return ipaddress.IPv4Address(raw[:4])
    if af == socket.AF_INET6 and len(raw) >= 16:
        return ipaddress.IPv6Address(raw[:16])
    raise ModelError("kernel", "address", f"{len(raw)}-byte address for family {af}")


def _netmask_bytes(svc: Service) -> bytes:
    if svc.af == Family.INET:
        return struct.pack("!I", (U32 << (32 - svc.prefix)) & U32)
    return struct.pack("=I", svc.prefix)


def _netmask_from(raw: bytes, af: int) -> int | None:
    if len(raw) != 4:
        raise ModelError("kernel", "netmask", f"{len(raw)}-byte netmask")
    if af == socket.AF_INET:
        mask = struct.unpack("!I", raw)[0]
        prefix = bin(mask).count("1")
        if mask != (U32 << (32 - prefix)) & U32:
            raise ModelError("kernel", "netmask", f"non-contiguous netmask {mask:#010x}")
    else:
        prefix = struct.unpack("=I", raw)[0]
    return prefix or None


def _attrs(pairs: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    return {"attrs": [list(p) for p in pairs]}


def service_key_attrs(svc: Service) -> dict[str, Any]:
    """The attributes that identify ``svc`` (IPVS_CMD_ATTR_SERVICE)."""
    pairs: list[tuple[str, Any]] = [("IPVS_SVC_ATTR_AF", int(svc.af))]
    if svc.fwmark:
        pairs.append(("IPVS_SVC_ATTR_FWMARK", svc.fwmark))
    else:
        assert svc.addr is not None
        pairs += [("IPVS_SVC_ATTR_PROTOCOL", svc.protocol.number),
                  ("IPVS_SVC_ATTR_ADDR", _addr_bytes(svc.addr)),
                  ("IPVS_SVC_ATTR_PORT", svc.port)]
    return _attrs(pairs)


def service_attrs(svc: Service) -> dict[str, Any]:
    """The full service (for NEW_SERVICE / SET_SERVICE)."""
    out = service_key_attrs(svc)
    out["attrs"] += [
        ["IPVS_SVC_ATTR_SCHED_NAME", svc.scheduler],
        ["IPVS_SVC_ATTR_FLAGS", {"flags": svc.kernel_flags, "mask": U32}],
        ["IPVS_SVC_ATTR_TIMEOUT", svc.persistent],
        ["IPVS_SVC_ATTR_NETMASK", _netmask_bytes(svc)],
    ]
    if svc.pe_name:
        out["attrs"].append(["IPVS_SVC_ATTR_PE_NAME", svc.pe_name])
    return out


def _stats_from(nest: Any) -> Stats | None:
    if nest is None:
        return None
    values = {}
    for name, value in nest["attrs"]:
        if name.startswith("IPVS_STATS_ATTR_") and isinstance(value, int):
            values[name[len("IPVS_STATS_ATTR_"):].lower()] = value
    return Stats.from_mapping(values)


def service_from(nest: Any) -> Service:
    """A :class:`Service` (with stats) from a decoded IPVS_CMD_ATTR_SERVICE."""
    af = nest.get_attr("IPVS_SVC_ATTR_AF")
    fwmark = nest.get_attr("IPVS_SVC_ATTR_FWMARK") or 0
    flags_nla = nest.get_attr("IPVS_SVC_ATTR_FLAGS")
    flags = flags_nla["flags"] if flags_nla is not None else 0
    timeout = nest.get_attr("IPVS_SVC_ATTR_TIMEOUT") or 0
    raw_mask = nest.get_attr("IPVS_SVC_ATTR_NETMASK")
    stats = _stats_from(nest.get_attr("IPVS_SVC_ATTR_STATS64")) or \
        _stats_from(nest.get_attr("IPVS_SVC_ATTR_STATS"))
    sp_nest = nest.get_attr("IPVS_SVC_ATTR_SYNPROXY_STATS")
    common: dict[str, Any] = {
        "scheduler": nest.get_attr("IPVS_SVC_ATTR_SCHED_NAME") or "wlc",
        "persistent": timeout if flags & IP_VS_SVC_F_PERSISTENT else 0,
        "netmask": _netmask_from(raw_mask, af) if raw_mask is not None else None,
        "synproxy": bool(flags & IP_VS_SVC_F_SYNPROXY),
        "flags": flags & SETTABLE_FLAGS,
        "pe_name": nest.get_attr("IPVS_SVC_ATTR_PE_NAME") or None,
        "stats": stats,
        "sp_stats": ext_stats_from(sp_nest) if sp_nest is not None else None,
    }
    if fwmark:
        return Service(fwmark=fwmark, fwmark_af=Family(af), **common)
    return Service(protocol=Protocol.from_number(nest.get_attr("IPVS_SVC_ATTR_PROTOCOL")),
                   addr=_addr_from(nest.get_attr("IPVS_SVC_ATTR_ADDR"), af),
                   port=nest.get_attr("IPVS_SVC_ATTR_PORT"), **common)


def dest_key_attrs(dest: Dest) -> dict[str, Any]:
    return _attrs([("IPVS_DEST_ATTR_ADDR", _addr_bytes(dest.addr)),
                   ("IPVS_DEST_ATTR_PORT", dest.port),
                   ("IPVS_DEST_ATTR_ADDR_FAMILY", int(dest.af))])


def dest_attrs(dest: Dest, *, edit: bool = False) -> dict[str, Any]:
    out = dest_key_attrs(dest)
    out["attrs"] += [
        ["IPVS_DEST_ATTR_FWD_METHOD", int(dest.fwd)],
        ["IPVS_DEST_ATTR_WEIGHT", dest.weight],
        ["IPVS_DEST_ATTR_U_THRESH", dest.u_thresh],
        ["IPVS_DEST_ATTR_L_THRESH", dest.l_thresh],
        ["IPVS_DEST_ATTR_TUN_TYPE", int(dest.tun_type)],
        ["IPVS_DEST_ATTR_TUN_PORT", dest.tun_port],
        ["IPVS_DEST_ATTR_TUN_FLAGS", dest.tun_flags],
    ]
    # A new real server names it only when it can matter (FULLNAT), as upstream
    # ipvsadm would; an edit always does, because the kernel keeps the setting
    # when a request does not name it and would then refuse a FULLNAT real
    # server turned into another method. Stock modules ignore attributes above
    # their IPVS_DEST_ATTR_MAX.
    if edit or dest.fwd is FwdMethod.FULLNAT or dest.proxy_protocol is not ProxyProtocol.OFF:
        out["attrs"].append(["IPVS_DEST_ATTR_PROXY_PROTOCOL", int(dest.proxy_protocol)])
    return out


def _proxy_protocol_from(value: int | None) -> ProxyProtocol:
    """Missing (a stock kernel) is off; a value we do not know is refused loudly."""
    try:
        return ProxyProtocol(value or 0)
    except ValueError:
        raise ModelError("kernel", "proxy_protocol",
                         f"unknown PROXY protocol version {value}") from None


def dest_from(nest: Any, svc_af: int) -> Dest:
    af = nest.get_attr("IPVS_DEST_ATTR_ADDR_FAMILY") or svc_af
    stats = _stats_from(nest.get_attr("IPVS_DEST_ATTR_STATS64")) or \
        _stats_from(nest.get_attr("IPVS_DEST_ATTR_STATS"))
    return Dest(
        addr=_addr_from(nest.get_attr("IPVS_DEST_ATTR_ADDR"), af),
        port=nest.get_attr("IPVS_DEST_ATTR_PORT") or 0,
        fwd=FwdMethod.parse((nest.get_attr("IPVS_DEST_ATTR_FWD_METHOD") or 0) & 0x7,
                            "kernel"),
        weight=nest.get_attr("IPVS_DEST_ATTR_WEIGHT") or 0,
        u_thresh=nest.get_attr("IPVS_DEST_ATTR_U_THRESH") or 0,
        l_thresh=nest.get_attr("IPVS_DEST_ATTR_L_THRESH") or 0,
        tun_type=TunnelType(nest.get_attr("IPVS_DEST_ATTR_TUN_TYPE") or 0),
        tun_port=nest.get_attr("IPVS_DEST_ATTR_TUN_PORT") or 0,
        tun_flags=nest.get_attr("IPVS_DEST_ATTR_TUN_FLAGS") or 0,
        proxy_protocol=_proxy_protocol_from(nest.get_attr("IPVS_DEST_ATTR_PROXY_PROTOCOL")),
        active_conns=nest.get_attr("IPVS_DEST_ATTR_ACTIVE_CONNS") or 0,
        inact_conns=nest.get_attr("IPVS_DEST_ATTR_INACT_CONNS") or 0,
        persist_conns=nest.get_attr("IPVS_DEST_ATTR_PERSIST_CONNS") or 0,
        stats=stats,
    )


def laddr_attrs(addr: IPAddress) -> dict[str, Any]:
    fam = socket.AF_INET if addr.version == 4 else socket.AF_INET6
    return _attrs([("IPVS_LADDR_ATTR_ADDR", _addr_bytes(addr)),
                   ("IPVS_LADDR_ATTR_ADDR_FAMILY", fam)])


def laddr_from(nest: Any, svc_af: int) -> Laddr:
    af = nest.get_attr("IPVS_LADDR_ATTR_ADDR_FAMILY") or svc_af
    return Laddr(addr=_addr_from(nest.get_attr("IPVS_LADDR_ATTR_ADDR"), af),
                 port_conflict=nest.get_attr("IPVS_LADDR_ATTR_PORT_CONFLICT") or 0,
                 conn_counts=nest.get_attr("IPVS_LADDR_ATTR_CONN_COUNTS") or 0)


def ext_stats_from(nest: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for entry in nest.get_attrs("IPVS_EXT_STATS_ATTR_ENTRY"):
        name = entry.get_attr("IPVS_EXT_STATS_ATTR_NAME")
        value = entry.get_attr("IPVS_EXT_STATS_ATTR_VALUE")
        if name is not None and value is not None:
            out[name] = value
    return out


_DAEMON_STATES = {"master": 1, "backup": 2}


def daemon_attrs(d: SyncDaemon) -> dict[str, Any]:
    """IPVS_CMD_ATTR_DAEMON for starting ``d``; optional fields only when set, so
    the kernel applies its own defaults as it does for ipvsadm."""
    pairs: list[tuple[str, Any]] = [
        ("IPVS_DAEMON_ATTR_STATE", _DAEMON_STATES[d.state]),
        ("IPVS_DAEMON_ATTR_MCAST_IFN", d.mcast_ifn),
        ("IPVS_DAEMON_ATTR_SYNC_ID", d.syncid),
    ]
    if d.sync_maxlen:
        pairs.append(("IPVS_DAEMON_ATTR_SYNC_MAXLEN", d.sync_maxlen))
    if d.mcast_group is not None:
        name = "GROUP6" if d.mcast_group.version == 6 else "GROUP"
        pairs.append((f"IPVS_DAEMON_ATTR_MCAST_{name}", d.mcast_group.packed))
    if d.mcast_port:
        pairs.append(("IPVS_DAEMON_ATTR_MCAST_PORT", d.mcast_port))
    if d.mcast_ttl:
        pairs.append(("IPVS_DAEMON_ATTR_MCAST_TTL", d.mcast_ttl))
    return _attrs(pairs)


def daemon_from(nest: Any) -> SyncDaemon:
    """A :class:`SyncDaemon` from a decoded IPVS_CMD_ATTR_DAEMON."""
    state = nest.get_attr("IPVS_DAEMON_ATTR_STATE") or 0
    group4 = nest.get_attr("IPVS_DAEMON_ATTR_MCAST_GROUP")
    group6 = nest.get_attr("IPVS_DAEMON_ATTR_MCAST_GROUP6")
    group: IPAddress | None = None
    if group4 is not None and len(group4) >= 4:
        group = ipaddress.IPv4Address(group4[:4])
    elif group6 is not None and len(group6) >= 16:
        group = ipaddress.IPv6Address(group6[:16])
    return SyncDaemon(
        state="master" if state & 1 else "backup" if state & 2 else f"state {state}",
        mcast_ifn=nest.get_attr("IPVS_DAEMON_ATTR_MCAST_IFN") or "",
        syncid=nest.get_attr("IPVS_DAEMON_ATTR_SYNC_ID") or 0,
        sync_maxlen=nest.get_attr("IPVS_DAEMON_ATTR_SYNC_MAXLEN") or 0,
        mcast_group=group,
        mcast_port=nest.get_attr("IPVS_DAEMON_ATTR_MCAST_PORT") or 0,
        mcast_ttl=nest.get_attr("IPVS_DAEMON_ATTR_MCAST_TTL") or 0)


def build_request(cmd: int, attrs: Sequence[tuple[str, Any]] = ()) -> IpvsMessage:
    msg = IpvsMessage()
    msg["cmd"] = cmd
    msg["version"] = GENL_VERSION
    msg["attrs"] = [list(a) for a in attrs]
    return msg


def decode_reply(data: bytes) -> IpvsMessage | IpvsInfoMessage:
    """Decode one IPVS message (header included) with the class its command needs."""
    cmd = data[_NLMSGHDR.size] if len(data) > _NLMSGHDR.size else 0
    cls = IpvsInfoMessage if cmd == IPVS_CMD_SET_INFO else IpvsMessage
    msg = cls(bytes(data))
    msg.decode()
    return msg


# ---- transport --------------------------------------------------------------------------


def _socket_in_netns(netns: str | None) -> socket.socket:
    """A generic-netlink socket created in ``netns`` (a socket keeps the
    namespace it was made in, whatever thread uses it later)."""
    if netns is None:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
    from ipvs_synproxy.kernel.netns import socket_in

    try:
        return socket_in(netns, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
    except OSError as exc:
        raise IpvsUnavailable(f"cannot open a netlink socket in netns {netns!r}: "
                              f"{exc}") from exc


class _Transport:
    """Request/response over one generic-netlink socket."""

    RCVBUF = 1 << 20

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.seq = 0
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.RCVBUF)
        for opt in (NETLINK_CAP_ACK, NETLINK_EXT_ACK):
            with contextlib.suppress(OSError):  # older kernels: plain ACKs
                sock.setsockopt(SOL_NETLINK, opt, 1)
        sock.bind((0, 0))

    def close(self) -> None:
        self.sock.close()

    def request(self, msg: Any, msg_type: int, flags: int) -> Iterator[bytes]:
        """Send ``msg``; yield the raw replies until the ACK or the end of the
        dump. A kernel error raises :class:`_KernelError`."""
        self.seq += 1
        seq = self.seq
        msg["header"]["type"] = msg_type
        msg["header"]["flags"] = flags
        msg["header"]["sequence_number"] = seq
        msg["header"]["pid"] = 0
        msg.encode()
        self.sock.send(bytes(msg.data))
        while True:
            data = self.sock.recv(self.RCVBUF)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, mtype, mflags, mseq, _ = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size:
                    raise NetlinkError(f"malformed netlink reply (length {length})")
                part = data[offset:offset + length]
                offset += (length + 3) & ~3
                if mseq != seq:
                    continue
                if mtype == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", part, _NLMSGHDR.size)[0]
                    if code:
                        raise _KernelError(code, _ext_ack_message(part, mflags))
                    return
                if mtype == NLMSG_DONE:
                    code = -struct.unpack_from("=i", part, _NLMSGHDR.size)[0] \
                        if len(part) >= _NLMSGHDR.size + 4 else 0
                    if code > 0:
                        raise _KernelError(code, _ext_ack_message(part, mflags))
                    return
                yield part
                if not (mflags & NLM_F_MULTI) and not (flags & (NLM_F_ACK | NLM_F_DUMP)):
                    return


def _ext_ack_message(part: bytes, flags: int) -> str:
    """The kernel's extended-ACK text, if it sent one (NETLINK_CAP_ACK is set, so
    only the request's header is echoed before the TLVs)."""
    if not flags & NLM_F_ACK_TLVS:
        return ""
    offset = _NLMSGHDR.size + 4 + _NLMSGHDR.size
    while offset + 4 <= len(part):
        alen, atype = struct.unpack_from("=HH", part, offset)
        if alen < 4:
            break
        if atype & 0x3FFF == NLMSGERR_ATTR_MSG:
            return part[offset + 4:offset + alen].split(b"\0", 1)[0].decode(errors="replace")
        offset += (alen + 3) & ~3
    return ""


class _KernelError(Exception):
    def __init__(self, code: int, extack: str) -> None:
        super().__init__(code, extack)
        self.code = code
        self.extack = extack


# ---- the client -------------------------------------------------------------------------


class IPVS:
    """An IPVS control connection, in the current or a named network namespace.

    ``with IPVS("lb") as ipvs: ipvs.add_service(svc)``. Not thread-safe: one
    instance per thread.
    """

    _CAPS_NAMES: ClassVar[dict[int, str]] = {
        IPVS_CMD_NEW_LADDR: "adding local addresses",
        IPVS_CMD_DEL_LADDR: "deleting local addresses",
        IPVS_CMD_GET_LADDR: "listing local addresses",
        IPVS_CMD_GET_EXT_STATS: "extended statistics",
        IPVS_CMD_SET_SYNPROXY_SECRET: "setting the SYN proxy secret",
    }

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._t = _Transport(_socket_in_netns(netns))
        try:
            self.family_id, self.ops = self._resolve_family()
        except BaseException:
            self._t.close()
            raise

    # -- plumbing

    def __enter__(self) -> IPVS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._t.close()

    def _resolve_family(self) -> tuple[int, dict[int, int]]:
        msg = ctrlmsg()
        msg["cmd"] = CTRL_CMD_GETFAMILY
        msg["version"] = 1
        msg["attrs"] = [["CTRL_ATTR_FAMILY_NAME", GENL_NAME]]
        try:
            replies = list(self._t.request(msg, GENL_ID_CTRL, NLM_F_REQUEST | NLM_F_ACK))
        except _KernelError as exc:
            where = f" in netns {self.netns}" if self.netns else ""
            if exc.code == errno.ENOENT:
                raise IpvsUnavailable(f"no IPVS in the kernel{where} "
                                      "(is the ip_vs module loaded?)", exc.code) from None
            raise NetlinkError(f"looking up IPVS{where}: {os.strerror(exc.code)}",
                               exc.code) from None
        reply = ctrlmsg(replies[0])
        reply.decode()
        ops: dict[int, int] = {}
        for op in reply.get_attr("CTRL_ATTR_OPS") or []:
            ops[op.get_attr("CTRL_ATTR_OP_ID")] = op.get_attr("CTRL_ATTR_OP_FLAGS") or 0
        return reply.get_attr("CTRL_ATTR_FAMILY_ID"), ops

    def supports(self, cmd: int) -> bool:
        """Whether the loaded IPVS knows command ``cmd``."""
        return cmd in self.ops

    def _call(self, cmd: int, attrs: Sequence[tuple[str, Any]] = (), *,
              dump: bool = False, what: str,
              errors: dict[int, tuple[type[NetlinkError], str]] | None = None,
              ) -> list[IpvsMessage | IpvsInfoMessage]:
        if self.ops and cmd not in self.ops:
            feature = self._CAPS_NAMES.get(cmd, f"command {cmd}")
            raise NotSupported(f"{what}: the loaded IPVS modules do not support {feature} "
                               "(load the ipvs-synproxy modules)", errno.EOPNOTSUPP)
        if dump and self.ops and not self.ops[cmd] & GENL_CMD_CAP_DUMP:
            dump = False
        elif not dump and self.ops and not self.ops[cmd] & GENL_CMD_CAP_DO:
            dump = True
        flags = NLM_F_REQUEST | (NLM_F_DUMP if dump else NLM_F_ACK)
        try:
            return [decode_reply(raw) for raw in
                    self._t.request(build_request(cmd, attrs), self.family_id, flags)]
        except _KernelError as exc:
            raise self._error(exc, what, errors or {}) from None

    @staticmethod
    def _error(exc: _KernelError, what: str,
               errors: dict[int, tuple[type[NetlinkError], str]]) -> NetlinkError:
        detail = f" ({exc.extack})" if exc.extack else ""
        if exc.code in errors:
            cls, text = errors[exc.code]
            return cls(f"{text}{detail}", exc.code)
        generic: dict[int, type[NetlinkError]] = {
            errno.EPERM: PermissionDenied, errno.EACCES: PermissionDenied,
            errno.EINVAL: InvalidRequest, errno.ERANGE: InvalidRequest,
            errno.EAFNOSUPPORT: InvalidRequest, errno.EEXIST: AlreadyExists,
            errno.ENOENT: NotFound, errno.ESRCH: NotFound, errno.EBUSY: Busy,
            errno.EOPNOTSUPP: NotSupported,
        }
        cls = generic.get(exc.code, NetlinkError)
        return cls(f"{what}: {os.strerror(exc.code)}{detail}", exc.code)

    @staticmethod
    def _svc_errors(svc: Service) -> dict[int, tuple[type[NetlinkError], str]]:
        return {errno.ESRCH: (ServiceNotFound, f"service {svc} does not exist")}

    # -- services

    def services(self) -> list[Service]:
        """Every service, with its statistics."""
        return [service_from(m.get_attr("IPVS_CMD_ATTR_SERVICE"))
                for m in self._call(IPVS_CMD_GET_SERVICE, dump=True, what="listing services")]

    def service(self, svc: Service) -> Service:
        """The kernel's view of ``svc`` (raises :class:`ServiceNotFound`)."""
        (reply,) = self._call(IPVS_CMD_GET_SERVICE,
                              [("IPVS_CMD_ATTR_SERVICE", service_key_attrs(svc))],
                              what=f"getting service {svc}", errors=self._svc_errors(svc))
        return service_from(reply.get_attr("IPVS_CMD_ATTR_SERVICE"))

    def add_service(self, svc: Service) -> None:
        self._call(IPVS_CMD_NEW_SERVICE, [("IPVS_CMD_ATTR_SERVICE", service_attrs(svc))],
                   what=f"adding service {svc}", errors={
                       errno.EEXIST: (AlreadyExists, f"service {svc} already exists"),
                       errno.ENOENT: (InvalidRequest, f"adding service {svc}: scheduler "
                                                      f"{svc.scheduler!r} or persistence "
                                                      "engine not available"),
                   })

    def edit_service(self, svc: Service) -> None:
        self._call(IPVS_CMD_SET_SERVICE, [("IPVS_CMD_ATTR_SERVICE", service_attrs(svc))],
                   what=f"editing service {svc}", errors={
                       **self._svc_errors(svc),
                       errno.ENOENT: (InvalidRequest, f"editing service {svc}: scheduler "
                                                      f"{svc.scheduler!r} or persistence "
                                                      "engine not available"),
                   })

    def del_service(self, svc: Service) -> None:
        self._call(IPVS_CMD_DEL_SERVICE, [("IPVS_CMD_ATTR_SERVICE", service_key_attrs(svc))],
                   what=f"deleting service {svc}", errors=self._svc_errors(svc))

    def flush(self) -> None:
        """Delete every service."""
        self._call(IPVS_CMD_FLUSH, what="flushing services")

    def zero(self, svc: Service | None = None) -> None:
        """Zero the counters of ``svc``, or of every service."""
        if svc is None:
            self._call(IPVS_CMD_ZERO, what="zeroing counters")
        else:
            self._call(IPVS_CMD_ZERO, [("IPVS_CMD_ATTR_SERVICE", service_key_attrs(svc))],
                       what=f"zeroing counters of {svc}", errors=self._svc_errors(svc))

    # -- real servers

    def dests(self, svc: Service) -> list[Dest]:
        """The real servers of ``svc`` with their counters."""
        self.service(svc)  # a dump for a missing service is silently empty
        return [dest_from(m.get_attr("IPVS_CMD_ATTR_DEST"), svc.af)
                for m in self._call(IPVS_CMD_GET_DEST,
                                    [("IPVS_CMD_ATTR_SERVICE", service_key_attrs(svc))],
                                    dump=True, what=f"listing real servers of {svc}",
                                    errors=self._svc_errors(svc))]

    def _dest_call(self, cmd: int, svc: Service, dest: Dest, verb: str,
                   attrs: dict[str, Any]) -> None:
        self._call(cmd, [("IPVS_CMD_ATTR_SERVICE", service_key_attrs(svc)),
                         ("IPVS_CMD_ATTR_DEST", attrs)],
                   what=f"{verb} real server {dest} of service {svc}", errors={
                       **self._svc_errors(svc),
                       errno.EEXIST: (AlreadyExists,
                                      f"real server {dest} of service {svc} already exists"),
                       errno.ENOENT: (DestNotFound,
                                      f"real server {dest} of service {svc} does not exist"),
                   })

    def add_dest(self, svc: Service, dest: Dest) -> None:
        self._dest_call(IPVS_CMD_NEW_DEST, svc, dest, "adding", dest_attrs(dest))

    def edit_dest(self, svc: Service, dest: Dest) -> None:
        self._dest_call(IPVS_CMD_SET_DEST, svc, dest, "editing", dest_attrs(dest, edit=True))

    def del_dest(self, svc: Service, dest: Dest) -> None:
        self._dest_call(IPVS_CMD_DEL_DEST, svc, dest, "deleting", dest_key_attrs(dest))

    # -- global settings

    def info(self) -> Info:
        (reply,) = self._call(IPVS_CMD_GET_INFO, what="getting IPVS info")
        v = reply.get_attr("IPVS_INFO_ATTR_VERSION") or 0
        return Info(version=f"{v >> 16}.{(v >> 8) & 0xFF}.{v & 0xFF}",
                    conn_tab_size=reply.get_attr("IPVS_INFO_ATTR_CONN_TAB_SIZE") or 0)

    def start_daemon(self, d: SyncDaemon) -> None:
        """Start a connection-sync daemon (``ipvsadm --start-daemon``)."""
        self._call(IPVS_CMD_NEW_DAEMON, [("IPVS_CMD_ATTR_DAEMON", daemon_attrs(d))],
                   what=f"starting the {d.state} sync daemon", errors={
                       errno.EEXIST: (AlreadyExists,
                                      f"a {d.state} sync daemon is already running")})

    def stop_daemon(self, d: SyncDaemon) -> None:
        """Stop the connection-sync daemon of ``d.state``."""
        attrs = _attrs([("IPVS_DAEMON_ATTR_STATE", _DAEMON_STATES[d.state])])
        self._call(IPVS_CMD_DEL_DAEMON, [("IPVS_CMD_ATTR_DAEMON", attrs)],
                   what=f"stopping the {d.state} sync daemon", errors={
                       errno.ESRCH: (NotFound, f"no {d.state} sync daemon is running")})

    def daemons(self) -> list[SyncDaemon]:
        """The running connection-sync daemons (master first)."""
        return [daemon_from(m.get_attr("IPVS_CMD_ATTR_DAEMON"))
                for m in self._call(IPVS_CMD_GET_DAEMON, dump=True,
                                    what="listing sync daemons")
                if m.get_attr("IPVS_CMD_ATTR_DAEMON") is not None]

    def timeouts(self) -> Timeouts:
        (reply,) = self._call(IPVS_CMD_GET_CONFIG, what="getting timeouts")
        return Timeouts(tcp=reply.get_attr("IPVS_CMD_ATTR_TIMEOUT_TCP") or 0,
                        tcp_fin=reply.get_attr("IPVS_CMD_ATTR_TIMEOUT_TCP_FIN") or 0,
                        udp=reply.get_attr("IPVS_CMD_ATTR_TIMEOUT_UDP") or 0)

    def set_timeouts(self, t: Timeouts) -> None:
        """Set the timeouts that are non-zero in ``t``."""
        self._call(IPVS_CMD_SET_CONFIG, [("IPVS_CMD_ATTR_TIMEOUT_TCP", t.tcp),
                                         ("IPVS_CMD_ATTR_TIMEOUT_TCP_FIN", t.tcp_fin),
                                         ("IPVS_CMD_ATTR_TIMEOUT_UDP", t.udp)],
                   what="setting timeouts")

    # -- ipvs-synproxy extensions

    def add_laddr(self, svc: Service, addr: IPAddress) -> None:
        self._call(IPVS_CMD_NEW_LADDR, [("IPVS_CMD_ATTR_SERVICE", service_key_attrs(svc)),
                                        ("IPVS_CMD_ATTR_LADDR", laddr_attrs(addr))],
                   what=f"adding laddr {addr} to service {svc}", errors={
                       **self._svc_errors(svc),
                       errno.EEXIST: (AlreadyExists,
                                      f"laddr {addr} of service {svc} already exists"),
                   })

    def del_laddr(self, svc: Service, addr: IPAddress) -> None:
        self._call(IPVS_CMD_DEL_LADDR, [("IPVS_CMD_ATTR_SERVICE", service_key_attrs(svc)),
                                        ("IPVS_CMD_ATTR_LADDR", laddr_attrs(addr))],
                   what=f"deleting laddr {addr} of service {svc}", errors={
                       **self._svc_errors(svc),
                       errno.ENOENT: (LaddrNotFound,
                                      f"laddr {addr} of service {svc} does not exist"),
                   })

    def laddrs(self, svc: Service) -> list[Laddr]:
        self.service(svc)
        return [laddr_from(m.get_attr("IPVS_CMD_ATTR_LADDR"), svc.af)
                for m in self._call(IPVS_CMD_GET_LADDR,
                                    [("IPVS_CMD_ATTR_SERVICE", service_key_attrs(svc))],
                                    dump=True, what=f"listing laddrs of service {svc}",
                                    errors=self._svc_errors(svc))
                if m.get_attr("IPVS_CMD_ATTR_LADDR") is not None]

    def ext_stats(self) -> dict[str, int]:
        """Extended counters (the rows of /proc/net/ip_vs_ext_stats), summed over CPUs."""
        out: dict[str, int] = {}
        for m in self._call(IPVS_CMD_GET_EXT_STATS, what="getting extended statistics"):
            nest = m.get_attr("IPVS_CMD_ATTR_EXT_STATS")
            if nest is not None:
                out.update(ext_stats_from(nest))
        return out

    def set_synproxy_secret(self, secret: bytes) -> None:
        if not isinstance(secret, bytes | bytearray) or len(secret) != SYNPROXY_SECRET_LEN:
            raise ModelError("synproxy secret", "secret",
                             f"must be {SYNPROXY_SECRET_LEN} bytes")
        self._call(IPVS_CMD_SET_SYNPROXY_SECRET,
                   [("IPVS_CMD_ATTR_SYNPROXY_SECRET", bytes(secret))],
                   what="setting the SYN proxy secret")
