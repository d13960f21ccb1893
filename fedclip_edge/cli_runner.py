"""Runs a typer app or one command so that a user's mistake is one line and an exit code.

A leaf module (it imports nothing of ours but the error family), so every folder's `cli.py` and
`python -m` entry point can use it without importing the main CLI.
"""

from __future__ import annotations

import faulthandler
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

import click
import typer
import typer.main

from fedclip_edge.errors import FedClipError, Interrupted

# Recent typer carries its own copy of click (typer._click) with its own exception classes;
# older typer raises click's. Catch both, so a usage error is one message, not a traceback.
try:
    from typer._click.exceptions import BadParameter as _TyperBadParameter
    from typer._click.exceptions import ClickException as _TyperClickException
except ImportError:  # pragma: no cover - depends on the installed typer
    _TyperClickException = click.ClickException
    _TyperBadParameter = click.BadParameter
_EXIT = (click.exceptions.Exit, getattr(typer, "Exit", click.exceptions.Exit))
_USAGE = (click.ClickException, _TyperClickException)
_ABORT = (click.exceptions.Abort, getattr(typer, "Abort", click.exceptions.Abort))
# A value out of its range (every number option has one: fedclip_edge/cli_ranges.py) or of the
# wrong type: one `error:` line naming the option, as the library's own errors are.
_BAD_VALUE = (click.BadParameter, _TyperBadParameter)

# Options that take several values after one flag (`--seeds 0 1 2`), as users type them. The
# runner adds the list-typed options of the command it runs (`multi_value_options`), so a new
# `list[...]` option behaves like these without being listed here.
MULTI_VALUE_OPTIONS = {"--seeds", "--domains", "--batch", "--backends", "--devices"}


def expand_multi_values(argv: list[str], multi: set[str] | None = None) -> list[str]:
    """`--seeds 0 1 2` -> `--seeds 0 --seeds 1 --seeds 2` (click wants one value per flag)."""
    names = MULTI_VALUE_OPTIONS if multi is None else multi
    out: list[str] = []
    current: str | None = None
    for arg in argv:
        if arg.startswith("-") and not _is_number(arg):
            current = arg if arg in names else None
            out.append(arg)
        elif current is not None and out and out[-1] != current:
            out.extend([current, arg])  # a second value (negative numbers are values)
        else:
            out.append(arg)
    return out


# Options that take a value or none (`export --text-encoder` alone, or `--text-encoder DIR` with
# `--adapter`): alone (at the end, or before another option) they become `--opt=` (an empty
# value), which click accepts; the command reads "" as "given without a value".
OPTIONAL_VALUE_OPTIONS = {"--text-encoder"}


def expand_optional_values(argv: list[str], names: set[str] = OPTIONAL_VALUE_OPTIONS) -> list[str]:
    """`--text-encoder --out X` -> `--text-encoder= --out X`; `--text-encoder DIR` unchanged."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if arg in names and (nxt is None or (nxt.startswith("-") and not _is_number(nxt))):
            out.append(arg + "=")
        else:
            out.append(arg)
    return out


def _is_number(arg: str) -> bool:
    try:
        float(arg)
    except ValueError:
        return False
    return True


def invoked_command(command: click.Command | Any, argv: list[str]) -> click.Command | Any:
    """The (sub)command `argv` names: `models promote ...` -> the `promote` command."""
    for arg in argv:
        sub = getattr(command, "commands", {}).get(arg)
        if sub is None:
            break
        command = sub
    return command


def multi_value_options(command: click.Command | Any, argv: list[str] | None = None) -> set[str]:
    """The option names that take several values (`multiple=True`) in the command `argv`
    invokes, or in `command`'s whole tree without `argv`. Only the invoked command's: `bench
    infer --models A B` is a list, `models promote NAME --models DIR` is one folder, and
    expanding the latter's `--models` would swallow NAME."""
    names: set[str] = set()
    stack = [command if argv is None else invoked_command(command, argv)]
    while stack:
        cmd = stack.pop()
        for param in getattr(cmd, "params", ()):
            if getattr(param, "multiple", False):
                names.update(o for o in getattr(param, "opts", ()) if o.startswith("--"))
        stack.extend(getattr(cmd, "commands", {}).values())
    return names


INTERRUPTED = (
    "interrupted: what was finished is kept (caches and checkpoints are written atomically); "
    "re-run to continue"
)


def _interrupted_line(exc: BaseException, default: str) -> str:
    if isinstance(exc, Interrupted) and str(exc):
        return f"interrupted: {exc}"
    return default


def dump_stacks_on_sigusr1() -> None:
    """`kill -USR1 PID` prints every thread's Python stack to stderr and the process goes on:
    what an operator (or a test that timed out) needs to see where a process hangs."""
    if not hasattr(signal, "SIGUSR1"):
        return
    for stream in (sys.stderr, sys.__stderr__):  # a captured stderr (in-process tests) has no fd
        try:
            faulthandler.register(signal.SIGUSR1, file=stream, all_threads=True, chain=False)
            return
        except (AttributeError, ValueError, OSError):
            continue


# --help's width when stdout is not a terminal (a pipe, a file, a CI log): rich would use 80
# columns there and cut long option names ("--max-inflight…"); 120 fits every option we have.
HELP_WIDTH_NOT_A_TERMINAL = 120
_DEFAULT_MAX_WIDTH: dict[str, int | None] = {}  # typer's own MAX_WIDTH, read once


def set_help_width() -> None:
    """Give typer's help a width that never cuts an option name when it is not printed to a
    terminal; `TERMINAL_WIDTH` or `COLUMNS` still win, and so does a terminal's own width."""
    import os

    import typer.rich_utils as ru

    # decided anew on every call (in-process callers, tests): an earlier call's width never sticks
    ru.MAX_WIDTH = _DEFAULT_MAX_WIDTH.setdefault("value", ru.MAX_WIDTH)
    if os.environ.get("TERMINAL_WIDTH") or os.environ.get("COLUMNS"):
        return
    try:
        tty = sys.stdout.isatty()
    except (AttributeError, ValueError):
        tty = False
    if not tty:
        ru.MAX_WIDTH = HELP_WIDTH_NOT_A_TERMINAL


def run_app(
    application: typer.Typer, argv: list[str] | None, prog_name: str, interrupted: str = INTERRUPTED
) -> int:
    """Run a typer app; a user's mistake becomes one clear line and an exit code, Ctrl-C one
    `interrupted` line and 130.

    The click command is driven directly (not through typer's `main`), because typer turns
    Ctrl-C into `Exit(130)` and, outside standalone mode, returns that code as if it were the
    command's result, where it was lost.
    """
    dump_stacks_on_sigusr1()
    set_help_width()
    command = typer.main.get_command(application)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = expand_multi_values(argv, MULTI_VALUE_OPTIONS | multi_value_options(command, argv))
    args = expand_optional_values(args)
    try:
        try:
            with command.make_context(prog_name, args) as ctx:
                command.invoke(ctx)
        except KeyboardInterrupt as exc:
            print(_interrupted_line(exc, interrupted), file=sys.stderr, flush=True)
            return 130
        except EOFError:
            print("aborted", file=sys.stderr)
            return 1
    except _EXIT as exc:
        return exc.exit_code
    except _BAD_VALUE as exc:
        message = exc.format_message()
        print(f"error: {message[:1].lower()}{message[1:]}", file=sys.stderr)
        return exc.exit_code
    except _USAGE as exc:
        exc.show()
        return exc.exit_code
    except _ABORT:
        print("aborted", file=sys.stderr)
        return 130
    except FedClipError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        # the operating system refused (a path that cannot be written, a full disk): the user's
        # to fix, so one line naming the path, not a traceback
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
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


