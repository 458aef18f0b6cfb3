"""Diff the file against the kernel, and apply the difference with rollback.

:func:`diff` is a pure function from two :class:`State` values to an ordered
list of :class:`Change`; :func:`apply_changes` executes them one by one against
a :class:`Target` and, when one fails, undoes the ones already done in reverse
order (:func:`rollback_plan`), restoring the exact previous objects and
sysctl values. Only what differs is touched: an edit is an edit, never a
delete and re-add, so live connections keep their real server.

The file's ``xdp:`` interfaces are diffed against the programs of ours in
the namespace (:func:`diff_xdp`) and follow the table's changes: attached
where missing, re-attached on a mode change, detached where no longer
listed (:mod:`~ipvs_synproxy.config.fastpath` does it).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from typing import Protocol as Interface

from ipvs_synproxy.config import fastpath
from ipvs_synproxy.config.load import Config
from ipvs_synproxy.config.state import ServiceState, State, XdpAttachment
from ipvs_synproxy.kernel import netlink, xdp
from ipvs_synproxy.kernel import sysctl as sysctl_mod
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
    format_endpoint,
)

# ---- changes ----------------------------------------------------------------------------


class Op(enum.Enum):
    ADD = "add"
    EDIT = "edit"
    DELETE = "delete"


@dataclass(frozen=True)
class Setting:
    """A sysctl and its value (None: the knob is absent)."""

    name: str
    value: sysctl_mod.Value | None


Item = Service | Dest | Laddr | Setting | XdpAttachment


@dataclass(frozen=True)
class Change:
    """One kernel operation. ``service`` is the service a dest/laddr belongs to
    (for a service change, the service itself as identified to the kernel)."""

    op: Op
    old: Item | None
    new: Item | None
    service: Service | None = None

    @property
    def kind(self) -> str:
        item = self.new if self.new is not None else self.old
        return {Service: "service", Dest: "dest", Laddr: "laddr",
                Setting: "sysctl", XdpAttachment: "xdp"}[type(item)]

    def inverse(self) -> Change:
        op = {Op.ADD: Op.DELETE, Op.DELETE: Op.ADD, Op.EDIT: Op.EDIT}[self.op]
        return Change(op, self.new, self.old, self.service)


def _index(services: Iterable[ServiceState]) -> dict[Any, ServiceState]:
    return {s.service.key(): s for s in services}


def diff(current: State, desired: State) -> list[Change]:
    """The changes, in the order to apply them, that turn ``current`` into
    ``desired``: sysctls; the deletion of services no longer wanted (their real
    servers and laddrs first, so that every step has an exact inverse); then,
    per desired service in order, its addition or edit, laddr additions,
    real-server edits and additions, and only then real-server and laddr
    deletions (a service never runs short of real servers in between). Only
    the sysctls ``desired`` names are managed; the IPVS table is managed whole."""
    changes: list[Change] = []
    for name in sorted(desired.sysctls):
        want = desired.sysctls[name]
        have = current.sysctls.get(name)
        if want is not None and have != want:
            changes.append(Change(Op.EDIT, Setting(name, have), Setting(name, want)))
    wanted = _index(desired.services)
    for st in current.services:
        if st.service.key() not in wanted:
            changes += [Change(Op.DELETE, d, None, st.service) for d in st.dests]
            changes += [Change(Op.DELETE, la, None, st.service) for la in st.laddrs]
            changes.append(Change(Op.DELETE, st.service, None, st.service))
    cur = _index(current.services)
    for st in desired.services:
        svc = st.service
        old = cur.get(svc.key())
        if old is None:
            changes.append(Change(Op.ADD, None, svc, svc))
            changes += [Change(Op.ADD, None, la, svc) for la in st.laddrs]
            changes += [Change(Op.ADD, None, d, svc) for d in st.dests]
            continue
        if old.service != svc:
            changes.append(Change(Op.EDIT, old.service, svc, svc))
        old_laddrs = {la.addr: la for la in old.laddrs}
        new_laddrs = {la.addr for la in st.laddrs}
        changes += [Change(Op.ADD, None, la, svc) for la in st.laddrs
                    if la.addr not in old_laddrs]
        old_dests = {(d.addr, d.port): d for d in old.dests}
        adds = []
        for d in st.dests:
            prev = old_dests.get((d.addr, d.port))
            if prev is None:
                adds.append(Change(Op.ADD, None, d, svc))
            elif prev != d:
                changes.append(Change(Op.EDIT, prev, d, svc))
        changes += adds
        new_dests = {(d.addr, d.port) for d in st.dests}
        changes += [Change(Op.DELETE, d, None, svc) for d in old.dests
                    if (d.addr, d.port) not in new_dests]
        changes += [Change(Op.DELETE, la, None, svc) for la in old.laddrs
                    if la.addr not in new_laddrs]
    return changes


def diff_xdp(current: Mapping[str, str], desired: Sequence[XdpAttachment]) -> list[Change]:
    """The XDP changes that turn ``current`` (device -> mode of our programs,
    :func:`fastpath.read_attachments`) into ``desired``, in the file's order:
    an attach where none of ours runs, a re-attach where the mode differs (an
    attachment in either mode is what auto asks for); then, last, the detach
    of every program of ours the file no longer lists (undoing a detach
    needs a secret that only an attach sets)."""
    changes: list[Change] = []
    for want in desired:
        have = current.get(want.dev, fastpath.DETACHED)
        if have == fastpath.DETACHED:
            changes.append(Change(Op.ADD, None, want))
        elif not fastpath.satisfies(have, want.mode):
            changes.append(Change(Op.EDIT, XdpAttachment(want.dev, have), want))
    listed = {want.dev for want in desired}
    changes += [Change(Op.DELETE, XdpAttachment(dev, mode), None)
                for dev, mode in sorted(current.items()) if dev not in listed]
    return changes


def rollback_plan(done: Sequence[Change]) -> list[Change]:
    """What undoes ``done``: the inverse of each change, last first."""
    return [c.inverse() for c in reversed(done)]


def problems(current: State, desired: Config, caps: Mapping[str, bool]) -> list[str]:
    """What stops the config from being applied to this kernel at all (checked
    before anything is changed). ``caps``: ``laddr``, ``synproxy_secret``."""
    out = []
    for name in sorted(desired.state.sysctls):
        if current.sysctls.get(name) is None:
            knob = sysctl_mod.KNOBS.get(name)
            hint = f" (an {knob.origin} knob)" if knob and knob.origin != "stock" else ""
            out.append(f"sysctl {sysctl_mod.PREFIX}{name} is not present in this "
                       f"kernel{hint}")
    if not caps.get("laddr"):
        for st in desired.state.services:
            if st.laddrs:
                out.append(f"service {st.service} has laddrs, but the loaded IPVS "
                           "modules do not support laddr pools (load the ipvs-synproxy "
                           "modules)")
    if desired.secret is not None and not caps.get("synproxy_secret"):
        out.append(f"cookie_secret_file {desired.secret_file}: NotSupported: the loaded "
                   "IPVS modules cannot set the SYN proxy secret (needs the "
                   "ipvs-synproxy modules with the SYN proxy)")
    return out


# ---- executing changes ------------------------------------------------------------------


class Target(Interface):
    """What :func:`apply_changes` drives: the netlink client and the sysctls."""

    def add_service(self, svc: Service) -> None: ...
    def edit_service(self, svc: Service) -> None: ...
    def del_service(self, svc: Service) -> None: ...
    def add_dest(self, svc: Service, dest: Dest) -> None: ...
    def edit_dest(self, svc: Service, dest: Dest) -> None: ...
    def del_dest(self, svc: Service, dest: Dest) -> None: ...
    def add_laddr(self, svc: Service, addr: IPAddress) -> None: ...
    def del_laddr(self, svc: Service, addr: IPAddress) -> None: ...
    def write_sysctl(self, name: str, value: sysctl_mod.Value) -> None: ...


class XdpTarget(Interface):
    """What executes the XDP changes (:class:`fastpath.KernelXdp`)."""

    def attach_xdp(self, dev: str, mode: str) -> None: ...
    def detach_xdp(self, dev: str) -> None: ...


def _execute_xdp(change: Change, target: XdpTarget | None) -> None:
    if target is None:
        raise AssertionError(f"an XDP change without an XDP target: {change}")
    if change.old is not None:
        assert isinstance(change.old, XdpAttachment)
        target.detach_xdp(change.old.dev)
    if change.new is None:
        return
    assert isinstance(change.new, XdpAttachment)
    try:
        target.attach_xdp(change.new.dev, change.new.mode)
    except Exception as exc:
        if change.old is None:
            raise
        raise xdp.XdpError(f"{exc} ({change.new.dev} is left without the XDP fast path: "
                           "SYNs go to the IPVS module)") from exc


def execute(change: Change, target: Target, xdp_target: XdpTarget | None = None) -> None:
    item = change.new if change.new is not None else change.old
    svc = change.service
    if isinstance(item, XdpAttachment):
        _execute_xdp(change, xdp_target)
        return
    if isinstance(item, Setting):
        assert isinstance(change.new, Setting)
        if change.new.value is None:
            raise sysctl_mod.SysctlError(item.name, "cannot restore an absent knob")
        target.write_sysctl(item.name, change.new.value)
        return
    assert svc is not None
    if isinstance(item, Service):
        {Op.ADD: target.add_service, Op.EDIT: target.edit_service,
         Op.DELETE: target.del_service}[change.op](item)
    elif isinstance(item, Dest):
        {Op.ADD: target.add_dest, Op.EDIT: target.edit_dest,
         Op.DELETE: target.del_dest}[change.op](svc, item)
    elif isinstance(item, Laddr):
        if change.op is Op.ADD:
            target.add_laddr(svc, item.addr)
        elif change.op is Op.DELETE:
            target.del_laddr(svc, item.addr)
        else:  # laddrs have nothing to edit
            raise AssertionError(f"cannot edit a laddr: {change}")


@dataclass
class ApplyError(Exception):
    """A change failed (``failed``; None: setting the cookie secret after all
    changes); ``done`` were undone except those in ``rollback_errors``."""

    failed: Change | None
    error: Exception
    done: list[Change]
    rollback_errors: list[tuple[Change, Exception]]

    def __str__(self) -> str:
        what = describe(self.failed) if self.failed else "setting the SYN proxy secret"
        lines = [f"failed: {what}: {self.error}"]
        if not self.done:
            lines.append("nothing had been changed")
        elif not self.rollback_errors:
            lines.append(f"rolled back the {len(self.done)} change(s) already made; "
                         "the previous state is restored")
        else:
            lines.append(f"ROLLBACK INCOMPLETE: {len(self.rollback_errors)} of "
                         f"{len(self.done)} change(s) could not be undone:")
            lines += [f"  {describe(c)}: {e}" for c, e in self.rollback_errors]
        return "\n".join(lines)


def apply_changes(changes: Sequence[Change], target: Target,
                  after: Callable[[], None] | None = None,
                  xdp_target: XdpTarget | None = None) -> None:
    """Execute ``changes`` in order (the XDP ones on ``xdp_target``), then
    ``after`` (e.g. setting the secret); if anything fails, undo what was
    done and raise :class:`ApplyError`."""
    done: list[Change] = []
    failed: Change | None = None
    try:
        for c in changes:
            failed = c
            execute(c, target, xdp_target)
            done.append(c)
        failed = None
        if after is not None:
            after()
    except Exception as exc:
        errors: list[tuple[Change, Exception]] = []
        for undo in rollback_plan(done):
            try:
                execute(undo, target, xdp_target)
            except Exception as rexc:
                errors.append((undo, rexc))
        raise ApplyError(failed, exc, done, errors) from exc


# ---- presenting changes -----------------------------------------------------------------


def item_dict(item: Item | None) -> dict[str, Any] | None:
    """A JSON-friendly view of a service, real server, laddr or sysctl."""
    if item is None:
        return None
    if isinstance(item, XdpAttachment):
        return {"interface": item.dev, "mode": item.mode}
    if isinstance(item, Setting):
        value = None if item.value is None else " ".join(map(str, item.value))
        return {"name": f"{sysctl_mod.PREFIX}{item.name}", "value": value}
    if isinstance(item, Laddr):
        return {"addr": str(item.addr)}
    if isinstance(item, Dest):
        d: dict[str, Any] = {"addr": str(item.addr), "port": item.port,
                             "forward": item.fwd.name.lower(), "weight": item.weight,
                             "upper_threshold": item.u_thresh,
                             "lower_threshold": item.l_thresh}
        if item.fwd is FwdMethod.TUNNEL:
            d.update(tunnel_type=item.tun_type.name.lower(), tunnel_port=item.tun_port)
        if item.fwd is FwdMethod.FULLNAT or item.proxy_protocol is not ProxyProtocol.OFF:
            d.update(proxy_protocol=str(item.proxy_protocol))
        return d
    out: dict[str, Any] = {}
    if item.fwmark:
        out.update(fwmark=item.fwmark, family="ipv6" if item.af == Family.INET6 else "ipv4")
    else:
        out.update(protocol=item.protocol.value, vip=format_endpoint(item.addr, item.port))
    out.update(scheduler=item.scheduler, persistent=item.persistent, netmask=item.prefix,
               synproxy=item.synproxy, one_packet=bool(item.flags & IP_VS_SVC_F_ONEPACKET),
               scheduler_flags=[n for n, b in (("flag-1", IP_VS_SVC_F_SCHED1),
                                               ("flag-2", IP_VS_SVC_F_SCHED2),
                                               ("flag-3", IP_VS_SVC_F_SCHED3))
                                if item.flags & b],
               persistence_engine=item.pe_name)
    return out


def _what(item: Item, svc: Service | None) -> str:
    if isinstance(item, XdpAttachment):
        return f"xdp {item.dev}"
    if isinstance(item, Setting):
        return f"sysctl {sysctl_mod.PREFIX}{item.name}"
    if isinstance(item, Service):
        return f"service {item}"
    of = f" of {svc}" if svc is not None else ""
    if isinstance(item, Dest):
        return f"real server {item}{of}"
    return f"laddr {item.addr}{of}"


def _summary(item: Item) -> str:
    if isinstance(item, XdpAttachment):
        return item.mode
    if isinstance(item, Service):
        bits = [item.scheduler]
        if item.persistent:
            bits.append(f"persistent {item.persistent}")
        if item.synproxy:
            bits.append("synproxy")
        return ", ".join(bits)
    if isinstance(item, Dest):
        pp = item.proxy_protocol
        return f"{item.fwd.name.lower()}, weight {item.weight}" + (
            f", proxy protocol {pp}" if pp is not ProxyProtocol.OFF else "")
    return ""


def describe(c: Change) -> str:
    """One line: ``+ real server 192.0.2.11:80 of 198.51.100.10:80/tcp (masq, weight 1)``."""
    item = c.new if c.new is not None else c.old
    assert item is not None
    what = _what(item, c.service)
    if c.op is Op.ADD:
        extra = _summary(item)
        return f"+ {what}" + (f" ({extra})" if extra else "")
    if c.op is Op.DELETE:
        return f"- {what}"
    return f"~ {what}: {', '.join(edit_details(c))}"


def edit_details(c: Change) -> list[str]:
    old, new = item_dict(c.old), item_dict(c.new)
    if isinstance(c.new, Setting):
        assert old is not None and new is not None
        return [f"{old['value'] or '(absent)'} -> {new['value']}"]
    assert old is not None and new is not None
    return [f"{k} {_fmt(old.get(k))} -> {_fmt(new.get(k))}"
            for k in new if old.get(k) != new.get(k)]


def _fmt(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(map(str, v)) + "]"
    return str(v)


def change_dict(c: Change) -> dict[str, Any]:
    return {"op": c.op.value, "kind": c.kind,
            "service": str(c.service) if c.service is not None and c.kind != "service"
            else None,
            "old": item_dict(c.old), "new": item_dict(c.new), "text": describe(c)}


def counts(changes: Sequence[Change]) -> dict[str, int]:
    out = {op.value: 0 for op in Op}
    for c in changes:
        out[c.op.value] += 1
    return out


def format_changes(changes: Sequence[Change]) -> Iterator[str]:
    for c in changes:
        yield describe(c)
    n = counts(changes)
    if not changes:
        yield "no changes"
    else:
        yield (f"{len(changes)} change(s): {n['add']} to add, {n['edit']} to edit, "
               f"{n['delete']} to delete")


# ---- the live kernel --------------------------------------------------------------------


def read_state(ipvs: netlink.IPVS, sysctls: sysctl_mod.Sysctls,
               sysctl_names: Iterable[str]) -> State:
    """The kernel's table (with laddrs when the modules support them) and the
    values of the named sysctls (None for an absent knob)."""
    with_laddrs = ipvs.supports(netlink.IPVS_CMD_GET_LADDR)
    services = []
    for svc in ipvs.services():
        laddrs = tuple(ipvs.laddrs(svc)) if with_laddrs else ()
        services.append(ServiceState(svc, tuple(ipvs.dests(svc)), laddrs))
    values: dict[str, sysctl_mod.Value | None] = {}
    for name in sysctl_names:
        try:
            values[name] = sysctls.read(name)
        except sysctl_mod.SysctlMissing:
            values[name] = None
    return State(tuple(services), values)


def capabilities(ipvs: netlink.IPVS) -> dict[str, bool]:
    return {"laddr": ipvs.supports(netlink.IPVS_CMD_NEW_LADDR),
            "synproxy_secret": ipvs.supports(netlink.IPVS_CMD_SET_SYNPROXY_SECRET)}


class KernelTarget:
    """:class:`Target` over a netlink connection and the namespace's sysctls."""

    def __init__(self, ipvs: netlink.IPVS, sysctls: sysctl_mod.Sysctls) -> None:
        self.ipvs = ipvs
        self.sysctls = sysctls
        self.add_service = ipvs.add_service
        self.edit_service = ipvs.edit_service
        self.del_service = ipvs.del_service
        self.add_dest = ipvs.add_dest
        self.edit_dest = ipvs.edit_dest
        self.del_dest = ipvs.del_dest
        self.add_laddr = ipvs.add_laddr
        self.del_laddr = ipvs.del_laddr

    def write_sysctl(self, name: str, value: sysctl_mod.Value) -> None:
        self.sysctls.write(name, value)


@dataclass(frozen=True)
class Plan:
    config: Config
    current: State
    changes: list[Change]
    problems: list[str]

    def attaching(self) -> list[XdpAttachment]:
        """What the plan attaches (anew, or in another mode)."""
        return [c.new for c in self.changes if isinstance(c.new, XdpAttachment)]

    @property
    def new_secret(self) -> bool:
        """Whether applying sets a new random cookie secret: an XDP program
        is attached and the file names no secret (the module's cannot be
        read back to give to the program)."""
        return self.config.secret is None and bool(self.attaching())


def plan(cfg: Config, ipvs: netlink.IPVS, sysctls: sysctl_mod.Sysctls) -> Plan:
    current = read_state(ipvs, sysctls, cfg.state.sysctls)
    caps = capabilities(ipvs)
    xdp_now = fastpath.read_attachments(ipvs.netns)
    changes = diff(current, cfg.state) + diff_xdp(xdp_now, cfg.xdp)
    p = Plan(cfg, current, changes, problems(current, cfg, caps))
    p.problems.extend(fastpath.problems(ipvs.netns, p.attaching(), xdp_now,
                                        caps.get("synproxy_secret", False)))
    return p


MAX_DELETE_PERCENT = 50.0


def deletion_refusal(p: Plan, max_percent: float = MAX_DELETE_PERCENT) -> str | None:
    """Why applying ``p`` looks like a mistake rather than an intent: a file
    with no service at all (empty, truncated, the wrong one) facing a live
    table, or one that deletes more than ``max_percent`` of the live services
    (one deletion is always allowed). None when it may go ahead."""
    live = len(p.current.services)
    gone = sum(1 for c in p.changes if c.op is Op.DELETE and c.kind == "service")
    if not gone:
        return None
    if not p.config.state.services:
        return (f"{p.config.path} declares no service: applying it would delete all "
                f"{live} live service(s)")
    if gone > max(1.0, live * max_percent / 100):
        return (f"applying {p.config.path} would delete {gone} of the {live} live "
                f"services, more than {max_percent:g}%")
    return None


def _build_first(p: Plan, target: fastpath.KernelXdp) -> None:
    """The XDP program's object before anything changes: a build that fails
    (no clang, a broken source) stops the apply with nothing changed."""
    first = next((c for c in p.changes if isinstance(c.new, XdpAttachment)), None)
    if first is None:
        return
    try:
        target.obj()
    except Exception as exc:
        raise ApplyError(first, exc, [], []) from exc


def apply_plan(p: Plan, ipvs: netlink.IPVS, sysctls: sysctl_mod.Sysctls,
               build_xdp: Callable[[], Path] | None = None) -> None:
    """Apply ``p`` all or nothing (raises :class:`ApplyError`). The cookie
    secret, which cannot be read back, is set last so a failure leaves it
    alone; but when an XDP program is attached, the first attach sets it
    (the file's, or a new random one: :attr:`Plan.new_secret`), in the
    module and every program, before the program goes on. ``build_xdp``
    gives the program's object."""
    if p.problems:
        raise ValueError("refusing to apply a plan with problems")
    secret = p.config.secret
    on_xdp = fastpath.KernelXdp(ipvs, build_xdp,
                                fastpath.new_secret() if p.new_secret else secret)
    _build_first(p, on_xdp)

    def after() -> None:
        # xdp.set_secret: the module's and any attached XDP program's, one
        # path; not twice (an attach set it already)
        if secret is not None and on_xdp.module_holds != secret:
            xdp.set_secret(ipvs, secret)

    apply_changes(p.changes, KernelTarget(ipvs, sysctls), after, on_xdp)
    xdp.mirror(ipvs)
