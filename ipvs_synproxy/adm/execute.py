"""ipvsadm compatibility: ``ipvs-synproxy adm …`` and ``ipvsadm-sp``.

Accepts upstream ipvsadm 1.31 syntax and semantics (the Debian 12 binary is the
reference) and prints its listing and save formats byte for byte, so that
scripts written against ipvsadm keep working. Three layers (one module each):

* :func:`parse` turns one command line into an :class:`AdmCommand` (model
  values + output format), checking options the way ipvsadm does: the first
  option is the command, every option at most once, the command/option
  table, then the per-command rules. Bad input raises :class:`AdmUsageError`
  (exit status 2) before anything touches the kernel.
* the ``format_*`` functions are pure: model values in, text out.
* :func:`run` executes a command through :class:`ipvs_synproxy.kernel.netlink.IPVS`.

Extensions (long options only, so no upstream option changes meaning):

* ``--fullnat``: FULLNAT forwarding for ``-a``/``-e`` (next to -g/-i/-m). Listed
  with Forward ``FullNat`` (Alibaba's spelling), saved as ``--fullnat``.
* ``--synproxy`` / ``--no-synproxy``: the SYN proxy service flag for ``-A``/``-E``.
  ``-L`` appends `` synproxy`` to the service line (after ``ops``); ``-S``
  appends `` --synproxy`` to the ``-A`` line.
* ``--laddr-add ADDR`` / ``--laddr-del ADDR`` (with ``-t|-u|-f``) and
  ``--laddr-list [-t|-u|-f …]``: FULLNAT local addresses. ``-S`` emits one
  ``--laddr-add ADDR -t VIP:PORT`` line per local address after the service's
  real servers, and ``-R`` reads all of it back.
* ``--proxy-protocol off|v1|v2`` for ``-a``/``-e`` of a FULLNAT real server of a
  TCP or fwmark service: the PROXY protocol header the real server gets first
  (docs/proxy-protocol.md). ``-e`` without it keeps the real server's current
  setting (so ``-e … -w 0`` to drain never strips the header a server
  requires). ``-S`` appends ``--proxy-protocol v1|v2`` to the ``-a`` line.
  ``-L`` keeps ipvsadm's columns; ``-L --proxy-info`` adds a ``Proxy`` column
  (off/v1/v2, n/a for other methods) after Forward (and TunnelInfo).

Known differences from ipvsadm 1.31: every usage error exits with status 2
(ipvsadm uses 255 for popt errors such as an unknown option or a missing
argument); ``-R`` checks every line before applying any (ipvsadm applies the
lines before a malformed one); a non-contiguous IPv4 persistence mask is
refused.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shlex
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TextIO, TypeVar

from ipvs_synproxy.adm import cmdline, listing
from ipvs_synproxy.adm.command import (
    CONN_PROC_FILE,
    EXIT_KERNEL,
    EXIT_LIST_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    IPVS_VERSION_TEXT,
    AdmCommand,
    AdmUsageError,
)
from ipvs_synproxy.kernel import xdp
from ipvs_synproxy.kernel.model import (
    Dest,
    FwdMethod,
    IPAddress,
    Laddr,
    Service,
    synproxy_dest_error,
)
from ipvs_synproxy.kernel.netlink import (
    IPVS,
    IPVS_CMD_GET_LADDR,
    IpvsUnavailable,
    NetlinkError,
    NotSupported,
)
from ipvs_synproxy.kernel.netns import socket_in

_T = TypeVar("_T")

# ---- running commands ---------------------------------------------------------------------

# ipvsadm's ipvs_strerror(): per operation first, then per errno.
_OP_ERRORS: dict[tuple[str, int], str] = {
    ("add-service", errno.EEXIST): "Service already exists",
    ("add-service", errno.ENOENT): "Scheduler or persistence engine not found",
    ("edit-service", errno.ESRCH): "No such service",
    ("edit-service", errno.ENOENT): "Scheduler or persistence engine not found",
    ("delete-service", errno.ESRCH): "No such service",
    ("zero", errno.ESRCH): "No such service",
    ("add-server", errno.ESRCH): "Service not defined",
    ("add-server", errno.EEXIST): "Destination already exists",
    ("edit-server", errno.ESRCH): "Service not defined",
    ("edit-server", errno.ENOENT): "No such destination",
    ("delete-server", errno.ESRCH): "Service not defined",
    ("delete-server", errno.ENOENT): "No such destination",
    ("list", errno.ESRCH): "No such service",
    ("list", errno.ENOENT): "No such service",
    ("laddr-add", errno.ESRCH): "Service not defined",
    ("laddr-add", errno.EEXIST): "Local address already exists",
    ("laddr-del", errno.ESRCH): "Service not defined",
    ("laddr-del", errno.ENOENT): "No such Local address",
    ("laddr-list", errno.ESRCH): "No such service",
    ("start-daemon", errno.EEXIST): "Daemon has already run",
    ("stop-daemon", errno.ESRCH): "No daemon is running",
}
_ERRNO_TEXT = {
    errno.EPERM: "Permission denied (you must be root)",
    errno.EINVAL: "Invalid operation.  Possibly wrong module version, address not "
                  "unicast, ...",
    errno.ENOPROTOOPT: "Protocol not available",
    errno.ENOMEM: "Memory allocation problem",
    errno.EOPNOTSUPP: "Operation not supported with IPv6",
    errno.EAFNOSUPPORT: "Operation not supported with specified address family",
    errno.EMSGSIZE: "Module is wrong version",
}


def _is_local_address(addr: IPAddress, ns: str | None) -> bool:
    """Whether addr is an address of network namespace ns (it can be bound)."""
    fam = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    sock = socket_in(ns, fam, socket.SOCK_DGRAM) if ns else socket.socket(fam, socket.SOCK_DGRAM)
    with sock as s:
        try:
            s.bind((str(addr), 0))
        except OSError:
            return False
    return True


def kernel_error_text(command: str, code: int) -> str:
    return _OP_ERRORS.get((command, code)) or _ERRNO_TEXT.get(code) or os.strerror(code)


@dataclass
class Io:
    """Where a command reads and writes; ``read_conn`` returns /proc/net/ip_vs_conn."""

    stdin: TextIO
    stdout: TextIO
    stderr: TextIO
    read_conn: Callable[[], str]


def _read_proc_conn() -> str:
    with open(CONN_PROC_FILE) as f:
        return f.read()


def usage_text(prog: str) -> str:
    return (
        f"{version_text()}"
        "Usage:\n"
        f"  {prog} -A|E virtual-service [-s scheduler] [-p [timeout]] [-M netmask] "
        "[--pe persistence_engine] [-b sched-flags] [--synproxy|--no-synproxy]\n"
        f"  {prog} -D virtual-service\n"
        f"  {prog} -C\n"
        f"  {prog} -R\n"
        f"  {prog} -S [-n]\n"
        f"  {prog} -a|e virtual-service -r server-address [options]\n"
        f"  {prog} -d virtual-service -r server-address\n"
        f"  {prog} -L|l [virtual-service] [options]\n"
        f"  {prog} -Z [virtual-service]\n"
        f"  {prog} --set tcp tcpfin udp\n"
        f"  {prog} --laddr-add|--laddr-del address virtual-service\n"
        f"  {prog} --laddr-list [virtual-service] [-n]\n"
        f"  {prog} -h\n\n"
        "Commands, virtual-service and options are those of ipvsadm 1.31 (man ipvsadm):\n"
        "  -A -E -D -C -R -S -a -e -d -L|-l -Z --set, -t -u --sctp-service -f [-6],\n"
        "  -s -p -M --pe -b -o -r -g -i -m -w -x -y --tun-type --tun-port --tun-nocsum\n"
        "  --tun-csum --tun-remcsum, -c -n --timeout --daemon --stats --rate --exact\n"
        "  --thresholds --persistent-conn --tun-info --sort --nosort.\n\n"
        "ipvs-synproxy extensions:\n"
        "  --fullnat                           FULLNAT forwarding (with -a/-e)\n"
        "  --synproxy / --no-synproxy          SYN proxy on/off (with -A/-E, TCP)\n"
        "  --laddr-add address                 add a FULLNAT local address to a service\n"
        "  --laddr-del address                 delete a FULLNAT local address\n"
        "  --laddr-list                        list local addresses and their counters\n"
        "  --proxy-protocol off|v1|v2          PROXY protocol header to the real server\n"
        "                                      (with -a/-e, FULLNAT, TCP or fwmark\n"
        "                                      services; -e without it keeps the\n"
        "                                      current setting; saved by -S)\n"
        "  --proxy-info                        -L: add a Proxy column (off, v1, v2;\n"
        "                                      n/a when not FULLNAT) after Forward\n"
    )


def version_text() -> str:
    try:
        from importlib.metadata import version

        ours = version("ipvs-synproxy")
    except Exception:  # not installed: running from a checkout
        ours = "unknown"
    return f"ipvs-synproxy adm {ours} (ipvsadm v{IPVS_VERSION_TEXT} compatible)\n"


def _need(value: _T | None) -> _T:
    assert value is not None  # guaranteed by the command/option table
    return value


# Commands after which an attached XDP program's VIP:ports are brought in step
SERVICE_CHANGES = ("add-service", "edit-service", "delete-service", "flush")


class _Runner:
    def __init__(self, io: Io, connect: Callable[[], IPVS], prog: str,
                 netns: str | None = None) -> None:
        self.io = io
        self.connect = connect
        self.prog = prog
        self.netns = netns
        self._ipvs: IPVS | None = None

    @property
    def ipvs(self) -> IPVS:
        if self._ipvs is None:
            self._ipvs = self.connect()
        return self._ipvs

    def close(self) -> None:
        if self._ipvs is not None:
            self._ipvs.close()

    def run(self, cmd: AdmCommand, reading_stdin: bool = False) -> int:
        listing = cmd.command in ("list", "save", "laddr-list")
        try:
            result = self._run(cmd, reading_stdin)
            if cmd.command in SERVICE_CHANGES and not reading_stdin:
                self._mirror()
            return result
        except IpvsUnavailable:
            raise
        except NotSupported as exc:
            ours = cmd.command.startswith("laddr") or (
                cmd.dest is not None and cmd.dest.fwd is FwdMethod.FULLNAT)
            text = str(exc) if ours else kernel_error_text(cmd.command, exc.code)
            self.io.stderr.write(f"{text}\n")
        except NetlinkError as exc:
            why = self._synproxy_refusal(cmd) if exc.code == errno.EINVAL else None
            self.io.stderr.write(f"{why or kernel_error_text(cmd.command, exc.code)}\n")
        return EXIT_LIST_ERROR if listing else EXIT_KERNEL

    def _mirror(self) -> None:
        """An XDP program attached in this namespace answers the SYN-proxy
        VIP:ports the kernel has now; a failure there is said, not fatal."""
        try:
            xdp.mirror(self.ipvs)
        except (xdp.XdpError, OSError) as exc:
            self.io.stderr.write(f"warning: the XDP program's services were not updated: "
                                 f"{exc}\n")

    def _synproxy_refusal(self, cmd: AdmCommand) -> str | None:
        """Why the kernel refused a real server for a SYN-proxy service, or
        the SYN proxy for a service with such real servers; None otherwise."""
        if cmd.service is None or cmd.command not in ("add-server", "edit-server",
                                                      "edit-service"):
            return None
        try:
            svc = self.ipvs.service(cmd.service)
            dests = [cmd.dest] if cmd.dest is not None else list(self.ipvs.dests(svc))
        except (NetlinkError, NotSupported):
            return None
        if cmd.command != "edit-service" and not svc.synproxy:
            return None
        if cmd.command == "edit-service" and (svc.synproxy or not cmd.service.synproxy):
            return None
        for d in dests:
            if why := synproxy_dest_error(d):
                return why
        for d in dests:
            if _is_local_address(d.addr, self.netns):
                return (f"real server {d} is one of this host's own addresses: a "
                        f"SYN-proxy service needs real servers on other hosts (its "
                        f"replies must pass the proxy's translation)")
        return None


    def _current_proxy_protocol(self, svc: Service, dest: Dest) -> Dest:
        """``dest`` with the PROXY setting the kernel has for it now: an ``-e``
        that does not mention --proxy-protocol leaves it as it is."""
        if dest.fwd is not FwdMethod.FULLNAT:
            return dest
        for cur in self.ipvs.dests(svc):
            if (cur.addr, cur.port) == (dest.addr, dest.port):
                return dataclasses.replace(dest, proxy_protocol=cur.proxy_protocol)
        return dest  # the edit itself reports the missing real server

    def _entries(self, services: list[Service], with_laddrs: bool
                 ) -> list[tuple[Service, Sequence[Dest], Sequence[Laddr]]]:
        laddrs_ok = with_laddrs and self.ipvs.supports(IPVS_CMD_GET_LADDR)
        return [(svc, self.ipvs.dests(svc), self.ipvs.laddrs(svc) if laddrs_ok else ())
                for svc in services]

    def _list(self, cmd: AdmCommand) -> int:
        out = self.io.stdout
        if "connection" in cmd.options:
            try:
                text = self.io.read_conn()
            except OSError:
                self.io.stderr.write(f"cannot open file {CONN_PROC_FILE}\n")
                return EXIT_LIST_ERROR
            out.write(listing.format_connections(text, cmd.fmt))
        elif cmd.service is not None:
            svc = self.ipvs.service(cmd.service)
            out.write(listing.format_title(cmd.fmt)
                      + listing.format_service(svc, self.ipvs.dests(svc), cmd.fmt))
        elif "timeout" in cmd.options:
            out.write(listing.format_timeouts(self.ipvs.timeouts()))
        elif "daemon" in cmd.options:
            out.write(listing.format_daemons(self.ipvs.daemons()))
        else:
            info = self.ipvs.info()
            out.write(listing.format_table(info, self._entries(self.ipvs.services(), False),
                                   cmd.fmt))
        return EXIT_OK

    def _run(self, cmd: AdmCommand, reading_stdin: bool) -> int:
        out = self.io.stdout
        c = cmd.command
        if c == "help":
            out.write(usage_text(self.prog))
        elif c == "version":
            out.write(version_text())
        elif c == "restore":
            if reading_stdin:
                raise AdmUsageError("-R: cannot restore from within a restore", try_help=True)
            return self.restore()
        elif c == "start-daemon" and cmd.daemon is not None:
            self.ipvs.start_daemon(cmd.daemon)
        elif c == "stop-daemon" and cmd.daemon is not None:
            self.ipvs.stop_daemon(cmd.daemon)
        elif c == "list":
            return self._list(cmd)
        elif c == "save":
            fmt = dataclasses.replace(cmd.fmt, rule=True)
            out.write(listing.format_table(None, self._entries(self.ipvs.services(), True), fmt))
        elif c == "laddr-list":
            services = [self.ipvs.service(cmd.service)] if cmd.service is not None \
                else self.ipvs.services()
            out.write(listing.format_laddrs([(s, self.ipvs.laddrs(s)) for s in services], cmd.fmt))
        elif c == "flush":
            self.ipvs.flush()
        elif c == "add-service":
            self.ipvs.add_service(_need(cmd.service))
        elif c == "edit-service":
            self.ipvs.edit_service(_need(cmd.service))
        elif c == "delete-service":
            self.ipvs.del_service(_need(cmd.service))
        elif c == "zero":
            self.ipvs.zero(cmd.service)
        elif c == "add-server":
            self.ipvs.add_dest(_need(cmd.service), _need(cmd.dest))
        elif c == "edit-server":
            svc, dest = _need(cmd.service), _need(cmd.dest)
            if "proxy-protocol" not in cmd.options:
                dest = self._current_proxy_protocol(svc, dest)
            self.ipvs.edit_dest(svc, dest)
        elif c == "delete-server":
            self.ipvs.del_dest(_need(cmd.service), _need(cmd.dest))
        elif c == "set":
            self.ipvs.set_timeouts(_need(cmd.timeouts))
        elif c in ("laddr-add", "laddr-del"):
            assert cmd.laddr is not None
            (self.ipvs.add_laddr if c == "laddr-add" else self.ipvs.del_laddr)(
                _need(cmd.service), cmd.laddr)
        return EXIT_OK

    def restore(self) -> int:
        """``-R``: every line is checked first, so bad input changes nothing; then
        the lines run in order as with ipvsadm (a line the kernel refuses is
        reported and the next one still runs; the status is the last line's)."""
        commands: list[AdmCommand] = []
        for number, line in enumerate(self.io.stdin.read().splitlines(), 1):
            try:
                words = shlex.split(line, comments=True)
            except ValueError as exc:
                raise AdmUsageError(f"-R: line {number}: {exc}") from None
            if not words:
                continue
            try:
                cmd = cmdline.parse(words)
            except AdmUsageError as exc:
                raise AdmUsageError(f"-R: line {number}: {exc.message}") from None
            if cmd.command == "restore":
                raise AdmUsageError(f"-R: line {number}: -R inside a restore")
            commands.append(cmd)
        result = EXIT_OK
        for cmd in commands:
            result = self.run(cmd, reading_stdin=True)
        self._mirror()
        return result


def run(argv: Sequence[str], *, netns: str | None = None, prog: str = "ipvsadm-sp",
        stdin: TextIO | None = None, stdout: TextIO | None = None,
        stderr: TextIO | None = None, read_conn: Callable[[], str] | None = None) -> int:
    """Run one ipvsadm command line (IPVS of ``netns``); returns the exit status."""
    io = Io(stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr,
            read_conn or _read_proc_conn)
    runner = _Runner(io, lambda: IPVS(netns), prog, netns)
    try:
        return runner.run(cmdline.parse(argv))
    except AdmUsageError as exc:
        io.stderr.write(f"{exc.message}\n")
        if exc.try_help:
            io.stderr.write(f"Try `{prog} -h' or '{prog} --help' for more information.\n")
        return EXIT_USAGE
    except IpvsUnavailable as exc:
        io.stderr.write(f"Can't initialize ipvs: {exc}\nAre you sure that IP Virtual "
                        "Server is built in the kernel or as module?\n")
        return EXIT_USAGE
    finally:
        runner.close()


def main(argv: Sequence[str] | None = None, prog: str = "ipvs-synproxy adm") -> int:
    return run(sys.argv[1:] if argv is None else list(argv), prog=prog)


def script() -> None:
    """The ``ipvsadm-sp`` console script."""
    sys.exit(main(sys.argv[1:], prog="ipvsadm-sp"))
