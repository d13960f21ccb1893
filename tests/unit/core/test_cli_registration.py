"""The command tree is built once per process: typer appends on every registration, and each
in-process `main()` had added every part's commands again (the unit suite's later CLI tests
took 19 s where they take 3 s alone)."""

from __future__ import annotations

from fedclip_edge import cli


def test_main_called_again_registers_nothing_again(capsys) -> None:
    assert cli.main(["keys", "--help"]) == 0
    commands, groups = len(cli.app.registered_commands), len(cli.app.registered_groups)
    for _ in range(3):
        assert cli.main(["keys", "--help"]) == 0
    capsys.readouterr()
    assert (len(cli.app.registered_commands), len(cli.app.registered_groups)) == (commands, groups)
    names = [c.name for c in cli.app.registered_commands]
    assert len(names) == len(set(names)), names
