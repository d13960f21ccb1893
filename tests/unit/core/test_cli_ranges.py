"""Every number on the command line has a range checked at parse time (issue 22, item 8).

A value out of range is one `error:` line naming the option, exit 2, nothing run; the inputs the
red team found (6 tracebacks, 2 accepted values) each get their line here. Run in process
through `main()` (the same runner the installed command and `python -m` use).
"""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import typer.main

from fedclip_edge import cli, cli_ranges
from fedclip_edge.broker import protocol as P


def _commands() -> list[tuple[str, typing.Any]]:
    cli._register_parts()
    out = []
    stack = [("", typer.main.get_command(cli.app))]
    while stack:
        path, cmd = stack.pop()
        subs = getattr(cmd, "commands", None)
        if subs:
            stack.extend((f"{path} {n}".strip(), c) for n, c in subs.items())
        else:
            out.append((path, cmd))
    return out


def _number_options() -> list[tuple[str, str, typing.Any]]:
    found = []
    for path, cmd in _commands():
        for p in cmd.params:
            ann = p.type_descriptor.annotation
            if any(t in (int, float) for t in (typing.get_args(ann) or (ann,))):
                found.append((path, p.opts[0], p))
    return found


def test_every_number_option_has_a_range() -> None:
    options = _number_options()
    assert len(options) > 80  # the walk finds them (87 when written)
    open_ended = [f"{c} {o}" for c, o, p in options if p.min is None or p.max is None]
    assert open_ended == []


def test_the_rounds_limit_is_the_protocols() -> None:
    assert cli_ranges.ROUNDS["max"] == P.MAX_ROUND
    rounds = [p for c, o, p in _number_options() if o == "--rounds"]
    assert rounds and all(p.max == P.MAX_ROUND for p in rounds)


def _one_error_line(capsys: pytest.CaptureFixture[str], argv: list[str], *needles: str) -> int:
    rc = cli.main(argv)
    captured = capsys.readouterr()
    both = captured.out + captured.err
    assert rc not in (0, 130), both
    assert "Traceback" not in both, both
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, both
    assert captured.err.strip() == errors[0], both  # nothing but that line
    for needle in needles:
        assert needle in errors[0], errors[0]
    return rc


NO_BROKER = ["--broker", "mqtt://127.0.0.1:1", "--job", "j"]


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["features", "--data", "D", "--out", "O", "--batch-size", "0"], ["'--batch-size'"]),
        (["aggregate", *NO_BROKER, "--out", "O", "--rounds", "1", "--dim", "-4"], ["'--dim'"]),
        (["aggregate", *NO_BROKER, "--out", "O", "--rounds", "1", "--seed", str(2**70)],
         ["'--seed'"]),
        (["agent", *NO_BROKER, "--client-id", "a", "--data", "D", "--artifacts", "A",
          "--max-payload", "-1"], ["'--max-payload'"]),
        # accepted before: 0 ran one round, 10**30 is above the protocol's round limit
        (["aggregate", *NO_BROKER, "--out", "O", "--rounds", "0"], ["'--rounds'"]),
        (["aggregate", *NO_BROKER, "--out", "O", "--rounds", str(10**30)],
         ["'--rounds'", str(P.MAX_ROUND)]),
        (["simulate", "--test-domain", "photo", "--out", "O", "--features", "F", "--seeds", "0",
          "-1"], ["'--seeds'"]),
        (["bench", "fedavg", "--data", "D", "--out", "O", "--rounds", "0"], ["'--rounds'"]),
    ],
)
def test_out_of_range_numbers_are_one_line_before_anything_runs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str], needles: list[str]
) -> None:
    argv = [str(tmp_path / a) if a in ("D", "O", "F", "A") else a for a in argv]
    assert _one_error_line(capsys, argv, *needles) == 2
    assert not (tmp_path / "O").exists()  # nothing ran


def test_a_config_files_out_of_range_number_is_refused_too(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cfg = tmp_path / "job.toml"
    cfg.write_text('[job]\nid = "j"\nrounds = 0\n[broker]\nurl = "mqtt://127.0.0.1:1"\n')
    _one_error_line(capsys, ["aggregate", "--config", str(cfg), "--out", str(tmp_path / "O")],
                    "'--rounds'")


@pytest.mark.parametrize("argv", [["data", "synth", "--per-class", "1"], ["bench", "codecs"]])
def test_an_out_folder_that_cannot_be_made_is_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    # /proc refuses new folders (the red team's input); before: FileNotFoundError traceback
    _one_error_line(capsys, [*argv, "--out", "/proc/fedclip-x"], "/proc/fedclip-x",
                    "cannot write")
