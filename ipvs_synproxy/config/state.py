"""An IPVS table and its sysctls, and the XDP fast path of an interface, as the
config file wants them or the kernel has them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ipvs_synproxy.kernel import sysctl as sysctl_mod
from ipvs_synproxy.kernel.model import Dest, Laddr, Service


@dataclass(frozen=True)
class ServiceState:
    """A service with its real servers and laddr pool."""

    service: Service
    dests: tuple[Dest, ...] = ()
    laddrs: tuple[Laddr, ...] = ()


@dataclass(frozen=True)
class State:
    """An IPVS table plus sysctl values (None: the knob is absent)."""

    services: tuple[ServiceState, ...] = ()
    sysctls: Mapping[str, sysctl_mod.Value | None] = field(default_factory=dict)


@dataclass(frozen=True)
class XdpAttachment:
    """The XDP fast path on an interface. As the file wants it, ``mode`` is
    ``auto``, ``native`` or ``generic``; as the namespace has it (a program
    of ours pinned for ``dev``), ``native``, ``generic``, ``offload``,
    ``unknown`` or ``detached`` (pinned, but on no device)."""

    dev: str
    mode: str = "auto"
