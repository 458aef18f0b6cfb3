"""Run a command inside the QEMU testbed guest (DESIGN.md, "The testbed").

The guest runs the stock Debian 6.1 kernel under TCG with no network device,
the host's root filesystem read-only over 9p under a tmpfs overlay (so the
checkout, its virtualenv and every host tool are at the same paths) and the
build cache read-write. Each run gets a job directory in the build cache: the
command, its environment, its output (streamed back while it runs), its exit
status and the guest's kernel log. Any kernel complaint in that log fails the
run whatever the command returned.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from ipvs_synproxy.build import apt, kmod, paths
from ipvs_synproxy_testbed import hostflood, nicpair
from ipvs_synproxy_testbed.initramfs import build_initramfs

GUEST_DEBS = ["qemu-system-x86", "busybox-static", "ipvsadm", "iproute2", "kmod",
              "procps", "tcpdump",
              "netsniff-ng",  # trafgen: testbed.flood
              "nftables"]     # counters and drops in the namespaces (flood, demo)
GUEST_INIT = Path(__file__).with_name("guest_init.sh")

# Lines of a kernel log that mean the kernel itself went wrong.
KERNEL_PROBLEM = re.compile(
    r"(\bBUG[: ]|WARNING:|\bOops\b|Kernel panic|general protection fault|"
    r"\bKASAN\b|\bUBSAN\b|kernel BUG|Call Trace:|refcount_t:|list_(add|del) corruption|"
    r"INFO: task .* blocked|rcu: INFO|Poison overwritten|Redzone|Object padding|"
    r"slab_out_of_bounds|use-after-free|double free|Freepointer corrupt)"
)
# What tests/vm/conftest.py writes to the kernel log as each test starts.
TEST_MARK = "ipvs-synproxy test: "
# Lines of an oops that say where it happened.
OOPS_WHERE = re.compile(r"(\bRIP: |\bat [\w/.-]+\.[ch]:\d+|^\[[ \d.]+\]  ip_vs\w*\+)")
# Guest boot flags the testbed contract requires, and longer stall detectors:
# a software-emulated vCPU on a busy 2-core host can go unscheduled for tens of
# seconds, and the default 21 s (RCU) and 20 s (soft lockup) then report the
# host's scheduling as a kernel problem. A real lockup lasts; 60 s still catch it.
KERNEL_CMDLINE = (
    "console=ttyS0 panic=-1 oops=panic panic_on_warn=1 slub_debug=FZPU "
    "mitigations=off nokaslr random.trust_cpu=on "
    "rcupdate.rcu_cpu_stall_timeout=60 watchdog_thresh=30"
)


class VmError(RuntimeError):
    pass


@dataclass
class VmOptions:
    topology: bool = False
    modules: str = "patched"  # "patched": our build; "stock": the distribution's
    timeout: float = 1800.0
    memory_mb: int = 2048
    cpus: int = 2
    forward_ports: tuple[int, ...] = ()
    nic_pair: bool = False  # two virtio NICs joined by a QEMU hub (ipvs_synproxy_testbed.nicpair)
    cwd: Path = field(default_factory=paths.project_root)
    keep_job: bool = False
    verbose: bool = False
    kernel: str | None = None  # series (6.1, 6.12); None: kmod.default_series()


@dataclass
class VmResult:
    returncode: int
    command_rc: int | None
    kernel_problems: list[str]
    job_dir: Path


# A file the host creates in the job directory (on the read-write build share)
# when ``vm exec`` is interrupted: long-running guest commands (the demo) poll
# for it and wind down cleanly. Its path reaches the guest as IPVS_SP_STOP_FILE.
STOP_FILE = "stop"
STOP_GRACE = 60.0  # seconds the guest gets to finish after an interrupt


def stop_requested() -> bool:
    """In the guest: has the host asked the command to stop (Ctrl-C on ``vm exec``)?"""
    path = os.environ.get("IPVS_SP_STOP_FILE")
    return path is not None and os.path.exists(path)


def _env_file(opts: VmOptions, moddir: Path | None, job: Path | None = None) -> str:
    venv_bin = str(Path(sys.executable).parent)
    host_path = os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    env = {
        "SP_MODULES": opts.modules,
        "SP_MODDIR": str(moddir or ""),
        "SP_TOPOLOGY": "1" if opts.topology else "0",
        "SP_CWD": str(opts.cwd),
        "PATH": f"{venv_bin}:/usr/local/sbin:/usr/sbin:/sbin:{host_path}",
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
        "IPVS_SP_GUEST": "1",
        "IPVS_SP_MODULES": opts.modules,
        "IPVS_SP_TOPOLOGY": "1" if opts.topology else "0",
        "PYTHONUNBUFFERED": "1",
    }
    if job is not None:
        env["IPVS_SP_STOP_FILE"] = str(job / STOP_FILE)
        if opts.nic_pair:
            env[hostflood.ENV] = str(job)
    for k, v in os.environ.items():
        if k.startswith("IPVS_SYNPROXY_") or k in ("CI", "VIRTUAL_ENV", "PYTEST_ADDOPTS"):
            env[k] = v
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())


def qemu_command(kernel: kmod.Kernel, initrd: Path, job: Path, opts: VmOptions) -> list[str]:
    build = paths.build_dir()
    append = f"{KERNEL_CMDLINE} sp_init={GUEST_INIT} sp_build={build} sp_job={job}"
    nic = ["-nic", "none"]
    if opts.forward_ports:
        fwd = ",".join(f"hostfwd=tcp:127.0.0.1:{p}-:{p}" for p in opts.forward_ports)
        nic = ["-nic", f"user,restrict=on,model=virtio-net-pci,{fwd}"]
    if opts.nic_pair:
        nic += nicpair.qemu_args() + hostflood.qemu_args(job, nicpair.HUB_ID)
    return [
        "qemu-system-x86_64", "-accel", "tcg", "-cpu", "max",
        "-m", str(opts.memory_mb), "-smp", str(opts.cpus),
        "-display", "none", "-monitor", "none", "-no-reboot",
        "-serial", f"file:{job / 'console.log'}",
        *nic,
        "-device", "virtio-rng-pci",
        "-kernel", str(kernel.image), "-initrd", str(initrd),
        "-append", append,
        "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
        "-fsdev", f"local,id=build,path={build},security_model=none,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=build,mount_tag=build",
    ]


class _Tail:
    """Copy what a file gains to a stream, as it grows."""

    def __init__(self, path: Path, out: TextIO) -> None:
        self.path, self.out, self.pos = path, out, 0

    def pump(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            return
        if data:
            self.pos += len(data)
            self.out.write(data.decode(errors="replace"))
            self.out.flush()


def _report(job: Path, log: str, problems: list[str]) -> None:
    """Show the guest log around the first kernel complaint (or its end)."""
    lines = log.splitlines()
    first = _first_problem(lines) if problems else None
    if first is not None:
        excerpt = lines[max(0, first - 8): first + 72]
        what = "kernel problems in the guest log"
    else:
        excerpt = lines[-60:]
        what = "kernel problems in the guest's dmesg" if problems else \
            "guest died before the command finished"
    print(f"vm: {what} ({job / 'console.log'}):", file=sys.stderr)
    print("\n".join("  | " + ln for ln in excerpt), file=sys.stderr)
    # Last, because a CI summary often keeps only the end of the output.
    for ln in _summary(lines, first):
        print(f"vm: {ln}", file=sys.stderr)


def _first_problem(lines: list[str]) -> int | None:
    return next((i for i, ln in enumerate(lines) if KERNEL_PROBLEM.search(ln)), None)


def _summary(lines: list[str], first: int | None) -> list[str]:
    """The running test, the first complaint (line index first) and where it
    happened, in a few lines."""
    out = []
    started = [ln.split(TEST_MARK, 1)[1] for ln in lines if TEST_MARK in ln]
    if started:
        out.append(f"last test started: {started[-1]}")
    if first is not None:
        out.append(f"first complaint: {lines[first].strip()}")
        where = [ln.strip() for ln in lines[first:first + 200] if OOPS_WHERE.search(ln)]
        out.extend(f"  {ln}" for ln in where[:8])
    return out


def kernel_problems(log: str) -> list[str]:
    return [ln for ln in log.splitlines() if KERNEL_PROBLEM.search(ln)]


def _read(p: Path) -> str:
    try:
        return p.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def prepare(opts: VmOptions) -> tuple[kmod.Kernel, Path | None]:
    apt.ensure_debs(GUEST_DEBS)
    if opts.modules == "patched":
        res = kmod.build(series=opts.kernel)
        return res.kernel, res.directory
    if opts.modules == "stock":
        return kmod.ensure_toolchain(opts.kernel), None
    raise VmError(f"--modules must be 'patched' or 'stock', not {opts.modules!r}")


def run(cmd: list[str], opts: VmOptions) -> VmResult:
    """Boot the guest, run ``cmd`` in it and return how it went."""
    if not cmd:
        raise VmError("no command given")
    kernel, moddir = prepare(opts)
    initrd = build_initramfs(kernel)
    jobs = paths.build_dir() / "vm" / "jobs"
    jobs.mkdir(parents=True, exist_ok=True)
    job = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=jobs))
    (job / "env").write_text(_env_file(opts, moddir, job))
    (job / "cmd").write_text("exec " + shlex.join(cmd) + "\n")
    for f in ("stdout", "stderr"):
        (job / f).touch()

    argv = qemu_command(kernel, initrd, job, opts)
    flooder = hostflood.HostFlooder(job) if opts.nic_pair else None
    if flooder:
        flooder.start()
    tails = [_Tail(job / "stdout", sys.stdout), _Tail(job / "stderr", sys.stderr)]
    progress = _Tail(job / "progress", sys.stderr) if opts.verbose else None
    deadline = time.monotonic() + opts.timeout
    with open(job / "qemu.log", "wb") as qlog:
        # Its own session: a Ctrl-C at the terminal reaches this process only, which
        # asks the guest's command to stop (STOP_FILE) instead of killing QEMU.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=qlog, stderr=qlog,
                                start_new_session=True)
        timed_out = False
        interrupted = False
        try:
            while proc.poll() is None:
                try:
                    for t in tails:
                        t.pump()
                    if progress:
                        progress.pump()
                    if time.monotonic() > deadline:
                        timed_out = True
                        proc.kill()
                        break
                    time.sleep(0.2)
                except KeyboardInterrupt:
                    if interrupted:
                        raise
                    interrupted = True
                    (job / STOP_FILE).touch()
                    deadline = min(deadline, time.monotonic() + STOP_GRACE)
                    print(f"vm: interrupted: asking the guest command to stop (up to "
                          f"{STOP_GRACE:.0f} s; interrupt again to kill the guest)",
                          file=sys.stderr, flush=True)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if flooder:
                flooder.stop()
    for t in tails:
        t.pump()

    console, dmesg = _read(job / "console.log"), _read(job / "dmesg")
    problems = kernel_problems(console + "\n" + dmesg)
    rc_text = _read(job / "rc").strip()
    command_rc = int(rc_text) if rc_text.lstrip("-").isdigit() else None

    if timed_out:
        print(f"vm: timed out after {opts.timeout:.0f} s", file=sys.stderr)
    if problems or command_rc is None:
        _report(job, console or dmesg or _read(job / "qemu.log"), problems)
    if problems:
        rc = command_rc or 1
    elif command_rc is None:
        rc = 124 if timed_out else 125
    else:
        rc = command_rc
    if not opts.keep_job and not problems and command_rc is not None:
        shutil.rmtree(job, ignore_errors=True)
    return VmResult(returncode=rc, command_rc=command_rc, kernel_problems=problems,
                    job_dir=job)
