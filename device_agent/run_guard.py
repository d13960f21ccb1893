"""The agent's side of job runs (broker/runbind.py; docs/protocol.md "Runs").

Why apart from the loop: which run a device is in decides what it signs and which controls it
obeys, and a replay from another run must change nothing of the round work. Rules:

- a global or control of the run held: as always;
- of an OLDER run (a replay): ignored, one line, counted (`rejected["run"]`): its `done` ends
  nothing;
- of a NEWER run: the new run starts afresh (no update, outbox, cached update or final adapter
  of the old run goes into it) and the device says hello for it;
- a `done` that is the first word of a run this device did not hold yet is not obeyed alone: a
  replayed `done` of an earlier run reaches a device that has just started as easily as a
  finished job's retained one does. The run's own global confirms it (a finished job's final
  global is retained beside its `done`); a newer run's message cancels it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from fedclip_edge.broker import protocol as P
from fedclip_edge.broker.runbind import NEWER, OLDER
from fedclip_edge.broker.runbind import compare as run_compare


class RunGuard:
    """The run half of `Agent` (a mixin: the state lives on the agent)."""

    cfg: Any
    t: Any
    log: Callable[[str], None]
    rejected: Counter[str]
    job_run: str
    done: bool
    _done_heard: bool

    _status: Callable[..., None]  # the outbox's (a stub here would shadow it in the MRO)

    def _in_run(self, m: P.Control | P.GlobalModel) -> str | None:
        """Where `m`'s run stands against the one held (starting a newer run first); None
        when `m` is an older run's, ignored with one line."""
        where = run_compare(self.job_run, m.run)
        if where == OLDER:
            self.rejected["run"] += 1
            self.log(f"warning: ignored a {type(m).__name__} of run {m.run or '(none)'}: this "
                     f"device is in run {self.job_run} of job {self.cfg.job} (a replay from "
                     "another run)")
            return None
        if where == NEWER:
            self._start_run(m.run)
        return where

    def _start_run(self, run: str) -> None:
        """A new run of the job: its rounds start afresh (nothing of the old run is sent into
        it, nor signed for it), and the device says hello for it: only then is it online."""
        if self.job_run:
            self.log(f"job {self.cfg.job}: run {run} started (was {self.job_run}); round work of "
                     "the old run dropped")
        self.job_run, self._done_heard = run, False
        self.current_round = self.last_trained = -1
        self._cached = self._outbox = self._last_global_key = None
        self.final_state = self.final_global = None
        if self.t.connected:
            self._status("online", hello=True)

    def _done_confirmed(self, m: P.Control, where: str) -> bool:
        """Whether a `done` ends this device's job now (see the module docstring)."""
        if where != NEWER:
            return True
        self._done_heard = True
        self.log(f"job {self.cfg.job}: run {m.run} says done before anything else of it; "
                 "waiting for its global to confirm (a replay of an earlier run is not obeyed)")
        return False

    def _confirm_done(self, g: P.GlobalModel) -> None:
        """A global of the run whose `done` came first: the job is done indeed."""
        if self._done_heard and not self.done:
            self.log(f"job {self.cfg.job} is done (round {g.round}/{g.rounds}, run {g.run})")
            self.done = True
