"""ipvsadm's listing and save formats, byte for byte: model values in, text out."""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from collections.abc import Iterable, Sequence

from ipvs_synproxy.adm.command import (
    PROTO_OPTION,
    SCHED_FLAG_MASK,
    TUN_FLAG_NAMES,
    TUN_FLAG_OPTS,
    Format,
)
from ipvs_synproxy.kernel.model import (
    IP_VS_SVC_F_ONEPACKET,
    IP_VS_SVC_F_SCHED1,
    IP_VS_SVC_F_SCHED2,
    IP_VS_SVC_F_SCHED3,
    Dest,
    Family,
    FwdMethod,
    Info,
    IPAddress,
    Laddr,
    Protocol,
    ProxyProtocol,
    Service,
    Stats,
    SyncDaemon,
    Timeouts,
    TunnelType,
)

# ---- formatting (pure functions of model values) -----------------------------------------


def _c_int(value: int) -> int:
    """An unsigned difference as C converts it to int (ipvsadm's comparators)."""
    value &= 0xFFFF_FFFF
    return value - (1 << 32) if value & 0x8000_0000 else value


def _addr_words(addr: IPAddress | None, af: int) -> list[int]:
    if addr is None:
        return [0] * (4 if af == socket.AF_INET6 else 1)
    raw = addr.packed
    return [int.from_bytes(raw[i:i + 4], "big") for i in range(0, len(raw), 4)]


def _cmp_words(a: list[int], b: list[int]) -> int:
    r = 0
    for x, y in zip(a, b, strict=False):
        r = _c_int(x - y)
        if r:
            break
    return r


def _cmp_services(a: Service, b: Service) -> int:
    for x, y in ((a.fwmark, b.fwmark), (int(a.af), int(b.af)),
                 (0 if a.fwmark else a.protocol.number, 0 if b.fwmark else b.protocol.number)):
        r = _c_int(x - y)
        if r:
            return r
    r = _cmp_words(_addr_words(a.addr, a.af), _addr_words(b.addr, a.af))
    return r or a.port - b.port


def _cmp_dests(a: Dest, b: Dest) -> int:
    r = _cmp_words(_addr_words(a.addr, a.af), _addr_words(b.addr, a.af))
    return r or a.port - b.port


def sort_services(services: Iterable[Service]) -> list[Service]:
    return sorted(services, key=functools.cmp_to_key(_cmp_services))


def sort_dests(dests: Iterable[Dest]) -> list[Dest]:
    return sorted(dests, key=functools.cmp_to_key(_cmp_dests))


def ntop(addr: IPAddress) -> str:
    fam = socket.AF_INET if addr.version == 4 else socket.AF_INET6
    return socket.inet_ntop(fam, addr.packed)


def _resolve_addr(addr: IPAddress) -> str:
    try:
        return socket.gethostbyaddr(ntop(addr))[0]
    except (OSError, UnicodeError):
        return ntop(addr)


def _resolve_port(port: int, protocol: Protocol) -> str:
    try:
        return socket.getservbyport(port, protocol.value)
    except (OSError, OverflowError):
        return str(port)


def addrport(addr: IPAddress, port: int, protocol: Protocol, numeric: bool) -> str:
    """ipvsadm's addrport_to_anyname()."""
    host = ntop(addr) if numeric else _resolve_addr(addr)
    service = str(port) if numeric else _resolve_port(port, protocol)
    return f"[{host}]:{service}" if addr.version == 6 else f"{host}:{service}"


def format_largenum(value: int, exact: bool) -> str:
    """ipvsadm's print_largenum(): 9 columns, K/M/G/T unless exact."""
    if exact:
        text = str(value)
        return text.rjust(9 if len(text) <= 8 else len(text) + 1)
    for limit, div, unit in ((100_000_000, 1, ""), (1_000_000_000, 1000, "K"),
                             (100_000_000_000, 1_000_000, "M"),
                             (100_000_000_000_000, 1_000_000_000, "G")):
        if value < limit:
            return f"{value // div:{8 if unit else 9}d}{unit}"
    return f"{value // 1_000_000_000_000:8d}T"


def _sched_flags_text(svc: Service) -> str:
    names: list[str] = []
    if svc.scheduler in ("sh", "mh"):
        if svc.flags & IP_VS_SVC_F_SCHED1:
            names.append(f"{svc.scheduler}-fallback")
        if svc.flags & IP_VS_SVC_F_SCHED2:
            names.append(f"{svc.scheduler}-port")
    else:
        for i, bit in enumerate((IP_VS_SVC_F_SCHED1, IP_VS_SVC_F_SCHED2,
                                 IP_VS_SVC_F_SCHED3), 1):
            if svc.flags & bit:
                names.append(f"flag-{i}")
    return ",".join(names)


_FWD_NAME = {FwdMethod.MASQ: "Masq", FwdMethod.LOCAL: "Local", FwdMethod.TUNNEL: "Tunnel",
             FwdMethod.ROUTE: "Route", FwdMethod.FULLNAT: "FullNat"}
_FWD_SWITCH = {FwdMethod.MASQ: "-m", FwdMethod.LOCAL: "-g", FwdMethod.TUNNEL: "-i",
               FwdMethod.ROUTE: "-g", FwdMethod.FULLNAT: "--fullnat"}


def service_name(svc: Service, fmt: Format) -> str:
    """The service as ipvsadm names it in a listing or (rule) a command line."""
    if svc.fwmark:
        v6 = svc.af == Family.INET6
        if fmt.rule:
            return f"-f {svc.fwmark} -6" if v6 else f"-f {svc.fwmark}"
        return f"FWM  {svc.fwmark} IPv6" if v6 else f"FWM  {svc.fwmark}"
    assert svc.addr is not None
    vname = addrport(svc.addr, svc.port, svc.protocol, fmt.numeric)
    if fmt.rule:
        return f"{PROTO_OPTION[svc.protocol]} {vname}"
    name = f"{svc.protocol.name:<4s} {vname}"
    return name if svc.af == Family.INET6 else name[:33]


def _mask_text(svc: Service) -> str:
    if svc.af == Family.INET6:
        return str(svc.prefix)
    return str(ipaddress.IPv4Address((0xFFFF_FFFF << (32 - svc.prefix)) & 0xFFFF_FFFF))


def format_title(fmt: Format) -> str:
    if fmt.stats:
        return (f"{'Prot LocalAddress:Port':<33s} {'Conns':>8s} {'InPkts':>8s} "
                f"{'OutPkts':>8s} {'InBytes':>8s} {'OutBytes':>8s}\n  -> RemoteAddress:Port\n")
    if fmt.rate:
        return (f"{'Prot LocalAddress:Port':<33s} {'CPS':>8s} {'InPPS':>8s} {'OutPPS':>8s} "
                f"{'InBPS':>8s} {'OutBPS':>8s}\n  -> RemoteAddress:Port\n")
    if fmt.thresholds:
        return (f"{'Prot LocalAddress:Port':<33s} {'Uthreshold':<10s} {'Lthreshold':<10s} "
                f"{'ActiveConn':<10s} {'InActConn':<10s}\n  -> RemoteAddress:Port\n")
    if fmt.persistent_conn:
        return (f"{'Prot LocalAddress:Port':<33s} {'Weight':<9s} {'PersistConn':<11s} "
                f"{'ActiveConn':<10s} {'InActConn':<10s}\n  -> RemoteAddress:Port\n")
    if fmt.rule:
        return ""
    if fmt.tun_info or fmt.proxy_info:
        return ("Prot LocalAddress:Port Scheduler Flags\n  -> RemoteAddress:Port           "
                "Forward " + ("TunnelInfo    " if fmt.tun_info else "")
                + ("Proxy " if fmt.proxy_info else "") + "Weight ActiveConn InActConn\n")
    return ("Prot LocalAddress:Port Scheduler Flags\n"
            "  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n")


def _tun_info(dest: Dest) -> str:
    if dest.fwd is not FwdMethod.TUNNEL:
        return "n/a"
    if dest.tun_type is TunnelType.GUE:
        return f"gue:{dest.tun_port}:{TUN_FLAG_NAMES.get(dest.tun_flags, '')}"
    if dest.tun_type is TunnelType.GRE:
        return f"gre:{TUN_FLAG_NAMES.get(dest.tun_flags, '')}"
    return "ipip"


def _proxy_info(dest: Dest) -> str:
    """The PROXY column: off/v1/v2 for a FULLNAT real server, n/a for the others."""
    return str(dest.proxy_protocol) if dest.fwd is FwdMethod.FULLNAT else "n/a"


def _service_line(svc: Service, fmt: Format, name: str) -> str:
    stats = svc.stats or Stats()
    if fmt.rule:
        line = f"-A {name} -s {svc.scheduler}"
        if svc.persistent:
            line += f" -p {svc.persistent}"
            if svc.netmask is not None:
                line += f" -M {_mask_text(svc)}"
        if svc.pe_name:
            line += f" --pe {svc.pe_name}"
        if svc.flags & IP_VS_SVC_F_ONEPACKET:
            line += " -o"
        if svc.flags & SCHED_FLAG_MASK:
            line += f" -b {_sched_flags_text(svc)}"
        if svc.synproxy:
            line += " --synproxy"
        return line
    if fmt.stats or fmt.rate:
        values = ((stats.conns, stats.inpkts, stats.outpkts, stats.inbytes, stats.outbytes)
                  if fmt.stats else
                  (stats.cps, stats.inpps, stats.outpps, stats.inbps, stats.outbps))
        return f"{name:<33s}" + "".join(format_largenum(v, fmt.exact) for v in values)
    line = f"{name} {svc.scheduler}"
    if svc.flags & SCHED_FLAG_MASK:
        line += f" ({_sched_flags_text(svc)})"
    if svc.persistent:
        line += f" persistent {svc.persistent}"
        if svc.netmask is not None:
            line += f" mask {_mask_text(svc)}"
        if svc.pe_name:
            line += f" pe {svc.pe_name}"
    if svc.flags & IP_VS_SVC_F_ONEPACKET:
        line += " ops"
    if svc.synproxy:
        line += " synproxy"
    return line


def _dest_line(svc_name: str, svc: Service, dest: Dest, fmt: Format) -> str:
    dname = addrport(dest.addr, dest.port, svc.protocol, fmt.numeric)
    if not fmt.rule and dest.af != Family.INET6:
        dname = dname[:28]
    stats = dest.stats or Stats()
    if fmt.rule:
        line = f"-a {svc_name} -r {dname} {_FWD_SWITCH[dest.fwd]} -w {dest.weight}"
        if dest.fwd is FwdMethod.TUNNEL:
            line += f" --tun-type {dest.tun_type.name.lower()}"
            if dest.tun_type is TunnelType.GUE:
                line += f" --tun-port {dest.tun_port}"
            if dest.tun_type is not TunnelType.IPIP:
                line += f" {TUN_FLAG_OPTS.get(dest.tun_flags, '')}"
        if dest.proxy_protocol is not ProxyProtocol.OFF:
            line += f" --proxy-protocol {dest.proxy_protocol}"
        return line
    if fmt.stats:
        return f"  -> {dname:<28s}" + "".join(
            format_largenum(v, fmt.exact) for v in
            (stats.conns, stats.inpkts, stats.outpkts, stats.inbytes, stats.outbytes))
    if fmt.rate:
        return (f"  -> {dname:<28s} {stats.cps:8d} {stats.inpps:8d} {stats.outpps:8d}"
                + format_largenum(stats.inbps, fmt.exact)
                + format_largenum(stats.outbps, fmt.exact))
    if fmt.thresholds:
        return (f"  -> {dname:<28s} {dest.u_thresh:<10d} {dest.l_thresh:<10d} "
                f"{dest.active_conns:<10d} {dest.inact_conns:<10d}")
    if fmt.persistent_conn:
        return (f"  -> {dname:<28s} {dest.weight:<9d} {dest.persist_conns:<11d} "
                f"{dest.active_conns:<10d} {dest.inact_conns:<10d}")
    if fmt.tun_info or fmt.proxy_info:
        return (f"  -> {dname:<28s} {_FWD_NAME[dest.fwd]:<7s} "
                + (f"{_tun_info(dest):<13s} " if fmt.tun_info else "")
                + (f"{_proxy_info(dest):<5s} " if fmt.proxy_info else "")
                + f"{dest.weight:<6d} {dest.active_conns:<10d} {dest.inact_conns:<10d}")
    return (f"  -> {dname:<28s} {_FWD_NAME[dest.fwd]:<7s} {dest.weight:<6d} "
            f"{dest.active_conns:<10d} {dest.inact_conns:<10d}")


def format_service(svc: Service, dests: Sequence[Dest], fmt: Format,
                   laddrs: Sequence[Laddr] = ()) -> str:
    """One service and its real servers (ipvsadm's print_service_entry())."""
    name = service_name(svc, fmt)
    lines = [_service_line(svc, fmt, name)]
    for dest in dests if fmt.nosort else sort_dests(dests):
        lines.append(_dest_line(name, svc, dest, fmt))
    if fmt.rule:
        lines += [f"--laddr-add {ntop(la.addr)} {name}" for la in laddrs]
    return "".join(f"{line}\n" for line in lines)


def format_header(info: Info) -> str:
    return f"IP Virtual Server version {info.version} (size={info.conn_tab_size})\n"


def format_table(info: Info | None,
                 entries: Sequence[tuple[Service, Sequence[Dest], Sequence[Laddr]]],
                 fmt: Format) -> str:
    """``-L``/``-S``: the whole table (``info`` None: no version line, as for ``-L -t``)."""
    out = format_header(info) if info is not None and not fmt.rule else ""
    out += format_title(fmt)
    if not fmt.nosort:
        order = {id(svc): i for i, svc in enumerate(sort_services(e[0] for e in entries))}
        entries = sorted(entries, key=lambda e: order[id(e[0])])
    for svc, dests, laddrs in entries:
        out += format_service(svc, dests, fmt, laddrs)
    return out


def format_timeouts(t: Timeouts) -> str:
    return f"Timeout (tcp tcpfin udp): {t.tcp} {t.tcp_fin} {t.udp}\n"


def format_daemons(daemons: Sequence[SyncDaemon]) -> str:
    """``-L --daemon``: one line per running sync daemon (ipvsadm's list_daemon())."""
    out = ""
    for d in daemons:
        if d.state not in ("master", "backup"):
            continue
        out += f"{d.state} sync daemon (mcast={d.mcast_ifn}, syncid={d.syncid}"
        if d.sync_maxlen:
            out += f", maxlen={d.sync_maxlen}"
        if d.mcast_group is not None:
            out += f", group={ntop(d.mcast_group)}"
        if d.mcast_port:
            out += f", port={d.mcast_port}"
        if d.mcast_ttl:
            out += f", ttl={d.mcast_ttl}"
        out += ")\n"
    return out


def _conn_addr(text: str) -> IPAddress:
    try:
        return ipaddress.IPv6Address(socket.inet_pton(socket.AF_INET6, text))
    except (OSError, ValueError):
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, text))
    except (OSError, ValueError):
        m = re.match(r"\s*(?:0[xX])?([0-9a-fA-F]*)", text)
        return ipaddress.IPv4Address(int(m.group(1) or "0", 16) & 0xFFFF_FFFF if m else 0)


def format_connections(proc_text: str, fmt: Format) -> str:
    """``-L -c``: /proc/net/ip_vs_conn in ipvsadm's layout."""
    out = "IPVS connection entries\n"
    if fmt.persistent_conn:
        out += (f"pro expire {'state':<11s} {'source':<18s} {'virtual':<18s} "
                f"{'destination':<18s} {'pe name':<16s} pe_data\n")
    else:
        out += (f"pro expire {'state':<11s} {'source':<18s} {'virtual':<18s} "
                "destination\n")
    for line in proc_text.splitlines()[1:]:
        f = line.split()
        if len(f) < 9:
            continue
        proto_name = f[0]
        protocol = {"TCP": Protocol.TCP, "UDP": Protocol.UDP,
                    "SCTP": Protocol.SCTP}.get(proto_name, Protocol.TCP)
        caddr, vaddr, daddr = _conn_addr(f[1]), _conn_addr(f[3]), _conn_addr(f[5])
        cport, vport, dport = (int(f[i], 16) & 0xFFFF for i in (2, 4, 6))
        expires = int(f[8])
        cname = addrport(caddr, cport, protocol, fmt.numeric)
        vname = addrport(vaddr, vport, protocol, fmt.numeric)
        dname = addrport(daddr, dport, protocol, fmt.numeric)
        expire = f"{expires // 60:02d}:{expires % 60:02d}"
        if fmt.persistent_conn and len(f) >= 11:
            out += (f"{proto_name:<3s} {expire:<6s} {f[7]:<11s} {cname:<18s} {vname:<18s} "
                    f"{dname:<16s} {f[9]:<18s} {f[10]}\n")
        else:
            out += (f"{proto_name:<3s} {expire:<6s} {f[7]:<11s} {cname:<18s} {vname:<18s} "
                    f"{dname}\n")
    return out


def format_laddrs(entries: Sequence[tuple[Service, Sequence[Laddr]]], fmt: Format) -> str:
    """``--laddr-list``: each service, then its local addresses with their counters."""
    out = (f"{'Prot LocalAddress:Port':<33s} Laddrs\n"
           f"  -> {'LocalAddress':<28s} {'Conflicts':<10s} {'Conns':<10s}\n")
    if not fmt.nosort:
        order = {id(svc): i for i, svc in enumerate(sort_services(e[0] for e in entries))}
        entries = sorted(entries, key=lambda e: order[id(e[0])])
    for svc, laddrs in entries:
        out += f"{service_name(svc, fmt):<33s} {len(laddrs)}\n"
        for la in laddrs:
            host = ntop(la.addr) if fmt.numeric else _resolve_addr(la.addr)
            out += f"  -> {host:<28s} {la.port_conflict:<10d} {la.conn_counts:<10d}\n"
    return out
