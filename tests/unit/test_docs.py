"""The man pages and the bash completion are made from the parsers: every
command and option is in them, groff renders the pages without a warning and
bash reads the completion script and completes from it."""

from __future__ import annotations

import subprocess

import pytest

from ipvs_synproxy.adm import cmdline
from ipvs_synproxy.cli import docs
from ipvs_synproxy.cli import main as cli


def _page(name: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert cli.main(["man", name]) == 0
    return capsys.readouterr().out


def _plain(roff: str) -> str:
    return roff.replace("\\-", "-").replace("\\fB", "").replace("\\fR", "").replace("\\fI", "")


def test_the_man_page_has_every_command_and_option(capsys: pytest.CaptureFixture[str]) -> None:
    text = _plain(_page("ipvs-synproxy", capsys))
    leaves = list(docs.commands(cli.build_parser()))
    assert len(leaves) > 15
    for words, sub, _ in leaves:
        assert f".SS {' '.join(words)}\n" in text, words
        for action in sub._actions:
            for opt in action.option_strings:
                if opt not in ("-h", "--help"):
                    assert opt in text, (words, opt)
    for words in (("apply",), ("restore",), ("check",), ("kmod", "dkms-tree")):
        assert words in [w for w, _, _ in leaves]


def test_the_ipvsadm_sp_page_has_every_ipvsadm_option(
        capsys: pytest.CaptureFixture[str]) -> None:
    text = _plain(_page("ipvsadm-sp", capsys))
    for name, short, _ in cmdline.option_table():
        assert f"--{name}" in text and (short is None or f"-{short}, --{name}" in text), name
    assert "--laddr-add" in text and "--fullnat" in text


@pytest.mark.parametrize("name", ["ipvs-synproxy", "ipvsadm-sp"])
def test_groff_renders_the_pages_without_a_warning(
        name: str, capsys: pytest.CaptureFixture[str]) -> None:
    roff = _page(name, capsys)
    res = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z"], input=roff, text=True,
                         capture_output=True, check=False)
    assert res.returncode == 0 and res.stderr == "", res.stderr


def _complete(script: str, words: list[str], func: str = "_ipvs_synproxy") -> list[str]:
    line = " ".join(f"'{w}'" for w in words)
    res = subprocess.run(
        ["bash", "-c", f'source /dev/stdin; COMP_WORDS=({line}); '
                       f'COMP_CWORD={len(words) - 1}; {func}; printf "%s\\n" "${{COMPREPLY[@]}}"'],
        input=script, text=True, capture_output=True, check=True)
    return res.stdout.split()


def test_bash_completes_commands_and_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["completion", "bash"]) == 0
    script = capsys.readouterr().out
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    assert "apply" in _complete(script, ["ipvs-synproxy", "ap"])
    assert _complete(script, ["ipvs-synproxy", "kmod", ""]) == \
        ["build", "build-toa", "checkpatch", "dkms-tree"]
    assert _complete(script, ["ipvs-synproxy", "apply", "--pr"]) == ["--prune"]
    assert _complete(script, ["ipvs-synproxy", "diff", "lb.yaml", "--e"]) == ["--exit-code"]
    assert _complete(script, ["ipvs-synproxy", "sysctl", "get", "--d"]) == ["--describe"]
    assert "--install-deps" in _complete(script, ["ipvs-synproxy", "kmod", "build", "--"])
    assert _complete(script, ["ipvsadm-sp", "--laddr-"], "_ipvsadm_sp") == \
        ["--laddr-add", "--laddr-del", "--laddr-list"]
