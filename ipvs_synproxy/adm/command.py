"""What a parsed ipvsadm command line is: the command, its values, its output format.

Shared by :mod:`~ipvs_synproxy.adm.cmdline` (which makes these),
:mod:`~ipvs_synproxy.adm.listing` and :mod:`~ipvs_synproxy.adm.execute`
(which use them); the exit statuses and limits are ipvsadm 1.31's.
"""

from __future__ import annotations

from dataclasses import dataclass

from ipvs_synproxy.kernel.model import (
    IP_VS_SVC_F_SCHED1,
    IP_VS_SVC_F_SCHED2,
    IP_VS_SVC_F_SCHED3,
    Dest,
    IPAddress,
    Protocol,
    Service,
    SyncDaemon,
    Timeouts,
)

EXIT_OK = 0
EXIT_LIST_ERROR = 1  # ipvsadm: exit(1) when listing fails
EXIT_USAGE = 2
EXIT_KERNEL = 255  # ipvsadm: process_options() returned -1

MAX_TIMEOUT = 86400 * 31
DEFAULT_PERSISTENT_TIMEOUT = 360  # ipvsadm 1.31 -p without a value
DEFAULT_SCHEDULER = "wlc"
CONN_PROC_FILE = "/proc/net/ip_vs_conn"
IPVS_VERSION_TEXT = "1.31"

SCHED_FLAG_MASK = IP_VS_SVC_F_SCHED1 | IP_VS_SVC_F_SCHED2 | IP_VS_SVC_F_SCHED3
TUN_FLAG_NAMES = {0: "-c", 1: "+c", 2: "r+c"}
TUN_FLAG_OPTS = {0: "--tun-nocsum", 1: "--tun-csum", 2: "--tun-remcsum"}

# How ipvsadm's -S and error messages name a service's protocol.
PROTO_OPTION = {Protocol.TCP: "-t", Protocol.UDP: "-u", Protocol.SCTP: "--sctp-service"}


class AdmUsageError(Exception):
    """Bad command-line input: printed as is, exit status 2, nothing changed."""

    def __init__(self, message: str, *, try_help: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.try_help = try_help


@dataclass(frozen=True)
class Format:
    """How to print a listing (ipvsadm's FMT_* flags)."""

    numeric: bool = False
    rule: bool = False
    stats: bool = False
    rate: bool = False
    thresholds: bool = False
    persistent_conn: bool = False
    nosort: bool = False
    exact: bool = False
    tun_info: bool = False
    proxy_info: bool = False


@dataclass(frozen=True)
class AdmCommand:
    """One parsed command line."""

    command: str
    options: frozenset[str] = frozenset()
    fmt: Format = Format()
    service: Service | None = None
    dest: Dest | None = None
    timeouts: Timeouts | None = None
    laddr: IPAddress | None = None
    daemon_state: str | None = None
    daemon: SyncDaemon | None = None
