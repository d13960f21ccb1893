"""Children that Ctrl-C tests interrupt.

Why: a background job of a non-interactive shell (`cmd &` in a script, `nohup ... &`, some CI
runners) starts with SIGINT ignored, every process it starts inherits that, and Python then does
not turn SIGINT into KeyboardInterrupt. A test that sends SIGINT to a child it started from such
a run waited for nothing (seen under `scripts/faults-under-load.sh`: the aggregator's stacks
showed it still waiting for devices a minute after the signal). The tests' children get SIGINT's
default back, as a terminal's Ctrl-C would find it.
"""

from __future__ import annotations

import signal


def ctrl_c_enabled() -> None:
    """`preexec_fn` for a child that a test will SIGINT: SIGINT back to its default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
