"""Runs a typer app or one command so that a user's mistake is one line and an exit code.

A leaf module (it imports nothing of ours but the error family), so every folder's `cli.py` and
`python -m` entry point can use it without importing the main CLI.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import click
import typer

from fedclip_edge.errors import FedClipError

# Recent typer carries its own copy of click (typer._click) with its own exception classes;
# older typer raises click's. Catch both, so a usage error is one message, not a traceback.
try:
    from typer._click.exceptions import ClickException as _TyperClickException
except ImportError:  # pragma: no cover - depends on the installed typer
    _TyperClickException = click.ClickException
_EXIT = (click.exceptions.Exit, getattr(typer, "Exit", click.exceptions.Exit))
_USAGE = (click.ClickException, _TyperClickException)
_ABORT = (click.exceptions.Abort, getattr(typer, "Abort", click.exceptions.Abort))

# Options that take several values after one flag (`--seeds 0 1 2`), as users type them.
MULTI_VALUE_OPTIONS = {"--seeds", "--domains", "--batch", "--backends"}

def expand_multi_values(argv: list[str]) -> list[str]:
    """`--seeds 0 1 2` -> `--seeds 0 --seeds 1 --seeds 2` (click wants one value per flag)."""
    out: list[str] = []
    current: str | None = None
    for arg in argv:
        if arg.startswith("-"):
            current = arg if arg in MULTI_VALUE_OPTIONS else None
            out.append(arg)
        elif current is not None and out and out[-1] != current and not out[-1].startswith("-"):
            out.extend([current, arg])
        else:
            out.append(arg)
    return out


INTERRUPTED = (
    "interrupted: what was finished is kept (caches and checkpoints are written atomically); "
    "re-run to continue"
)


def run_app(
    application: typer.Typer, argv: list[str] | None, prog_name: str, interrupted: str = INTERRUPTED
) -> int:
    """Run a typer app; a user's mistake becomes one clear line and an exit code."""
    args = expand_multi_values(list(sys.argv[1:] if argv is None else argv))
    try:
        # Recent typer returns an Exit's code (and 130 for Ctrl-C) instead of raising it; no
        # command returns a value, so a non-zero int here is an exit status.
        rv = application(args=args, prog_name=prog_name, standalone_mode=False)
        if isinstance(rv, int) and not isinstance(rv, bool) and rv != 0:
            if rv == 130:
                print(interrupted, file=sys.stderr)
            return rv
    except _EXIT as exc:
        return exc.exit_code
    except _USAGE as exc:
        exc.show()
        return exc.exit_code
    except _ABORT:
        print("aborted", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    except FedClipError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


def run_command(
    command: Callable[..., Any],
    argv: list[str] | None = None,
    prog_name: str = "fedclip-edge",
    interrupted: str = INTERRUPTED,
) -> int:
    """`python -m` entry of one command (agents and aggregator run as their own processes),
    with the same error handling as the main CLI."""
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    single.command()(command)
    return run_app(single, argv, prog_name, interrupted)


