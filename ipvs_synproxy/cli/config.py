"""The ``diff``, ``apply``, ``stats`` and ``sysctl`` commands of ``ipvs-synproxy``.

Kept apart from :mod:`cli` so that each command group stays small; :func:`register`
adds them to the main parser. Exit codes: 0 success, 1 the kernel refused or
the apply failed (and was rolled back), 2 bad input (config, names, values).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from typing import Any

from ipvs_synproxy.build import xdp as xdp_build
from ipvs_synproxy.cli import guard
from ipvs_synproxy.config import load as config_load
from ipvs_synproxy.config import plan as config_plan
from ipvs_synproxy.config import reader as config_reader
from ipvs_synproxy.config import schema as config_schema
from ipvs_synproxy.kernel import netlink, stats, sysctl

EXIT_FAILED = 1
EXIT_USAGE = 2
NEW_SECRET = ("a new random cookie secret is set in the IPVS module and the XDP programs "
              "(no cookie_secret_file; the module's cannot be read back to give to them)")


def _err(msg: str) -> None:
    print(f"ipvs-synproxy: {msg}", file=sys.stderr)


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=None, sort_keys=False))


def _connect(netns: str | None) -> netlink.IPVS:
    return netlink.IPVS(netns)


def _load(path: str) -> config_load.Config | None:
    try:
        return config_load.load(path)
    except config_reader.ConfigError as exc:
        _err(f"invalid config: {exc}\nnothing was applied")
        return None


def _plan(args: argparse.Namespace) -> tuple[int, config_plan.Plan | None, netlink.IPVS | None]:
    cfg = _load(args.file)
    if cfg is None:
        return EXIT_USAGE, None, None
    try:
        ipvs = _connect(args.netns)
    except netlink.NetlinkError as exc:
        _err(str(exc))
        return EXIT_FAILED, None, None
    try:
        return 0, config_plan.plan(cfg, ipvs, sysctl.Sysctls(args.netns)), ipvs
    except (netlink.NetlinkError, sysctl.SysctlError) as exc:
        ipvs.close()
        _err(f"reading the current state: {exc}")
        return EXIT_FAILED, None, None


def _plan_json(p: config_plan.Plan) -> dict[str, Any]:
    return {"file": p.config.path,
            "changes": [config_plan.change_dict(c) for c in p.changes],
            "summary": config_plan.counts(p.changes),
            "cookie_secret": p.config.secret_file,
            "new_random_secret": p.new_secret,
            "problems": p.problems}


def _cmd_check(args: argparse.Namespace) -> int:
    if args.schema:
        print(json.dumps(config_schema.schema(), indent=1))
        return 0
    if args.file is None:
        _err("check: a config file to check (or --schema)")
        return EXIT_USAGE
    try:
        text = config_load.read_text(args.file)
    except config_reader.ConfigError as exc:
        errors = [exc]
    else:
        errors = config_load.check(text, args.file)
    if args.json:
        _print_json({"file": args.file, "valid": not errors,
                     "errors": [{"where": e.source, "key": e.field, "message": e.message}
                                for e in errors]})
    else:
        for e in errors:
            print(e)
        print(f"{args.file}: {len(errors)} error(s)" if errors else f"{args.file}: valid",
              file=sys.stderr)
    return EXIT_USAGE if errors else 0


def _cmd_diff(args: argparse.Namespace) -> int:
    rc, p, ipvs = _plan(args)
    if args.exit_code and rc == EXIT_FAILED:
        return EXIT_USAGE       # 1 is reserved for "differs"
    if p is None or ipvs is None:
        return rc
    ipvs.close()
    if args.json:
        _print_json(_plan_json(p))
    else:
        for line in config_plan.format_changes(p.changes):
            print(line)
        if p.config.secret_file:
            print(f"cookie secret from {p.config.secret_file} is set on every apply "
                  "(it cannot be read back to compare)")
        elif p.new_secret:
            print(NEW_SECRET)
        for problem in p.problems:
            print(f"problem: {problem}")
    if args.exit_code:
        return EXIT_USAGE if p.problems else (EXIT_FAILED if p.changes else 0)
    return EXIT_FAILED if p.problems else 0


def _cmd_apply(args: argparse.Namespace) -> int:
    try:
        with guard.exclusive(guard.state_dir(args.state_dir), f"apply {args.file}"):
            return _apply_locked(args)
    except guard.GuardError as exc:
        _err(str(exc))
        return EXIT_FAILED


def _refuse(args: argparse.Namespace, out: dict[str, Any], why: str, hint: str) -> None:
    if args.json:
        _print_json({**out, "applied": False, "error": why})
    _err(f"refused: {why}; nothing was changed ({hint})")


def _apply_locked(args: argparse.Namespace) -> int:
    rc, p, ipvs = _plan(args)
    if p is None or ipvs is None:
        return rc
    out = _plan_json(p)
    with ipvs:
        if p.problems:
            if args.json:
                _print_json({**out, "applied": False, "error": "; ".join(p.problems)})
            for problem in p.problems:
                _err(f"cannot apply: {problem}")
            _err("nothing was applied")
            return EXIT_FAILED
        why = None if args.prune else config_plan.deletion_refusal(p, args.max_delete)
        if why is not None:
            _refuse(args, out, why, "--prune deletes them")
            return EXIT_USAGE
        if p.changes:
            saved = guard.save(guard.state_dir(args.state_dir), p.current)
            if not args.json:
                print(f"saved the live table to {saved.dump} "
                      "(ipvs-synproxy restore puts it back)")
        try:
            config_plan.apply_plan(p, ipvs, sysctl.Sysctls(args.netns), xdp_build.build)
        except config_plan.ApplyError as exc:
            guard.log_changes([f"{exc} (rolled back)"], f"apply {args.file} failed")
            if args.json:
                _print_json({**out, "applied": False, "error": str(exc.error),
                             "failed": config_plan.change_dict(exc.failed)
                             if exc.failed is not None else "cookie secret",
                             "rolled_back": len(exc.done) - len(exc.rollback_errors),
                             "rollback_errors": [{"change": config_plan.change_dict(c),
                                                  "error": str(e)}
                                                 for c, e in exc.rollback_errors]})
            _err(f"apply {args.file}: {exc}")
            return EXIT_FAILED
    guard.log_changes([config_plan.describe(c) for c in p.changes], f"apply {args.file}")
    if args.json:
        _print_json({**out, "applied": True})
    else:
        for line in config_plan.format_changes(p.changes):
            print(line)
        if p.config.secret_file:
            print(f"cookie secret set from {p.config.secret_file}")
        elif p.new_secret:
            print("cookie secret: a new random one, set in the IPVS module and the XDP "
                  "programs")
        if p.changes:
            print("applied")
    return 0


def _cmd_restore(args: argparse.Namespace) -> int:
    directory = guard.state_dir(args.state_dir)
    states = guard.saved_states(directory)
    if args.list:
        for saved in states:
            print(saved.name)
        return 0
    chosen = [s for s in states if args.state in (None, s.name)]
    if not chosen:
        _err(f"no saved state {args.state or ''} in {directory} "
             f"(saved: {', '.join(s.name for s in states) or 'none'})")
        return EXIT_USAGE
    try:
        desired = guard.read_saved(chosen[0])
        with guard.exclusive(directory, f"restore {chosen[0].dump.name}"), \
                _connect(args.netns) as ipvs:
            sc = sysctl.Sysctls(args.netns)
            current = config_plan.read_state(ipvs, sc, desired.sysctls)
            changes = config_plan.diff(current, desired)
            if changes:
                guard.save(directory, current)
            config_plan.apply_changes(changes, config_plan.KernelTarget(ipvs, sc))
    except guard.GuardError as exc:
        _err(str(exc))
        return EXIT_FAILED
    except netlink.NetlinkError as exc:
        _err(str(exc))
        return EXIT_FAILED
    except config_plan.ApplyError as exc:
        _err(f"restore {chosen[0].dump}: {exc}")
        return EXIT_FAILED
    guard.log_changes([config_plan.describe(c) for c in changes],
                      f"restore {chosen[0].dump.name}")
    for line in config_plan.format_changes(changes):
        print(line)
    print(f"restored {chosen[0].dump}")
    return 0


Sample = tuple[stats.Snapshot, dict[str, float] | None, stats.XdpRates | None]


def _samples(ipvs: netlink.IPVS, watch: float | None, count: int | None
             ) -> Iterator[Sample]:
    """Snapshots, each with the rates since the one before (none for the first)."""
    prev = None
    n = 0
    while True:
        snap = stats.snapshot(ipvs)
        if prev is None:
            yield snap, None, None
        else:
            yield snap, stats.ext_rates(prev, snap), stats.xdp_rates(prev, snap)
        n += 1
        if watch is None or (count is not None and n >= count):
            return
        prev = snap
        time.sleep(watch)


def _cmd_stats(args: argparse.Namespace) -> int:
    if args.watch is not None and args.watch <= 0:
        _err("--watch needs a positive number of seconds")
        return EXIT_USAGE
    try:
        with _connect(args.netns) as ipvs:
            for i, sample in enumerate(_samples(ipvs, args.watch, args.count)):
                _print_sample(args, i, sample)
    except netlink.NetlinkError as exc:
        _err(str(exc))
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 0
    return 0


def _print_sample(args: argparse.Namespace, i: int, sample: Sample) -> None:
    snap, rates, xrates = sample
    if args.json:
        _print_json(stats.to_json(snap, rates, xrates))
    else:
        if i:
            print()
        if args.watch is not None:
            print(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snap.wall)))
        for line in stats.format_table(snap, rates, exact=args.exact, xrates=xrates):
            print(line)
    sys.stdout.flush()


def _knob_json(name: str, value: sysctl.Value | None) -> dict[str, Any]:
    knob = sysctl.describe(name)
    return {"name": f"{sysctl.PREFIX}{name}",
            "value": None if value is None else sysctl.display(name, value),
            "present": value is not None,
            "default": knob.default.replace("\t", " ") if knob else None,
            "meaning": knob.meaning if knob else None,
            "origin": knob.origin if knob else None}


def _knob_line(name: str, value: sysctl.Value | None, describe: bool) -> str:
    text = "(not present)" if value is None else sysctl.display(name, value)
    line = f"{sysctl.PREFIX}{name} = {text}"
    knob = sysctl.describe(name)
    if describe:
        if knob is None:
            line += "  # undocumented"
        else:
            default = knob.default.replace("\t", " ") or "computed at boot"
            line += f"  # default {default}: {knob.meaning}"
    return line


def _cmd_sysctl_get(args: argparse.Namespace) -> int:
    sc = sysctl.Sysctls(args.netns)
    present = sc.names()
    names = [sysctl.short_name(n) for n in args.names] or present
    if not present and not args.names:
        _err(f"no {sysctl.PROC_DIR}{' in netns ' + args.netns if args.netns else ''}: "
             "is the ip_vs module loaded?")
        return EXIT_FAILED
    unknown = [n for n in names if n not in sysctl.KNOBS and n not in present]
    if unknown:
        _err(f"unknown IPVS sysctl: {', '.join(unknown)} "
             f"(known: {', '.join(sorted(set(sysctl.KNOBS) | set(present)))})")
        return EXIT_USAGE
    values: list[tuple[str, sysctl.Value | None]] = []
    rc = 0
    for n in names:
        try:
            values.append((n, sc.read(n)))
        except sysctl.SysctlMissing as exc:
            values.append((n, None))
            if not args.json:
                _err(str(exc))
            rc = EXIT_FAILED
        except sysctl.SysctlError as exc:
            _err(str(exc))
            return EXIT_FAILED
    if args.json:
        _print_json([_knob_json(n, v) for n, v in values])
    else:
        for n, v in values:
            if v is not None:
                print(_knob_line(n, v, args.describe))
    return rc


def _cmd_sysctl_set(args: argparse.Namespace) -> int:
    sc = sysctl.Sysctls(args.netns)
    try:
        wanted = sysctl.parse_assignments(args.assignments, set(sc.names()))
    except sysctl.SysctlError as exc:
        _err(str(exc))
        return EXIT_USAGE
    done: list[tuple[str, sysctl.Value]] = []
    try:
        for name, value in wanted:
            old = sc.read(name)
            sc.write(name, value)
            done.append((name, old))
    except sysctl.SysctlError as exc:
        for name, old in reversed(done):
            try:
                sc.write(name, old)
            except sysctl.SysctlError as rexc:
                _err(f"ROLLBACK FAILED: {rexc}")
        _err(f"{exc}" + (f"; restored {len(done)} knob(s) already set" if done else ""))
        return EXIT_FAILED
    result = [(name, sc.read(name)) for name, _ in wanted]
    if args.json:
        _print_json([_knob_json(n, v) for n, v in result])
    else:
        for n, v in result:
            print(_knob_line(n, v, False))
    return 0


def _percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a percentage: {text!r}") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"percentage out of range 0-100: {text}")
    return value


def _state_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", metavar="DIR", default=None,
                   help="where applies save the live table and take their lock (default "
                        "/var/lib/ipvs-synproxy for root; IPVS_SYNPROXY_STATE_DIR)")


def _netns_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--netns", metavar="NAME", default=None,
                   help="network namespace to act on (default: the current one)")


def register(sub: Any) -> None:
    """Add diff, apply, stats and sysctl to the ``ipvs-synproxy`` subparsers."""
    d = sub.add_parser("diff", help="show what applying a config file would change",
                       description="Compare a config file with the kernel's IPVS table, "
                                   "sysctls and XDP programs and list the services, real "
                                   "servers, laddrs and sysctls to add, edit or delete, and "
                                   "the interfaces to attach the XDP fast path to or "
                                   "detach it from.")
    d.add_argument("file", help="YAML config file (see docs/operator-guide.md)")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.add_argument("--exit-code", action="store_true",
                   help="exit 0 when nothing differs, 1 when something does, 2 on an "
                        "error (for drift checks in cron or CI)")
    _netns_arg(d)
    d.set_defaults(func=_cmd_diff)

    c = sub.add_parser("check", help="validate a config file without a kernel",
                       description="Check a config file offline, with every rule apply and "
                                   "render use (keys, types, ranges, families, SYN proxy only "
                                   "with NAT or FULLNAT, FULLNAT with laddrs, duplicates, the "
                                   "keepalived section, the secret file's permissions) and "
                                   "report every error at once as FILE:LINE: KEY: MESSAGE. "
                                   "Exit 0 valid, 2 invalid. Touches no kernel.")
    c.add_argument("file", nargs="?", help="YAML config file (see docs/operator-guide.md)")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.add_argument("--schema", action="store_true",
                   help="print the config file's JSON Schema (for editors) and exit")
    c.set_defaults(func=_cmd_check)

    a = sub.add_parser("apply", help="make the kernel match a config file, all or nothing",
                       description="Change only what differs (no flush; edits are edits, "
                                   "so live connections stay). If any change fails, the "
                                   "ones already made are undone and the command exits 1.")
    a.add_argument("file", help="YAML config file (see docs/operator-guide.md)")
    a.add_argument("--json", action="store_true", help="machine-readable output")
    a.add_argument("--prune", "--allow-deletes", dest="prune", action="store_true",
                   help="allow deleting every live service the file lacks, however many "
                        "(without it an apply that deletes more than --max-delete percent "
                        "of them, or all of them, is refused)")
    a.add_argument("--max-delete", type=_percent, metavar="PERCENT",
                   default=config_plan.MAX_DELETE_PERCENT,
                   help="the share of live services an apply may delete without --prune "
                        f"(default {config_plan.MAX_DELETE_PERCENT:g}; one is always allowed)")
    _state_dir_arg(a)
    _netns_arg(a)
    a.set_defaults(func=_cmd_apply)

    r = sub.add_parser("restore", help="put back the table saved before an apply",
                       description="Every apply saves the live table (an ipvsadm -S dump "
                                   "and the sysctls the file names) to the state directory "
                                   "before changing anything. restore makes the kernel "
                                   "match the newest saved state (or STATE), the same way "
                                   "apply does: only what differs, all or nothing, saving "
                                   "the table it replaces first.")
    r.add_argument("state", nargs="?", metavar="STATE",
                   help="a saved state's name (see --list; default: the newest)")
    r.add_argument("--list", action="store_true", help="list the saved states, newest first")
    _state_dir_arg(r)
    _netns_arg(r)
    r.set_defaults(func=_cmd_restore)

    s = sub.add_parser("stats", help="service, real-server, extended and XDP counters",
                       description="Per service and real server: connections, packets, "
                                   "bytes and the kernel's rate estimates; then the "
                                   "extended counters of the ipvs-synproxy modules; then, "
                                   "for each interface with the XDP fast path attached "
                                   "(ipvs-synproxy xdp), its mode and counters.")
    s.add_argument("--watch", type=float, metavar="SECONDS", default=None,
                   help="repeat every SECONDS, with per-second rates of the extended "
                        "and XDP counters")
    s.add_argument("--count", type=int, default=None, metavar="N",
                   help="with --watch: stop after N samples")
    s.add_argument("--exact", action="store_true", help="full numbers instead of K/M/G")
    s.add_argument("--json", action="store_true",
                   help="JSON (one object per sample, one per line)")
    _netns_arg(s)
    s.set_defaults(func=_cmd_stats)

    y = sub.add_parser("sysctl", help="read or set net.ipv4.vs.* knobs")
    ys = y.add_subparsers(dest="action", required=True, metavar="ACTION")
    g = ys.add_parser("get", help="show knobs (all present ones by default)")
    g.add_argument("names", nargs="*", metavar="NAME",
                   help="knob, with or without the net.ipv4.vs. prefix")
    g.add_argument("--describe", action="store_true",
                   help="add each knob's default and meaning")
    g.add_argument("--json", action="store_true", help="machine-readable output")
    _netns_arg(g)
    g.set_defaults(func=_cmd_sysctl_get)
    t = ys.add_parser("set", help="set knobs (all or nothing)")
    t.add_argument("assignments", nargs="+", metavar="NAME=VALUE")
    t.add_argument("--json", action="store_true", help="machine-readable output")
    _netns_arg(t)
    t.set_defaults(func=_cmd_sysctl_set)
