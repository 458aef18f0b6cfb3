"""The ``ipvs-synproxy`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ipvs_synproxy.adm import execute as adm
from ipvs_synproxy.build import apt, kmod, paths
from ipvs_synproxy.cli import config as cli_config
from ipvs_synproxy.cli import docs as cli_docs
from ipvs_synproxy.cli import exporter as cli_exporter
from ipvs_synproxy.cli import keepalived as cli_keepalived
from ipvs_synproxy.cli import xdp as cli_xdp
from ipvs_synproxy.exporter import collector
from webui import cli as webui_cli

EXIT_USAGE = 2


def _cmd_kmod_build(args: argparse.Namespace) -> int:
    res = kmod.build(force=args.force, series=args.kernel)
    state = "built" if res.rebuilt else "up to date"
    print(f"{state}: {len(res.modules)} modules for {res.kernel.version} "
          f"(series key {res.key}) in {res.directory / 'modules'}")
    return 0


def _cmd_kmod_build_toa(args: argparse.Namespace) -> int:
    res = kmod.build_toa(force=args.force, series=args.kernel)
    print(res.modules[0])
    return 0


def _cmd_kmod_checkpatch(args: argparse.Namespace) -> int:
    sources = sorted((paths.patches_dir() / "toa").glob("*.c"))
    found = 0
    for series in [args.kernel] if args.kernel else kmod.known_series():
        patches = kmod.read_series(series=series)
        problems = kmod.checkpatch(patches, sources, series=series)
        for patch, report in problems:
            print(f"== linux-{series}/{patch.name}\n{report}")
        print(f"checkpatch {series}: {len(patches)} patches and {len(sources)} module "
              f"sources, {len(problems)} with findings")
        found += len(problems)
    return 1 if found else 0


def _cmd_kmod_dkms_tree(args: argparse.Namespace) -> int:
    from importlib.metadata import version

    if args.all_series:
        if args.kernel:
            print("ipvs-synproxy: kmod dkms-tree: --all-series or --kernel, not both",
                  file=sys.stderr)
            return EXIT_USAGE
        dest = kmod.export_all(Path(args.dest).resolve(), version("ipvs-synproxy"))
    else:
        dest = kmod.export_tree(Path(args.dest).resolve(), version("ipvs-synproxy"),
                                args.kernel)
    print(f"patched source tree with dkms.conf in {dest}\n"
          f"next: dkms add {dest} && dkms install ipvs-synproxy/{version('ipvs-synproxy')}")
    return 0


def _cmd_vm_exec(args: argparse.Namespace) -> int:
    from ipvs_synproxy_testbed import vm

    apt.allow_install()     # the testbed is a development tool: it sets itself up

    cmd = list(args.command)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        print("ipvs-synproxy vm exec: no command given (… vm exec -- CMD …)", file=sys.stderr)
        return EXIT_USAGE
    opts = vm.VmOptions(
        topology=args.topology, modules=args.modules, timeout=args.timeout,
        memory_mb=args.memory, cpus=args.cpus, forward_ports=tuple(args.forward),
        nic_pair=args.nic_pair, cwd=Path.cwd(), keep_job=args.keep, verbose=args.verbose,
        kernel=args.kernel,
    )
    return vm.run(cmd, opts).returncode


def _cmd_man(args: argparse.Namespace) -> int:
    version = package_version()
    if args.page == "ipvsadm-sp":
        sys.stdout.write(cli_docs.ipvsadm_sp_page(version))
    else:
        sys.stdout.write(cli_docs.ipvs_synproxy_page(build_parser(), version))
    return 0


def _cmd_completion(args: argparse.Namespace) -> int:
    sys.stdout.write(cli_docs.bash_completion(build_parser()))
    return 0


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range 1-65535: {port}")
    return port


def _series(text: str) -> str:
    try:
        return kmod.check_series(text.strip())
    except kmod.KmodError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _kernel_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--kernel", type=_series, metavar="SERIES",
                   help=f"{what} for this kernel series ({' or '.join(kmod.known_series())}; "
                        "default: the newest supported one that apt serves)")
    install_deps_option(p)


def install_deps_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--install-deps", action="store_true",
                   help="install missing Debian packages (kernel headers and source, "
                        "compilers) with apt-get instead of naming them and stopping")


def package_version() -> str:
    v = collector.package_version()
    return "unknown (not installed)" if v == "unknown" else v


def version_text() -> str:
    """The package's version and the kernel series it carries patches for."""
    return (f"ipvs-synproxy {package_version()} (kernel patch series: "
            f"{', '.join(f'Linux {s}' for s in kmod.known_series())})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ipvs-synproxy",
        description="FULLNAT and SYN proxy for Linux IPVS: build the patched modules, "
                    "run the QEMU testbed, manage services.",
    )
    p.add_argument("--version", action="version", version=version_text(),
                   help="show the version and the supported kernel series, then exit")
    sub = p.add_subparsers(dest="group", required=True, metavar="COMMAND")

    km = sub.add_parser("kmod", help="build the patched IPVS modules")
    kms = km.add_subparsers(dest="action", required=True, metavar="ACTION")
    b = kms.add_parser("build", help="build (or reuse the cached) patched modules for the "
                                     "newest Debian kernel of a series, installing it "
                                     "if need be")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    _kernel_option(b, "build")
    b.set_defaults(func=_cmd_kmod_build)
    t = kms.add_parser("build-toa", help="build (or reuse the cached) real-server TOA "
                                         "module toa.ko; prints its path")
    t.add_argument("--force", action="store_true", help="rebuild even if cached")
    _kernel_option(t, "build")
    t.set_defaults(func=_cmd_kmod_build_toa)
    c = kms.add_parser("checkpatch", help="run checkpatch.pl over every patch of every "
                                          "series (or of --kernel's)")
    c.add_argument("--kernel", type=_series, metavar="SERIES",
                   help=f"only this series ({' or '.join(kmod.known_series())})")
    install_deps_option(c)
    c.set_defaults(func=_cmd_kmod_checkpatch)
    t = kms.add_parser("dkms-tree", help="write the patched source tree with dkms.conf "
                                         "(for /usr/src/ipvs-synproxy-VERSION)")
    t.add_argument("dest", help="directory to create (must be absent or empty)")
    _kernel_option(t, "the patches")
    t.add_argument("--all-series", action="store_true",
                   help="one tree for every supported series apt serves (each under "
                        "linux-SERIES/, dkms.conf picks by the kernel's version): what the "
                        "ipvs-synproxy-dkms package ships")
    t.set_defaults(func=_cmd_kmod_dkms_tree)

    v = sub.add_parser("vm", help="the QEMU testbed guest")
    vs = v.add_subparsers(dest="action", required=True, metavar="ACTION")
    e = vs.add_parser(
        "exec", help="boot the guest, run a command in it, exit with its status",
        description="Boot the testbed guest (a stock Debian kernel of the chosen series, "
                    "TCG, no network device), load the IPVS modules, optionally build the standard "
                    "topology (netns client, lb, rs1, rs2), run COMMAND from the current "
                    "directory and exit with its status. Any BUG/WARNING/Oops/SLUB report "
                    "in the guest's kernel log fails the run.",
    )
    _kernel_option(e, "boot and build")
    e.add_argument("--topology", action="store_true",
                   help="build the standard topology before running the command")
    e.add_argument("--modules", choices=("patched", "stock"), default="patched",
                   help="patched: this project's build (default); stock: the "
                        "distribution's own IPVS modules")
    e.add_argument("--timeout", type=float, default=1800.0,
                   help="kill the guest after this many seconds (default 1800)")
    e.add_argument("--memory", type=int, default=2048, help="guest memory in MiB")
    e.add_argument("--cpus", type=int, default=2, help="guest vCPUs")
    e.add_argument("--forward", type=_port, action="append", default=[], metavar="PORT",
                   help="forward 127.0.0.1:PORT on the host to the guest's PORT")
    e.add_argument("--nic-pair", action="store_true",
                   help="two virtio NICs joined to each other by a QEMU hub and nothing"
                        " else (make bench: the client-lb link as real NICs; see"
                        " ipvs_synproxy_testbed/nicpair.py)")
    e.add_argument("--keep", action="store_true", help="keep the job directory (logs)")
    e.add_argument("-v", "--verbose", action="store_true", help="show guest boot progress")
    e.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND")
    e.set_defaults(func=_cmd_vm_exec)

    m = sub.add_parser("man", help="print a man page (roff) generated from the parsers",
                       description="Print the man page of ipvs-synproxy or ipvsadm-sp, "
                                   "generated from their parsers (the Debian package "
                                   "installs these). Read one with: ipvs-synproxy man "
                                   "ipvsadm-sp | man -l -")
    m.add_argument("page", choices=("ipvs-synproxy", "ipvsadm-sp"))
    m.set_defaults(func=_cmd_man)
    c = sub.add_parser("completion", help="print a shell completion script",
                       description="Print bash completion for ipvs-synproxy and ipvsadm-sp "
                                   "(source it, or install it as "
                                   "/usr/share/bash-completion/completions/ipvs-synproxy).")
    c.add_argument("shell", choices=("bash",))
    c.set_defaults(func=_cmd_completion)

    cli_config.register(sub)  # diff, apply, stats, sysctl
    cli_exporter.register(sub)  # the Prometheus exporter
    cli_xdp.register(sub)  # the XDP fast path
    cli_keepalived.register(sub)  # keepalived render, build
    webui_cli.register(sub)  # the web console
    # ``adm`` takes ipvsadm's own command line: main() hands it over unparsed.
    sub.add_parser("adm", add_help=False,
                   help="ipvsadm-compatible service manager (ipvs-synproxy adm -h)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["adm"]:
        return adm.main(argv[1:])
    args = build_parser().parse_args(argv)
    if getattr(args, "install_deps", False):
        apt.allow_install()
    try:
        rc: int = args.func(args)
    except (kmod.KmodError, apt.DependencyError) as exc:
        print(f"ipvs-synproxy: {exc}", file=sys.stderr)
        return 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
