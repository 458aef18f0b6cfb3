"""An in-memory stand-in for :class:`ipvs_synproxy.kernel.netlink.IPVS` and the sysctls,
strict like the kernel (adding what exists or removing what does not fails),
with a switch to make one chosen operation fail.

A SYN-proxy service has per-service counters (``Service.sp_stats`` as
:meth:`FakeKernel.services` lists it, kernel 0028): all zero from when the SYN
proxy is first on, kept when it is turned off again, gone with the service,
moved by :meth:`FakeKernel.bump_sp_stats`; ``has_sp_stats=False`` is a kernel
without them (every ``sp_stats`` None). :meth:`FakeKernel.state` leaves them out."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ipvs_synproxy.config.state import ServiceState, State
from ipvs_synproxy.exporter.series import SERVICE_EXT
from ipvs_synproxy.kernel import netlink
from ipvs_synproxy.kernel import sysctl as sysctl_mod
from ipvs_synproxy.kernel.model import Dest, IPAddress, Laddr, Service, SyncDaemon


@dataclass
class FakeKernel:
    services_: dict[object, Service] = field(default_factory=dict)
    dests_: dict[object, list[Dest]] = field(default_factory=dict)
    laddrs_: dict[object, list[Laddr]] = field(default_factory=dict)
    knobs: dict[str, sysctl_mod.Value] = field(default_factory=dict)
    fail_on: str | None = None  # "add_service:<svc>" / "write_sysctl:<name>" / ...
    calls: list[str] = field(default_factory=list)
    has_laddr: bool = True
    has_secret: bool = False
    secret: bytes | None = None
    netns: str | None = None
    has_sp_stats: bool = True
    sp_stats_: dict[object, dict[str, int]] = field(default_factory=dict)
    daemons_: list[SyncDaemon] = field(default_factory=list)

    # -- construction

    @classmethod
    def from_state(cls, state: State, **kw: object) -> FakeKernel:
        k = cls(**kw)  # type: ignore[arg-type]
        for st in state.services:
            key = st.service.key()
            k.services_[key] = st.service
            if st.service.sp_stats is not None:
                k.sp_stats_[key] = dict(st.service.sp_stats)
            k.dests_[key] = list(st.dests)
            k.laddrs_[key] = list(st.laddrs)
        k.knobs = {n: v for n, v in state.sysctls.items() if v is not None}
        return k

    def state(self) -> State:
        return State(tuple(ServiceState(s, tuple(self.dests_[k]), tuple(self.laddrs_[k]))
                           for k, s in self.services_.items()), dict(self.knobs))

    def _call(self, what: str) -> None:
        self.calls.append(what)
        if self.fail_on is not None and what == self.fail_on:
            raise netlink.InvalidRequest(f"{what}: injected failure")

    def _svc(self, svc: Service) -> object:
        key = svc.key()
        if key not in self.services_:
            raise netlink.ServiceNotFound(f"service {svc} does not exist")
        return key

    # -- IPVS

    def __enter__(self) -> FakeKernel:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def close(self) -> None:
        pass

    def supports(self, cmd: int) -> bool:
        if cmd in (netlink.IPVS_CMD_NEW_LADDR, netlink.IPVS_CMD_GET_LADDR):
            return self.has_laddr
        if cmd == netlink.IPVS_CMD_SET_SYNPROXY_SECRET:
            return self.has_secret
        return cmd == netlink.IPVS_CMD_GET_EXT_STATS

    def services(self) -> list[Service]:
        out = []
        for key, svc in self.services_.items():
            if svc.synproxy:  # the kernel allocates them when the flag goes on
                self.sp_stats_.setdefault(key, dict.fromkeys(SERVICE_EXT, 0))
            sp = self.sp_stats_.get(key) if self.has_sp_stats else None
            out.append(dataclasses.replace(svc, sp_stats=dict(sp) if sp is not None else None)
                       if sp is not None or svc.sp_stats is not None else svc)
        return out

    def bump_sp_stats(self, svc: Service, **counts: int) -> None:
        """Move a service's SYN-proxy counters by ``counts`` (by their ext names), as
        the kernel's datapath would."""
        stats = self.sp_stats_.setdefault(self._svc(svc), dict.fromkeys(SERVICE_EXT, 0))
        for name, n in counts.items():
            if name not in stats:
                raise KeyError(f"no per-service counter {name!r}")
            stats[name] += n

    def dests(self, svc: Service) -> list[Dest]:
        return list(self.dests_[self._svc(svc)])

    def laddrs(self, svc: Service) -> list[Laddr]:
        return list(self.laddrs_[self._svc(svc)])

    def ext_stats(self) -> dict[str, int]:
        return {"fullnat_conn_new": 7, "fullnat_no_laddr": 0}

    def daemons(self) -> list[SyncDaemon]:
        return list(self.daemons_)

    def add_service(self, svc: Service) -> None:
        self._call(f"add_service:{svc}")
        if svc.key() in self.services_:
            raise netlink.AlreadyExists(f"service {svc} already exists")
        self.services_[svc.key()] = svc
        self.dests_[svc.key()] = []
        self.laddrs_[svc.key()] = []

    def edit_service(self, svc: Service) -> None:
        self._call(f"edit_service:{svc}")
        self.services_[self._svc(svc)] = svc

    def del_service(self, svc: Service) -> None:
        self._call(f"del_service:{svc}")
        key = self._svc(svc)
        del self.services_[key], self.dests_[key], self.laddrs_[key]
        self.sp_stats_.pop(key, None)

    def _find(self, svc: Service, dest: Dest) -> tuple[list[Dest], int | None]:
        lst = self.dests_[self._svc(svc)]
        for i, d in enumerate(lst):
            if (d.addr, d.port) == (dest.addr, dest.port):
                return lst, i
        return lst, None

    def add_dest(self, svc: Service, dest: Dest) -> None:
        self._call(f"add_dest:{svc}:{dest}")
        lst, i = self._find(svc, dest)
        if i is not None:
            raise netlink.AlreadyExists(f"real server {dest} already exists")
        lst.append(dest)

    def edit_dest(self, svc: Service, dest: Dest) -> None:
        self._call(f"edit_dest:{svc}:{dest}")
        lst, i = self._find(svc, dest)
        if i is None:
            raise netlink.DestNotFound(f"real server {dest} does not exist")
        lst[i] = dest

    def del_dest(self, svc: Service, dest: Dest) -> None:
        self._call(f"del_dest:{svc}:{dest}")
        lst, i = self._find(svc, dest)
        if i is None:
            raise netlink.DestNotFound(f"real server {dest} does not exist")
        del lst[i]

    def add_laddr(self, svc: Service, addr: IPAddress) -> None:
        self._call(f"add_laddr:{svc}:{addr}")
        lst = self.laddrs_[self._svc(svc)]
        if any(la.addr == addr for la in lst):
            raise netlink.AlreadyExists(f"laddr {addr} already exists")
        lst.append(Laddr(addr))

    def del_laddr(self, svc: Service, addr: IPAddress) -> None:
        self._call(f"del_laddr:{svc}:{addr}")
        lst = self.laddrs_[self._svc(svc)]
        if not any(la.addr == addr for la in lst):
            raise netlink.LaddrNotFound(f"laddr {addr} does not exist")
        lst[:] = [la for la in lst if la.addr != addr]

    def set_synproxy_secret(self, secret: bytes) -> None:
        self._call("set_synproxy_secret")
        self.secret = secret

    # -- sysctls (Target.write_sysctl and the Sysctls reader)

    def write_sysctl(self, name: str, value: sysctl_mod.Value) -> None:
        self._call(f"write_sysctl:{name}")
        if name not in self.knobs:
            raise sysctl_mod.SysctlMissing(name, "not present")
        self.knobs[name] = value

    def read(self, name: str) -> sysctl_mod.Value:
        if name not in self.knobs:
            raise sysctl_mod.SysctlMissing(name, "not present")
        return self.knobs[name]

    def write(self, name: str, value: sysctl_mod.Value) -> None:
        self.write_sysctl(name, value)
