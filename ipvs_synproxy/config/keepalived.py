"""Render keepalived.conf from the declarative config file.

The same file that ``ipvs-synproxy apply`` reads describes the services, real
servers and laddr pools; its ``keepalived:`` section and the services'
``healthcheck:`` keys (:mod:`keepalived_settings`) add the health checks and
the VRRP instances. :func:`render` turns a loaded :class:`config.Config` into
the text of a keepalived.conf for keepalived 2.2.7 with this project's
patches (``lvs_method FNAT``, ``syn_proxy``, ``local_address_group`` /
``laddr_group_name``, a real server's ``proxy_protocol``; see
keepalived/patches/). The file's ``xdp:`` interfaces become notify scripts
of the VRRP instance on each (:func:`xdp_scripts`): the XDP fast path runs
where this balancer is master. The Jinja2 templates are this package's data
(``templates/``); this module hands them formatted, validated values only, so
the output is a pure function of the file: rendering the same file twice
gives the same bytes.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2

from ipvs_synproxy.config.keepalived_settings import HealthCheck, KeepalivedSettings, VrrpInstance
from ipvs_synproxy.config.load import Config
from ipvs_synproxy.config.state import ServiceState, XdpAttachment
from ipvs_synproxy.kernel.model import (
    IP_VS_SVC_F_ONEPACKET,
    IP_VS_SVC_F_SCHED1,
    IP_VS_SVC_F_SCHED2,
    IP_VS_SVC_F_SCHED3,
    Dest,
    Family,
    FwdMethod,
    IPAddress,
    Laddr,
    ProxyProtocol,
    Service,
    TunnelType,
)

TEMPLATE = "keepalived.conf.j2"

_METHODS = {FwdMethod.MASQ: "NAT", FwdMethod.ROUTE: "DR", FwdMethod.TUNNEL: "TUN",
            FwdMethod.FULLNAT: "FNAT"}
_FLAGS = ((IP_VS_SVC_F_SCHED1, "flag-1"), (IP_VS_SVC_F_SCHED2, "flag-2"),
          (IP_VS_SVC_F_SCHED3, "flag-3"))


def templates_dir() -> Path:
    return Path(__file__).with_name("templates")


def _seconds(value: float) -> str:
    return f"{value:g}"


def _method(d: Dest | None, default: FwdMethod) -> str:
    fwd = d.fwd if d is not None else default
    text = _METHODS[fwd]
    if d is not None and fwd is FwdMethod.TUNNEL and d.tun_type is not TunnelType.IPIP:
        text += f" type {d.tun_type.name.lower()}"
        if d.tun_type is TunnelType.GUE:
            text += f" port {d.tun_port}"
    return text


def _proxy_protocol(d: Dest) -> str | None:
    """The real server's ``proxy_protocol`` keyword (``v1``, ``v2``), or None
    when off. Written per real server, the service's default already applied
    by the loader; off needs no keyword (keepalived's default)."""
    if d.proxy_protocol is ProxyProtocol.OFF:
        return None
    return str(d.proxy_protocol)


def laddr_group_name(svc: Service) -> str:
    """A stable keepalived name for a service's laddr pool."""
    if svc.fwmark:
        return f"laddr_fwmark_{svc.fwmark}_{'ipv6' if svc.af == Family.INET6 else 'ipv4'}"
    text = str(svc.addr).replace(".", "_").replace(":", "_")
    return f"laddr_{svc.protocol.value}_{text}_{svc.port}"


def laddr_entries(laddrs: Sequence[Laddr]) -> list[str]:
    """The pool as keepalived lines, runs of consecutive addresses that differ
    only in the last byte (IPv4) or 16 bits (IPv6) written as ranges
    (``192.0.2.100-103``, ``2001:db8::100-103``), in the file's order."""
    out: list[str] = []
    runs: list[list[IPAddress]] = []
    for la in laddrs:
        a = la.addr
        low_bits = 8 if a.version == 4 else 16
        if runs:
            prev = runs[-1][-1]
            if (prev.version == a.version and int(a) == int(prev) + 1
                    and int(a) >> low_bits == int(prev) >> low_bits):
                runs[-1].append(a)
                continue
        runs.append([a])
    for run in runs:
        first, last = run[0], run[-1]
        if first == last:
            out.append(str(first))
        elif first.version == 4:
            out.append(f"{first}-{int(last) & 0xFF}")
        else:
            out.append(f"{first}-{int(last) & 0xFFFF:x}")
    return out


def _check(c: HealthCheck, d: Dest) -> dict[str, Any] | None:
    if c.kind == "none":
        return None
    out: dict[str, Any] = {
        "kind": c.kind, "timeout": _seconds(c.timeout), "retry": c.retry,
        "delay_before_retry": _seconds(c.delay_before_retry),
        "interval": _seconds(c.interval), "port": c.port, "path": c.path,
        "status_code": c.status_code, "command": None,
    }
    if c.command is not None:
        out["command"] = c.command.replace("{addr}", str(d.addr)).replace(
            "{port}", str(d.port))
    return out


def _virtual_server(st: ServiceState, check: HealthCheck, default_fwd: FwdMethod
                    ) -> dict[str, Any]:
    svc = st.service
    v6 = svc.af == Family.INET6
    granularity = None
    if svc.netmask is not None:
        granularity = (str(svc.netmask) if v6 else
                       str(ipaddress.IPv4Network(f"0.0.0.0/{svc.netmask}").netmask))
    return {
        "head": f"fwmark {svc.fwmark}" if svc.fwmark else f"{svc.addr} {svc.port}",
        "ip_family": "inet6" if svc.fwmark and v6 else None,
        "protocol": None if svc.fwmark else svc.protocol.value.upper(),
        "scheduler": svc.scheduler,
        "flags": (["ops"] if svc.flags & IP_VS_SVC_F_ONEPACKET else [])
        + [name for bit, name in _FLAGS if svc.flags & bit],
        "method": _method(None, default_fwd),
        "syn_proxy": svc.synproxy,
        "laddr_group": laddr_group_name(svc) if st.laddrs else None,
        "persistence_timeout": svc.persistent or None,
        "persistence_granularity": granularity,
        "persistence_engine": svc.pe_name,
        "delay_loop": _seconds(check.interval),
        "inhibit_on_failure": check.inhibit_on_failure,
        "real_servers": [
            {"head": f"{d.addr} {d.port}" if d.port else str(d.addr),
             "weight": d.weight, "method": _method(d, default_fwd),
             "proxy_protocol": _proxy_protocol(d),
             "uthreshold": d.u_thresh, "lthreshold": d.l_thresh,
             "check": _check(check, d)}
            for d in st.dests],
    }


def xdp_scripts(cfg: Config) -> dict[str, dict[str, str]]:
    """VRRP instance name -> its ``attach`` and ``detach`` command lines for
    the XDP fast path of the file's ``xdp:`` interfaces: the first instance
    on an interface attaches the program there when it becomes master
    (``notify_master``) and takes it off when it becomes backup or faulty
    (``notify_backup``, ``notify_fault``); keepalived's ``shutdown_script``
    takes them all off (:func:`xdp_shutdown`). Each attach reads the table
    afresh and sets the cookie secret in the module and the program: the
    file's (``cookie_secret_file``), or a new random one."""
    ka = cfg.keepalived or KeepalivedSettings()
    out: dict[str, dict[str, str]] = {}
    for a in cfg.xdp:
        vi = next((vi for vi in ka.vrrp if vi.interface == a.dev), None)
        if vi is not None:
            out[vi.name] = _xdp_commands(ka.xdp_command, a, cfg.secret_file)
    return out


def xdp_shutdown(cfg: Config, scripts: dict[str, dict[str, str]]) -> str | None:
    """The ``shutdown_script`` that detaches every program the instances
    attach, once keepalived has stopped (and removed its services): unlike
    ``notify_stop``, which keepalived kills after a second, it has ten."""
    ka = cfg.keepalived or KeepalivedSettings()
    devs = [vi.interface for vi in ka.vrrp if vi.name in scripts]
    return f"{ka.xdp_command} xdp detach {' '.join(devs)}" if devs else None


def _xdp_commands(command: str, a: XdpAttachment, secret_file: str | None
                  ) -> dict[str, str]:
    attach = f"{command} xdp attach {a.dev} --mode {a.mode}"
    if secret_file is not None:
        attach += f" --secret-file {secret_file}"
    return {"attach": attach, "detach": f"{command} xdp detach {a.dev}"}


def _vrrp(vi: VrrpInstance, xdp: dict[str, str] | None = None) -> dict[str, Any]:
    return {"name": vi.name, "state": vi.state, "interface": vi.interface, "xdp": xdp,
            "virtual_router_id": vi.virtual_router_id, "priority": vi.priority,
            "advert_int": vi.advert_int, "preempt": vi.preempt, "auth_pass": vi.auth_pass,
            "unicast_src_ip": vi.unicast_src_ip, "unicast_peers": list(vi.unicast_peers),
            # keepalived wants one family in virtual_ipaddress (the first VIP's);
            # the other family's VIPs move with it as "excluded" addresses
            "vips": [str(v) for v in vi.vips if v.version == vi.vips[0].version],
            "vips_excluded": [str(v) for v in vi.vips if v.version != vi.vips[0].version]}


def _default_fwd(st: ServiceState) -> FwdMethod:
    """The service's method for the virtual_server block: that of its real
    servers when they agree, else NAT (each real server names its own)."""
    methods = {d.fwd for d in st.dests}
    return methods.pop() if len(methods) == 1 else FwdMethod.MASQ


def context(cfg: Config) -> dict[str, Any]:
    """What the template needs; raises the first of ``cfg``'s keepalived problems."""
    ka = cfg.keepalived or KeepalivedSettings()
    if ka.problems:
        raise ka.problems[0]
    services = cfg.state.services
    checks = ka.checks or tuple(HealthCheck() for _ in services)
    scripts = xdp_scripts(cfg)
    return {
        "source": os.path.basename(cfg.path),
        "router_id": ka.router_id,
        "script_security": any(c.kind == "misc" for c in checks) or bool(scripts),
        "xdp_shutdown": xdp_shutdown(cfg, scripts),
        "vrrp": [_vrrp(vi, scripts.get(vi.name)) for vi in ka.vrrp],
        "pair": None if ka.pair is None else {
            "interface": ka.pair.sync_interface, "instance": ka.pair.sync_instance,
            "syncid": ka.pair.syncid, "group": ka.pair.sync_group,
            "members": [vi.name for vi in ka.vrrp]},
        "laddr_groups": [{"name": laddr_group_name(st.service),
                          "entries": laddr_entries(st.laddrs)}
                         for st in services if st.laddrs],
        "virtual_servers": [_virtual_server(st, c, _default_fwd(st))
                            for st, c in zip(services, checks, strict=True)],
    }


def environment(directory: Path | None = None) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(directory or templates_dir())),
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
        keep_trailing_newline=True, autoescape=False,
    )


def render(cfg: Config, directory: Path | None = None) -> str:
    """keepalived.conf for ``cfg``; raises :class:`config.ConfigError` when the
    config says something keepalived.conf cannot express."""
    return environment(directory).get_template(TEMPLATE).render(context(cfg))

