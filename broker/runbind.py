"""Job runs: every signed message belongs to one run of its job, so nothing replays across runs.

Why: a signature binds a message to its sender, job, round and type, but a job id is reused
(`aggregate --job J` again with a fresh --out, another seed): before runs, the signed hello and
updates of a device from the first run, replayed into the second, committed its rounds with a
device that was not running, and the first run's signed `done` made agents exit.

The protocol (docs/protocol.md, "Runs"):

- The aggregator makes a run id at job start (`new_run_id`), keeps it in state.json (`--resume`
  keeps it) and puts it in every global and control it signs. Its retained `running` control,
  published before it waits for devices, tells devices the run before the first global.
- A device signs its hellos, statuses and updates for the run of the newest signed global or
  control it holds (an update: the run of the global it answers). Its first hello, before it
  saw any, carries none; it says hello again, for the run, as soon as it learns one.
- The aggregator counts a device online only from a hello or status of ITS run: one of another
  run is a counted rejection (`run`), one with no run is not an error (a device's first hello)
  but puts nobody online. An update of another run (or none, when signed) is refused (`run`).
- An agent ignores (one line) a control or global of an older run than the one it holds, and
  starts a newer run afresh (no round work of the old run is sent into it).

A run id is `<start, 10 hex digits of unix seconds>-<16 random hex digits>` (`secrets`): nobody
can predict it, and ids of one job order by start, so an agent tells a newer run (start it)
from an older one (a replay: ignore it) without remembering every run it left. Unsigned jobs
accept messages with no run (older peers); their runs bind nothing against a forger anyway.
"""

from __future__ import annotations

import re
import secrets
import time

from fedclip_edge.broker.envelope import MessageRejected

RUN_RE = re.compile(r"^[0-9a-f]{10}-[0-9a-f]{16}$")
SAME, NEWER, OLDER = "same", "newer", "older"


def new_run_id(now: float | None = None) -> str:
    """A fresh run id: the start time (for ordering) and 64 random bits."""
    start = int(time.time() if now is None else now)
    return f"{start:010x}-{secrets.token_hex(8)}"


def is_run_id(run: object) -> bool:
    return isinstance(run, str) and bool(RUN_RE.match(run))


def compare(held: str, got: str) -> str:
    """Where run `got` stands against the run `held` (SAME, NEWER or OLDER).

    Ids of the same shape order by their start (then by their random part: two runs started in
    the same second still order, the same way everywhere); no run, or a malformed one, is older
    than any run."""
    if got == held:
        return SAME
    if not is_run_id(got):
        return OLDER
    if not is_run_id(held):
        return NEWER
    return NEWER if got > held else OLDER  # fixed-width hex: string order is time order


def check_run(what: str, got: str, this: str, signed: bool) -> None:
    """An update (or a device's status) must carry this job's run; `MessageRejected("run")`
    otherwise. Unsigned jobs let a message without a run through (older peers)."""
    if got == this or (not got and not signed):
        return
    if not got:
        raise MessageRejected(
            "run", f"{what} signed for no run, this job's run is {this} (a replay from before "
            "runs, or a device older than this aggregator)")
    raise MessageRejected(
        "run", f"{what} signed for run {got}, this job's run is {this} (a replay from another "
        "run)" if signed else f"{what} for run {got}, this job's run is {this} (another run's)")


def status_binds(got: str, this: str, signed: bool) -> bool:
    """Whether a hello/status counts its device online in run `this`: True for this run (or no
    run in an unsigned job), False for no run (a first hello: not an error, nobody online);
    `MessageRejected("run")` for another run."""
    if got == this or (not got and not signed):
        return True
    if not got:
        return False
    check_run("status", got, this, signed)
    return False  # not reached: another run raises above
