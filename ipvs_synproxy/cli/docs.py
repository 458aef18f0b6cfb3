"""Man pages and bash completion, generated from the command parsers.

``ipvs-synproxy man ipvs-synproxy|ipvsadm-sp`` prints a man page (roff), and
``ipvs-synproxy completion bash`` a completion script for both commands. They
are made from the argparse tree (and, for ``ipvsadm-sp``, from its ipvsadm
option table and usage text), so a new option appears in them by itself; the
Debian package installs what these print.
"""

from __future__ import annotations

import argparse
import datetime
import os
from collections.abc import Iterator

from ipvs_synproxy.adm import cmdline
from ipvs_synproxy.adm import execute as adm

SEE_ALSO = ("ipvsadm(8)", "keepalived(8)", "ipvsadm-sp(8)", "ipvs-synproxy(8)")


def _date() -> str:
    """The page's date: SOURCE_DATE_EPOCH's (dpkg-buildpackage sets it from the
    changelog, so the packaged pages are reproducible), else today."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "")
    when = (datetime.datetime.fromtimestamp(int(epoch), datetime.UTC) if epoch.isdigit()
            else datetime.datetime.now(datetime.UTC))
    return when.date().isoformat()


def _esc(text: str) -> str:
    """Text safe in roff: backslashes, and a leading dot or quote."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text[:1] in (".", "'") else text


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _help_of(p: argparse.ArgumentParser, name: str) -> str:
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                if choice.dest == name:
                    return choice.help or ""
    return ""


def commands(p: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
             ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser, str]]:
    """Every leaf command: (words, its parser, its one-line help)."""
    for name, sub in _subparsers(p).items():
        words = (*prefix, name)
        if _subparsers(sub):
            yield from commands(sub, words)
        else:
            yield words, sub, _help_of(p, name)


def _options(p: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    for action in p._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        yield action


def _option_lines(action: argparse.Action) -> list[str]:
    if action.option_strings:
        names = ", ".join(f"\\fB{_esc(o)}\\fR" for o in action.option_strings)
        if action.nargs != 0:
            names += f" \\fI{_esc(str(action.metavar or action.dest.upper()))}\\fR"
    else:
        names = f"\\fI{_esc(str(action.metavar or action.dest))}\\fR"
    text = (action.help or "").replace("%(default)s", str(action.default))
    return [".TP", names, _esc(text)]


def ipvs_synproxy_page(parser: argparse.ArgumentParser, version: str) -> str:
    today = _date()
    out = [f'.TH IPVS\\-SYNPROXY 8 "{today}" "{_esc(version)}" "System Administration"',
           ".SH NAME", "ipvs\\-synproxy \\- " + _esc(parser.description or ""),
           ".SH SYNOPSIS", "\\fBipvs\\-synproxy\\fR [\\fB\\-\\-version\\fR] "
           "\\fICOMMAND\\fR [\\fIOPTIONS\\fR]",
           ".SH DESCRIPTION",
           "FULLNAT forwarding and a SYN proxy for Linux IPVS. The commands build the "
           "patched modules, validate and apply the declarative config file "
           "(/etc/ipvs\\-synproxy/ipvs.yaml), restore the table an apply replaced, show "
           "counters and sysctls, render keepalived.conf, run the ops console, and "
           "(\\fBadm\\fR) take ipvsadm's own command line. The operator guide "
           "(docs/operator\\-guide.md) explains each in depth.",
           ".SH COMMANDS"]
    for words, sub, help_text in commands(parser):
        out += [".SS " + _esc(" ".join(words)), _esc(sub.description or help_text)]
        for action in _options(sub):
            out += _option_lines(action)
    out += [".SH EXIT STATUS",
            "0 success; 1 the kernel refused, an apply failed and was rolled back, a check "
            "failed or the apply lock is held; 2 bad input (an invalid or mistaken config "
            "file, a bad option). \\fBdiff \\-\\-exit\\-code\\fR: 0 in sync, 1 differs, "
            "2 error.",
            ".SH FILES",
            ".TP", "/etc/ipvs\\-synproxy/ipvs.yaml", "the config file apply reads at boot",
            ".TP", "/var/lib/ipvs\\-synproxy/",
            "the apply lock and the tables saved before each apply (restore)",
            ".TP", "/var/cache/ipvs\\-synproxy/", "what the build commands cache",
            ".SH SEE ALSO", ", ".join(f"\\fB{_esc(s.split('(')[0])}\\fR({s.split('(')[1]}"
                                      for s in SEE_ALSO if not s.startswith("ipvs-synproxy"))]
    return "\n".join(out) + "\n"


def ipvsadm_sp_page(version: str) -> str:
    today = _date()
    usage = adm.usage_text("ipvsadm-sp").split("Usage:\n", 1)[1]
    out = [f'.TH IPVSADM\\-SP 8 "{today}" "{_esc(version)}" "System Administration"',
           ".SH NAME", "ipvsadm\\-sp \\- ipvsadm 1.31 for the ipvs\\-synproxy modules",
           ".SH SYNOPSIS", ".nf", *(_esc(ln.strip()) for ln in usage.split("\n\n")[0]
                                   .splitlines()), ".fi",
           ".SH DESCRIPTION",
           "Takes upstream ipvsadm 1.31's command line and prints its listing and save "
           "formats byte for byte, so that scripts written for ipvsadm keep working. "
           "Commands and options not listed under EXTENSIONS are ipvsadm's: see "
           "\\fBipvsadm\\fR(8). Usage errors exit 2 (ipvsadm uses 255 for some); "
           "\\fB\\-R\\fR checks every line before applying any.",
           ".SH OPTIONS"]
    for long_name, short_name, takes in cmdline.option_table():
        short = f"\\fB\\-{_esc(short_name)}\\fR, " if short_name else ""
        arg = {"required": " \\fIARG\\fR", "optional": " [\\fIARG\\fR]"}.get(takes, "")
        out += [".TP", f"{short}\\fB\\-\\-{_esc(long_name)}\\fR{arg}"]
    out += [".SH EXTENSIONS", ".nf"]
    out += [_esc(ln) for ln in usage.split("ipvs-synproxy extensions:\n", 1)[1].splitlines()]
    out += [".fi", ".SH SEE ALSO", "\\fBipvsadm\\fR(8), \\fBipvs\\-synproxy\\fR(8)"]
    return "\n".join(out) + "\n"


def bash_completion(parser: argparse.ArgumentParser) -> str:
    """Completion for ipvs-synproxy (its command tree and options) and
    ipvsadm-sp (ipvsadm's options)."""
    cases = []
    for words, sub, _ in commands(parser):
        opts = sorted(o for a in _options(sub) for o in a.option_strings)
        cases.append(f'        "{" ".join(words)}") opts="{" ".join(opts)}" ;;')
    groups: dict[str, list[str]] = {}
    for words, _, _ in commands(parser):
        if len(words) > 1:
            groups.setdefault(words[0], []).append(words[1])
    top = sorted(_subparsers(parser))
    group_cases = [f'        {g}) words="{" ".join(sorted(v))}" ;;' for g, v in groups.items()]
    adm_opts = sorted({f"--{n}" for n, _, _ in cmdline.option_table()}
                      | {f"-{s}" for _, s, _ in cmdline.option_table() if s})
    nl = "\n"
    return f"""# bash completion for ipvs-synproxy and ipvsadm-sp
# generated by: ipvs-synproxy completion bash
_ipvs_synproxy() {{
    local cur words cmd opts
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    if [[ $COMP_CWORD -eq 1 ]]; then
        COMPREPLY=($(compgen -W "{' '.join(top)} --version --help" -- "$cur"))
        return
    fi
    if [[ $COMP_CWORD -eq 2 ]]; then
        words=""
        case "${{COMP_WORDS[1]}}" in
{nl.join(group_cases)}
        esac
        if [[ -n "$words" ]]; then
            COMPREPLY=($(compgen -W "$words" -- "$cur"))
            return
        fi
    fi
    cmd="${{COMP_WORDS[1]}}"
    case "$cmd" in
        {'|'.join(sorted(groups)) or '-'}) cmd="$cmd ${{COMP_WORDS[2]}}" ;;
    esac
    opts=""
    case "$cmd" in
{nl.join(cases)}
    esac
    if [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "$opts --help" -- "$cur"))
    else
        COMPREPLY=($(compgen -f -- "$cur"))
    fi
}}
complete -F _ipvs_synproxy ipvs-synproxy

_ipvsadm_sp() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}"
    COMPREPLY=($(compgen -W "{' '.join(adm_opts)}" -- "$cur"))
}}
complete -F _ipvsadm_sp ipvsadm-sp
"""
