"""One federated round, whoever drives it: publish the global, local training, collect, aggregate,
evaluate, select.

Why one engine: `simulate` (in process), the aggregator (updates from MQTT messages) and
`bench fedavg` (in process or over MQTT) ran the same round three times; a round feature
(codecs, strategies, privacy, a compressed global) is now written once, here or as a plug-in.

The caller owns the channel: a `Fleet` publishes the round's global and collects updates
(in process, `inprocess.py`, trains every client and hands its update over; the aggregator
answers messages). The engine owns what happens to an update from "collected" to "part of the
new global":

    open(r, global)  ->  fleet.publish  ->  fleet.collect: round.add(update) ... |
    close(round): [plug-ins: on_aggregate] strategy result -> evaluate -> select

`OpenRound.add` is the seam between collect and aggregate: every update passes each plug-in's
`on_update` (clipping for differential privacy, secure aggregation's check of a masked input)
before the strategy's accumulator takes it, one at a time, so streaming strategies keep one
adapter of memory whatever the fleet's size. `on_aggregate` sees the aggregate before it
becomes the global (DP noise on the sum, secure aggregation's unmasking); `on_close` sees the
committed result (a privacy accountant's step); `state_dict()` is what a plug-in needs saved
with the round's commit so that `--resume` continues it (an accountant, a server-side error
feedback residual). `OpenRound.previous` is the global before this round's, which a compressed
global (the change since the last round, with error feedback) is encoded against.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from fedclip_edge.strategy import Accumulator, Strategy
from fedclip_edge.wire import DEFAULT_MAX_FRAME_BYTES, Frame, decode_update

State = dict[str, torch.Tensor]


@dataclass
class Update:
    """One client's update as the strategy takes it: the FULL state (a delta frame already
    decoded against the round's global), its sample count, and an optional weight (a site's
    aggregate weighs what its devices would together)."""

    client: str
    state: Mapping[str, torch.Tensor]
    samples: int
    weight: float | None = None
    record: dict[str, Any] = field(default_factory=dict)  # what the caller reports of it


class RoundPlugin:
    """A round feature that every caller gets (see the module docstring); no-ops here."""

    def on_open(self, rnd: OpenRound) -> None:
        """The round's global is fixed; nothing is published yet."""

    def on_update(self, rnd: OpenRound, update: Update) -> Update:
        """Between collect and aggregate, once per update, in arrival order."""
        return update

    def on_aggregate(self, rnd: OpenRound, state: State) -> State:
        """The strategy's result, before it becomes the global."""
        return state

    def on_close(self, result: RoundResult) -> None:
        """The round's result is final (evaluated, selected)."""

    def state_dict(self) -> dict[str, Any]:
        """What the plug-in needs saved with the round's commit (JSON-able)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` gave (on --resume)."""


class OpenRound:
    """A round between `RoundEngine.open` and `close`: its number and global (read-only: the
    base every delta frame decodes against; another thread may read both together), the
    strategy's accumulator and who answered."""

    def __init__(
        self,
        number: int,
        global_state: Mapping[str, torch.Tensor],
        accumulator: Accumulator,
        plugins: tuple[RoundPlugin, ...] = (),
        previous: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.number = number
        self.global_state = global_state
        self.previous = previous
        self.accumulator = accumulator
        self.plugins = plugins
        self.answered: dict[str, dict[str, Any]] = {}  # client -> its record, arrival order
        self.extras: dict[str, Any] = {}  # what plug-ins keep for the round

    def decode(self, frame: bytes, *, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Frame:
        """An update frame of any codec as the full state (delta codecs add the round's
        global); `wire.FrameRejected` for anything malformed."""
        return decode_update(frame, self.global_state, max_bytes=max_bytes)

    def add(self, update: Update) -> None:
        """Take one collected update into the aggregate (after the plug-ins' `on_update`)."""
        for p in self.plugins:
            update = p.on_update(self, update)
        if update.weight is None:
            self.accumulator.add(update.state, update.samples, self.global_state)
        else:
            self.accumulator.add(
                update.state, update.samples, self.global_state, weight=update.weight
            )
        self.answered[update.client] = update.record

    @property
    def count(self) -> int:
        return self.accumulator.count

    @property
    def samples(self) -> int:
        return self.accumulator.samples

    def aggregate(self) -> State:
        """The new global: the strategy's result through the plug-ins' `on_aggregate`."""
        state = self.accumulator.result()
        for p in self.plugins:
            state = p.on_aggregate(self, state)
        return state


@dataclass
class RoundResult:
    number: int
    state: State  # the new global
    evaluation: dict[str, Any]
    answered: dict[str, dict[str, Any]]
    count: int
    samples: int
    selected: bool  # the selection rule picked this round (so far)


class Fleet(Protocol):
    """The caller's side of a round: how the global goes out and updates come back."""

    def publish(self, rnd: OpenRound) -> None: ...

    def collect(self, rnd: OpenRound) -> bool:
        """Feed `rnd.add` with the round's updates; False when too few came to aggregate."""
        ...


def better(candidate: float, best: float) -> bool:
    """Strictly higher wins, so the earliest round wins ties; a nan never wins over a number."""
    if math.isnan(candidate):
        return False
    return math.isnan(best) or candidate > best


class BestRound:
    """Selection by an evaluation figure: the round with the highest `key`, the earliest on
    ties, never a nan over a number; the first round until one beats it. Keeps that round's
    global (a copy)."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.round = 0
        self.value = float("nan")
        self.state: State | None = None

    def consider(self, rnd: int, evaluation: Mapping[str, Any], state: State) -> bool:
        value = float(evaluation[self.key])
        if self.round == 0 or better(value, self.value):
            self.round, self.value = rnd, value
            self.state = {k: v.detach().clone() for k, v in state.items()}
            return True
        return False


class LastRound:
    """Selection of the aggregator and the benchmark: the latest round is the result."""

    def __init__(self) -> None:
        self.round = 0
        self.state: State | None = None

    def consider(self, rnd: int, evaluation: Mapping[str, Any], state: State) -> bool:
        self.round, self.state = rnd, state
        return True


class Selector(Protocol):
    round: int
    state: State | None

    def consider(self, rnd: int, evaluation: Mapping[str, Any], state: State) -> bool: ...


class RoundEngine:
    """Rounds of one job: the strategy, the plug-ins, evaluation and selection, plugged in once.

    `evaluate(state)` returns the round's figures (a dict; {} when there is nothing to evaluate
    on); `select` decides which round's global is the job's result.
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        evaluate: Callable[[State], dict[str, Any]] | None = None,
        select: Selector | None = None,
        plugins: Iterable[RoundPlugin] = (),
    ) -> None:
        self.strategy = strategy
        self.evaluate = evaluate or (lambda state: {})
        self.select = select if select is not None else LastRound()
        self.plugins = tuple(plugins)
        self.previous: Mapping[str, torch.Tensor] | None = None

    def open(self, number: int, global_state: Mapping[str, torch.Tensor]) -> OpenRound:
        rnd = OpenRound(number, global_state, self.strategy.start_round(), self.plugins,
                        previous=self.previous)
        for p in self.plugins:
            p.on_open(rnd)
        return rnd

    def close(self, rnd: OpenRound, *, evaluate: bool = True) -> RoundResult:
        """Aggregate, evaluate and select; the caller then makes the result its global (and
        commits it). `evaluate=False` leaves evaluation to the caller (it times it apart)."""
        state = rnd.aggregate()
        evaluation = self.evaluate(state) if evaluate else {}
        return self.finish(rnd, state, evaluation)

    def finish(self, rnd: OpenRound, state: State, evaluation: dict[str, Any]) -> RoundResult:
        """Selection and the plug-ins' `on_close`, for a result the caller evaluated."""
        selected = self.select.consider(rnd.number, evaluation, state)
        self.previous = rnd.global_state
        result = RoundResult(rnd.number, state, evaluation, rnd.answered, rnd.count,
                             rnd.samples, selected)
        for p in self.plugins:
            p.on_close(result)
        return result

    def run_round(
        self, number: int, global_state: Mapping[str, torch.Tensor], fleet: Fleet
    ) -> RoundResult | None:
        """One whole round; None when the fleet collected too few updates."""
        rnd = self.open(number, global_state)
        fleet.publish(rnd)
        if not fleet.collect(rnd):
            return None
        return self.close(rnd)

    def plugin_state(self) -> list[dict[str, Any]]:
        """Every plug-in's `state_dict()`, in order (saved with a round's commit)."""
        return [p.state_dict() for p in self.plugins]

    def load_plugin_state(self, states: list[Mapping[str, Any]]) -> None:
        for p, s in zip(self.plugins, states, strict=False):
            p.load_state_dict(s)
