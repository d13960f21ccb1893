"""Issue 21, point 8: `--help` read in a file or a pipe (not a terminal) shows every option
name whole and the `--config` help its TOML section names."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from support.cli import command_options


def _help(command: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "TERMINAL_WIDTH")}
    res = subprocess.run(
        [sys.executable, "-m", "fedclip_edge.cli", *command.split(), "--help"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.mark.parametrize("command", ["aggregate", "agent", "demo", "status"])
def test_no_option_name_is_cut_when_help_goes_to_a_pipe(command: str) -> None:
    text = _help(command)
    names = {o for o in command_options()[command] if o.startswith("--")}
    cut = [ln for ln in text.splitlines() if "…" in ln]
    assert not cut, f"fedclip-edge {command} --help cuts text:\n" + "\n".join(cut)
    missing = [n for n in names if n not in text]
    assert not missing, f"option names not shown whole: {missing}"


def test_config_help_names_the_toml_sections() -> None:
    text = " ".join(_help("aggregate").split())
    assert "[broker] [job] [train] [aggregator] [agent] [demo]" in text.replace("│ ", "")

