"""An IPVS table and its sysctls, as the config file wants it or the kernel has it."""

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
