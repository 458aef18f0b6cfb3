"""Command-line handling that needs no kernel."""

from __future__ import annotations

import pytest

from ipvs_synproxy.cli import main as cli


def test_vm_exec_without_a_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    assert cli.main(["vm", "exec", "--"]) == cli.EXIT_USAGE
    assert "no command given" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["vm", "exec", "--modules", "vanilla", "--", "true"],
    ["vm", "exec", "--forward", "99999", "--", "true"],
    ["vm", "exec", "--forward", "http", "--", "true"],
    ["kmod", "frobnicate"],
    [],
])
def test_bad_flags_exit_2_with_a_message(argv: list[str],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err
