"""Run the real `fedclip-edge` CLI in a subprocess with one function turned into a barrier.

`python -m support.blockrun MODULE:ATTR [AFTER] -- CLI ARGS...` replaces MODULE.ATTR (a function,
or `Class.method`) by one that lets AFTER calls through, then prints `BLOCKED MODULE:ATTR`
(flushed) and waits for a signal forever. A test reads the child's output up to that line and
then sends SIGINT: the moment is certain (the command is mid-work, cannot finish first), with no
sleeps. Everything else is the unmodified command line, signals and exit codes included.
"""

from __future__ import annotations

import importlib
import signal
import sys
from typing import Any


def install(target: str, after: int = 0) -> None:
    module_name, _, attr_path = target.partition(":")
    owner: Any = importlib.import_module(module_name)
    *parents, name = attr_path.split(".")
    for p in parents:
        owner = getattr(owner, p)
    original = getattr(owner, name)
    calls = {"n": 0}

    def barrier(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] > after:
            print(f"BLOCKED {target}", flush=True)
            while True:
                signal.pause()
        return original(*args, **kwargs)

    setattr(owner, name, barrier)


def main() -> int:
    argv = sys.argv[1:]
    split = argv.index("--")
    spec, cli_args = argv[:split], argv[split + 1 :]
    install(spec[0], int(spec[1]) if len(spec) > 1 else 0)
    from fedclip_edge.cli import main as cli_main

    return cli_main(cli_args)


if __name__ == "__main__":
    sys.exit(main())
