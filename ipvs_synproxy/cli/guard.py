"""What keeps ``apply`` from hurting a production balancer.

* one apply (or restore) at a time: an exclusive lock in the state directory,
  and a clear error naming the holder for the second;
* before every change the live table is saved there: the state the plan was
  computed from (every service, real server and laddr, and the sysctls the
  file names) as JSON, which ``ipvs-synproxy restore`` puts back, and the
  table as ``ipvsadm -S -n`` prints it, for people and ``ipvsadm-sp -R``
  (like ipvsadm's, it leaves out real-server thresholds); the newest
  :data:`KEEP` are kept;
* every applied change goes to syslog (the journal), one line each.

The state directory is /var/lib/ipvs-synproxy for root, else
$XDG_STATE_HOME/ipvs-synproxy (~/.local/state); ``--state-dir`` or
IPVS_SYNPROXY_STATE_DIR override it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import fcntl
import ipaddress
import json
import os
import syslog
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ipvs_synproxy.adm import listing
from ipvs_synproxy.adm.command import Format
from ipvs_synproxy.config.state import ServiceState, State
from ipvs_synproxy.kernel.model import (
    Dest,
    Family,
    FwdMethod,
    Laddr,
    ModelError,
    Protocol,
    ProxyProtocol,
    Service,
    TunnelType,
)

KEEP = 20
DUMP_SUFFIX = ".ipvsadm"
STATE_SUFFIX = ".json"
_T = TypeVar("_T")


class GuardError(Exception):
    """The lock is held, or the state directory or a saved state is unusable."""


def state_dir(override: str | None = None) -> Path:
    if override:
        return Path(override)
    env = os.environ.get("IPVS_SYNPROXY_STATE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/ipvs-synproxy")
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".local" / "state"
    return base / "ipvs-synproxy"


def _ensure(directory: Path) -> None:
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise GuardError(f"cannot create the state directory {directory}: "
                         f"{exc.strerror or exc}") from None


@contextlib.contextmanager
def exclusive(directory: Path, what: str) -> Iterator[None]:
    """Hold the apply lock of ``directory`` for the block, or fail at once."""
    _ensure(directory)
    path = directory / "apply.lock"
    try:
        f = open(path, "a+", encoding="ascii")  # noqa: SIM115 - held for the block
    except OSError as exc:
        raise GuardError(f"cannot open the lock {path}: {exc.strerror or exc}") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise GuardError(f"another apply or restore is running ({holder}; lock "
                             f"{path}): nothing was changed; try again when it ends"
                             ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}, {what}")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()


@dataclass(frozen=True)
class Saved:
    dump: Path      # for people and ``ipvsadm-sp -R`` (like ipvsadm's, it lacks -x/-y)
    state: Path     # everything restore needs: every service, real server, laddr, sysctl

    @property
    def name(self) -> str:
        return self.state.name[:-len(STATE_SUFFIX)]


def dump(state: State) -> str:
    """``state``'s table as ``ipvsadm -S -n`` prints it (laddrs included)."""
    return listing.format_table(None, [(s.service, s.dests, s.laddrs) for s in state.services],
                                Format(numeric=True, rule=True))


# ---- the state file: the model's comparable fields, enums by value ----------

_DECODE: dict[str, Callable[[Any], Any]] = {
    "protocol": Protocol, "fwmark_af": Family, "fwd": FwdMethod, "tun_type": TunnelType,
    "proxy_protocol": ProxyProtocol,
    "addr": lambda v: None if v is None else ipaddress.ip_address(v),
}


def _encode(item: Service | Dest | Laddr) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(item):
        if not f.compare:       # counters and statistics
            continue
        v = getattr(item, f.name)
        out[f.name] = v.value if isinstance(v, enum.Enum) else \
            str(v) if isinstance(v, ipaddress.IPv4Address | ipaddress.IPv6Address) else v
    return out


def _decode(cls: type[_T], raw: object, where: str) -> _T:
    if not isinstance(raw, dict):
        raise GuardError(f"{where}: expected an object, got {type(raw).__name__}")
    names = {f.name for f in dataclasses.fields(cls) if f.compare}  # type: ignore[arg-type]
    if set(raw) - names:
        raise GuardError(f"{where}: unknown fields {sorted(set(raw) - names)}")
    try:
        return cls(**{k: _DECODE.get(k, lambda x: x)(v) for k, v in raw.items()})
    except (TypeError, ValueError, ModelError) as exc:
        raise GuardError(f"{where}: {exc}") from None


def encode_state(state: State) -> dict[str, Any]:
    return {"format": 1,
            "services": [{"service": _encode(s.service),
                          "dests": [_encode(d) for d in s.dests],
                          "laddrs": [_encode(a) for a in s.laddrs]} for s in state.services],
            "sysctls": {k: None if v is None else list(v) for k, v in state.sysctls.items()}}


def _list(raw: object, where: str) -> list[Any]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise GuardError(f"{where}: expected a list, got {type(raw).__name__}")
    return raw


def decode_state(raw: object, where: str) -> State:
    if not isinstance(raw, dict) or raw.get("format") != 1:
        raise GuardError(f"{where}: not a saved state of this version (format 1)")
    services = []
    for i, s in enumerate(_list(raw.get("services"), f"{where}: services")):
        at = f"{where}: services[{i}]"
        if not isinstance(s, dict):
            raise GuardError(f"{at}: expected an object")
        dests = _list(s.get("dests"), f"{at}.dests")
        laddrs = _list(s.get("laddrs"), f"{at}.laddrs")
        services.append(ServiceState(
            _decode(Service, s.get("service"), at),
            tuple(_decode(Dest, d, f"{at}.dests[{j}]") for j, d in enumerate(dests)),
            tuple(_decode(Laddr, a, f"{at}.laddrs[{j}]") for j, a in enumerate(laddrs))))
    knobs = raw.get("sysctls") or {}
    if not isinstance(knobs, dict) or not all(
            isinstance(k, str) and (v is None or (isinstance(v, list) and all(
                isinstance(i, int) and not isinstance(i, bool) for i in v)))
            for k, v in knobs.items()):
        raise GuardError(f"{where}: sysctls: not a mapping of names to lists of integers")
    return State(tuple(services), {k: None if v is None else tuple(v) for k, v in knobs.items()})


def save(directory: Path, live: State) -> Saved:
    """Write ``live`` (the state file, and the table as a ``-S`` dump) to
    ``directory``; drop all but the newest :data:`KEEP` saved states."""
    _ensure(directory)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f".{time.time_ns() % 10**9:09d}"
    saved = Saved(directory / f"{stamp}{DUMP_SUFFIX}", directory / f"{stamp}{STATE_SUFFIX}")
    try:
        saved.dump.write_text(dump(live))
        saved.state.write_text(json.dumps(encode_state(live), indent=1) + "\n")
    except OSError as exc:
        raise GuardError(f"saving the live table to {directory}: "
                         f"{exc.strerror or exc}") from None
    for old in saved_states(directory)[KEEP:]:
        for p in (old.dump, old.state):
            p.unlink(missing_ok=True)
    return saved


def saved_states(directory: Path) -> list[Saved]:
    """The saved states of ``directory``, newest first."""
    states = sorted(directory.glob(f"*{STATE_SUFFIX}"), reverse=True) \
        if directory.is_dir() else []
    return [Saved(s.with_name(s.name[:-len(STATE_SUFFIX)] + DUMP_SUFFIX), s) for s in states]


def read_saved(saved: Saved) -> State:
    """The table and sysctls of a saved state, every field checked."""
    try:
        raw = json.loads(saved.state.read_text())
    except (OSError, ValueError) as exc:
        raise GuardError(f"cannot read {saved.state}: {exc}") from None
    return decode_state(raw, str(saved.state))


def log_changes(lines: Iterable[str], prefix: str) -> None:
    """One syslog line per applied change (journald keeps them)."""
    syslog.openlog("ipvs-synproxy", syslog.LOG_PID, syslog.LOG_DAEMON)
    try:
        for line in lines:
            syslog.syslog(syslog.LOG_NOTICE, f"{prefix}: {line}")
    finally:
        syslog.closelog()
