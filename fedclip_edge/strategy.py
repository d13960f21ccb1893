"""Aggregation strategies. A strategy owns aggregation; it never touches a transport.

Each strategy is a pure function of the round's updates, fed one at a time:
`acc = strategy.start_round()`, `acc.add(state, num_samples, global_state)` per update, then
`acc.result()`. FedAvg streams: one running sum per round, not one copy of the adapter per
client, so a round with 1000 devices costs the memory of one adapter. The robust strategies
bound what one client can do to the global adapter (docs/strategies.md: cost and memory of each):

- `clip`: each client's delta to the round's global is clipped to an L2 bound over the whole
  adapter, then averaged (streams with a given bound; `auto` keeps the round's deltas);
- `trimmed-mean`: coordinate-wise, drops the `trim` fraction of highest and lowest values;
- `median`: coordinate-wise median;
- `fedavg-clip` (the command line's default): FedAvg whose deltas are clipped at a multiple of
  the round's median delta norm, so one scaled update cannot take the global over, while
  honest updates (well within the multiple) average exactly as FedAvg.
"""

from __future__ import annotations

import difflib
import math
import statistics
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from fedclip_edge.errors import ConfigError

WEIGHTINGS = ("uniform", "samples")
DEFAULT_STRATEGY = "fedavg"  # the library's (the reference rule; figures are compared to it)
CLI_DEFAULT_STRATEGY = "fedavg-clip"  # what `simulate`, `demo` and `aggregate` run unless told
DEFAULT_TRIM = 0.2
# fedavg-clip: a delta is clipped above this multiple of the round's (low) median delta norm
ADAPTIVE_CLIP_MULTIPLE = 3.0
# Values (clients x columns) sorted at once by the coordinate-wise strategies: bounds their
# scratch memory (sorted values and torch.sort's int64 indices: ~48 MiB) on top of the held updates.
_SORT_SCRATCH_VALUES = 4 * 1024 * 1024

State = Mapping[str, torch.Tensor]


class Accumulator(Protocol):
    """One round of a strategy: updates in one at a time, the new global out."""

    count: int
    samples: int

    def add(
        self,
        state: State,
        num_samples: int,
        global_state: State | None = None,
        weight: float | None = None,
    ) -> None: ...

    def result(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]: ...


def _check_like(state: State, shapes: Mapping[str, torch.Size]) -> None:
    if set(state) != set(shapes):
        raise ValueError(f"update tensors {sorted(state)} differ from the round's {sorted(shapes)}")
    for k, v in state.items():
        if v.shape != shapes[k]:
            raise ValueError(f"tensor {k!r} has shape {list(v.shape)}, expected {list(shapes[k])}")


def _check_samples(num_samples: int) -> None:
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")


def _check_weight(weight: float | None) -> None:
    if weight is not None and not 0 <= weight < float("inf"):
        raise ValueError(f"weight must be >= 0, got {weight}")


def _client_weight(weighting: str, num_samples: int, weight: float | None) -> float:
    """What one update weighs: `weight` when given (a site's aggregate weighs what its devices
    would together), else 1 (uniform) or its sample count; both checked first."""
    _check_samples(num_samples)
    _check_weight(weight)
    if weight is not None:
        return float(weight)
    return 1.0 if weighting == "uniform" else float(num_samples)


class RunningMean:
    """Weighted mean of state dicts, accumulated one update at a time in float64."""

    def __init__(self, weighting: str) -> None:
        self.weighting = weighting
        self._sum: dict[str, torch.Tensor] | None = None
        self._weight = 0.0
        self.count = 0
        self.samples = 0

    def add(
        self,
        state: State,
        num_samples: int,
        global_state: State | None = None,
        weight: float | None = None,
    ) -> None:
        """`global_state` is accepted for the common accumulator API; the mean does not need it.
        `weight` overrides the weighting rule: a site's partial mean stands for all the devices
        behind it (broker/site.py), so it weighs what they would together."""
        w = _client_weight(self.weighting, num_samples, weight)
        if self._sum is None:
            self._sum = {k: _scaled64(v, w) for k, v in state.items()}
        else:
            _check_like(state, {k: v.shape for k, v in self._sum.items()})
            for k, v in state.items():
                _add_scaled(self._sum[k], v, w)
        self._weight += w
        self.count += 1
        self.samples += num_samples

    def result(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        if self._sum is None or self._weight <= 0:
            raise ValueError("no update (or only zero-sample updates) to aggregate")
        return {k: (v / self._weight).to(dtype) for k, v in self._sum.items()}


def _np(v: torch.Tensor) -> np.ndarray | None:
    """A numpy view of a CPU float32/float16 tensor, else None (torch does the work then)."""
    if v.device.type != "cpu" or v.dtype not in (torch.float32, torch.float16, torch.float64):
        return None
    return v.detach().numpy()


# numpy, not torch, for the per-update arithmetic: torch's intra-op thread pool made the
# float64 cast and add of one ViT-B-32 adapter ~85 ms on a busy 2-core machine (cProfile of
# the aggregator, issue 12), numpy's single-threaded loops take about 1 ms.
def _scaled64(v: torch.Tensor, w: float) -> torch.Tensor:
    a = _np(v)
    if a is None:
        return v.detach().to(torch.float64) * w
    return torch.from_numpy(np.multiply(a, w, dtype=np.float64))


def _add_scaled(total: torch.Tensor, v: torch.Tensor, w: float) -> None:
    a = _np(v)
    if a is None:
        total.add_(v.detach().to(torch.float64), alpha=w)
        return
    t = total.numpy()
    if w == 1.0:
        np.add(t, a, out=t, dtype=np.float64)
    else:
        np.add(t, np.multiply(a, w, dtype=np.float64), out=t)


class Strategy(ABC):
    """An aggregation rule: `start_round()` gives a fresh accumulator for each round."""

    name: ClassVar[str]

    @abstractmethod
    def start_round(self) -> Accumulator: ...

    def options(self) -> dict[str, Any]:
        """The strategy's settings, for summaries and logs."""
        return {}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **self.options()}

    def aggregate(
        self, updates: list[tuple[State, int]], global_state: State | None = None
    ) -> dict[str, torch.Tensor]:
        """The new global from (state, num_samples) pairs, in one call."""
        acc = self.start_round()
        for state, n in updates:
            acc.add(state, n, global_state)
        return acc.result()


def _check_weighting(weighting: str) -> str:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
    return weighting


class FedAvg(Strategy):
    """FedAvg. `uniform` (the reference: 1/K per client) or `samples` (weights by sample count)."""

    name = "fedavg"

    def __init__(self, weighting: str = "uniform") -> None:
        self.weighting = _check_weighting(weighting)

    def options(self) -> dict[str, Any]:
        return {"weighting": self.weighting}

    def start_round(self) -> RunningMean:
        return RunningMean(self.weighting)


# ----------------------------------------------------------------------------- clip


def _norm(delta: Mapping[str, torch.Tensor]) -> float:
    """L2 norm over the whole adapter, in float64 (float32 squares of 1e20 overflow)."""
    return math.sqrt(sum(float(torch.sum(d.to(torch.float64) ** 2)) for d in delta.values()))


class ClippedMean:
    """Deltas to the global, each clipped to an L2 `bound`, then their weighted mean added to the
    global. With a fixed bound it streams (one float64 sum); with `auto` it keeps every delta
    (float32) until `result`, since the bound (the median norm) needs them all first."""

    def __init__(
        self, weighting: str, bound: float | None, multiple: float = 1.0, low_median: bool = False
    ) -> None:
        self.weighting = weighting
        self.bound = bound  # None: auto, `multiple` x the median norm
        self.multiple = multiple
        # the low median of an even count: with two clients the honest one's norm, not the mean
        # of it and an attacker's
        self._median = statistics.median_low if low_median else statistics.median
        self._global: dict[str, torch.Tensor] | None = None
        self._sum: dict[str, torch.Tensor] | None = None
        self._held: list[tuple[dict[str, torch.Tensor], float, float]] = []  # delta, norm, weight
        self._weight = 0.0
        self.count = 0
        self.samples = 0
        self.norms: list[float] = []  # every client's delta norm, for logs
        self.clipped = 0
        self.used_bound: float | None = bound

    def add(
        self,
        state: State,
        num_samples: int,
        global_state: State | None = None,
        weight: float | None = None,
    ) -> None:
        """`weight` overrides the weighting rule, as in `RunningMean.add`: a site's aggregate
        (its delta clipped like a device's) weighs what its devices would together."""
        if global_state is None:
            raise ValueError("clip needs the round's global state to compute each client's delta")
        w = _client_weight(self.weighting, num_samples, weight)
        if self._global is None:
            self._global = {k: v.detach().to(torch.float64) for k, v in global_state.items()}
        shapes = {k: v.shape for k, v in self._global.items()}
        _check_like(global_state, shapes)
        _check_like(state, shapes)
        delta = {k: v.detach().to(torch.float64) - self._global[k] for k, v in state.items()}
        norm = _norm(delta)
        self.norms.append(norm)
        if self.bound is None:
            self._held.append(({k: d.to(torch.float32) for k, d in delta.items()}, norm, w))
        else:
            self._add_clipped(delta, norm, w, self.bound)
        self.count += 1
        self.samples += num_samples

    def _add_clipped(
        self, delta: Mapping[str, torch.Tensor], norm: float, w: float, bound: float
    ) -> None:
        scale = 1.0
        if norm > bound:
            scale = bound / norm
            self.clipped += 1
        if self._sum is None:
            self._sum = {k: torch.zeros_like(d, dtype=torch.float64) for k, d in delta.items()}
        for k, d in delta.items():
            self._sum[k].add_(d.to(torch.float64), alpha=w * scale)
        self._weight += w

    def result(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        if self.bound is None and self._held:
            self.used_bound = self.multiple * self._median([n for _, n, _ in self._held])
            self._sum, self._weight, self.clipped = None, 0.0, 0
            for delta, norm, w in self._held:
                self._add_clipped(delta, norm, w, self.used_bound)
        if self._global is None or self._sum is None or self._weight <= 0:
            raise ValueError("no update (or only zero-sample updates) to aggregate")
        return {k: (g + self._sum[k] / self._weight).to(dtype) for k, g in self._global.items()}


class Clip(Strategy):
    """Norm clipping: no client moves the global further than `bound` (L2, whole adapter)."""

    name = "clip"

    def __init__(self, bound: float | str = "auto", weighting: str = "uniform") -> None:
        self.weighting = _check_weighting(weighting)
        if bound == "auto":
            self.bound: float | None = None
        elif isinstance(bound, (int, float)) and not isinstance(bound, bool):
            if not (math.isfinite(bound) and bound > 0):
                raise ValueError(f"clip bound must be a finite number > 0 or 'auto', got {bound}")
            self.bound = float(bound)
        else:
            raise ValueError(f"clip bound must be a number > 0 or 'auto', got {bound!r}")

    def options(self) -> dict[str, Any]:
        return {"bound": "auto" if self.bound is None else self.bound, "weighting": self.weighting}

    def start_round(self) -> ClippedMean:
        return ClippedMean(self.weighting, self.bound)


class FedAvgClip(Strategy):
    """FedAvg that one scaled update cannot take over: each client's delta to the global is
    clipped at `ADAPTIVE_CLIP_MULTIPLE` x the round's low median delta norm, then weighted as
    FedAvg. Honest deltas sit well inside that bound, so on an honest fleet the result is
    FedAvg's (measured: docs/strategies.md); an update scaled x1e6 moves the global by at most
    the multiple x the median norm / K. Holds the round's deltas, as `clip` with `auto`."""

    name = "fedavg-clip"

    def __init__(self, weighting: str = "uniform") -> None:
        self.weighting = _check_weighting(weighting)

    def options(self) -> dict[str, Any]:
        return {"weighting": self.weighting, "multiple": ADAPTIVE_CLIP_MULTIPLE}

    def start_round(self) -> ClippedMean:
        return ClippedMean(self.weighting, None, ADAPTIVE_CLIP_MULTIPLE, low_median=True)


# ----------------------------------------------------------------------------- coordinate-wise


class _HeldUpdates:
    """Keeps the round's updates, flattened to float32, for the coordinate-wise strategies."""

    def __init__(self) -> None:
        self._shapes: dict[str, torch.Size] | None = None
        self._rows: list[torch.Tensor] = []
        self.count = 0
        self.samples = 0

    def add(
        self,
        state: State,
        num_samples: int,
        global_state: State | None = None,
        weight: float | None = None,
    ) -> None:
        """`global_state` is not needed: the strategy works on the states themselves. `weight`
        (a site's aggregate, broker/site.py) is checked and ignored: a rank statistic counts
        each update once, so over site aggregates these strategies are unweighted over sites
        (docs/hierarchy.md says what that means)."""
        _client_weight("uniform", num_samples, weight)  # checked, not used
        if self._shapes is None:
            self._shapes = {k: state[k].shape for k in sorted(state)}
        _check_like(state, self._shapes)
        self._rows.append(
            torch.cat([state[k].detach().to(torch.float32).reshape(-1) for k in self._shapes])
        )
        self.count += 1
        self.samples += num_samples

    def _reduce(self, sorted_block: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def result(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        if self._shapes is None or not self._rows:
            raise ValueError("no update to aggregate")
        total = self._rows[0].numel()
        out = torch.empty(total, dtype=torch.float64)
        step = max(1, _SORT_SCRATCH_VALUES // len(self._rows))
        for start in range(0, total, step):
            stop = min(start + step, total)
            block = torch.stack([r[start:stop] for r in self._rows])
            out[start:stop] = self._reduce(torch.sort(block, dim=0).values.to(torch.float64))
        result: dict[str, torch.Tensor] = {}
        offset = 0
        for k, shape in self._shapes.items():
            n = math.prod(shape)
            result[k] = out[offset : offset + n].reshape(shape).to(dtype)
            offset += n
        return result


class _TrimmedMeanRound(_HeldUpdates):
    def __init__(self, trim: float) -> None:
        super().__init__()
        self.trim = trim

    def trimmed(self) -> int:
        """Values dropped at each end per coordinate: floor(trim x clients)."""
        return math.floor(self.trim * self.count)

    def _reduce(self, sorted_block: torch.Tensor) -> torch.Tensor:
        k = self.trimmed()
        return sorted_block[k : sorted_block.shape[0] - k].mean(dim=0)

    def result(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        if self.trim > 0 and self.count and self.trimmed() == 0:
            raise ConfigError(trim_refusal(self.trim, self.count))
        return super().result(dtype)


def trim_refusal(trim: float, clients: int) -> str:
    """Why a trim that drops nothing is refused: asked to resist outliers, it would silently be
    the plain mean (trim 0.2 of 3 clients let one x1e6 update through, issue 22)."""
    least = math.ceil(100 / clients) / 100 if clients > 2 else None
    fix = f"give --trim >= {least:.2f}" if least is not None and least < 0.5 else "use median"
    return (f"trimmed-mean: trim {trim:g} drops nothing from a round of {clients} updates "
            f"(floor({trim:g} x {clients}) = 0): {fix}")


def check_round_size(strategy: Strategy, clients: int) -> None:
    """Refuse, before a job starts, a strategy that would do nothing for its smallest round
    (`clients`: the round's minimum number of updates). ConfigError, one line."""
    if isinstance(strategy, TrimmedMean) and strategy.trim > 0:
        if math.floor(strategy.trim * clients) == 0:
            raise ConfigError(trim_refusal(strategy.trim, clients))


class _MedianRound(_HeldUpdates):
    def _reduce(self, sorted_block: torch.Tensor) -> torch.Tensor:
        n = sorted_block.shape[0]
        if n % 2:
            return sorted_block[n // 2]
        return (sorted_block[n // 2 - 1] + sorted_block[n // 2]) / 2


class TrimmedMean(Strategy):
    """Coordinate-wise trimmed mean: per parameter, drop the floor(trim*K) highest and lowest
    values and average the rest (unweighted). Holds the round's updates."""

    name = "trimmed-mean"

    def __init__(self, trim: float = DEFAULT_TRIM) -> None:
        if isinstance(trim, bool) or not isinstance(trim, (int, float)) or not 0 <= trim < 0.5:
            raise ValueError(f"trim fraction must be in [0, 0.5), got {trim!r}")
        self.trim = float(trim)

    def options(self) -> dict[str, Any]:
        return {"trim": self.trim}

    def start_round(self) -> _TrimmedMeanRound:
        return _TrimmedMeanRound(self.trim)


class Median(Strategy):
    """Coordinate-wise median (even K: mean of the two middle values). Holds the round's updates."""

    name = "median"

    def start_round(self) -> _MedianRound:
        return _MedianRound()


# ----------------------------------------------------------------------------- registry

# Strategies that weigh updates (by the weighting rule, or a site's weight); the others are
# unweighted rank statistics.
WEIGHTED_STRATEGIES = ("fedavg", "clip", "fedavg-clip")

STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "clip": Clip,
    "trimmed-mean": TrimmedMean,
    "median": Median,
    "fedavg-clip": FedAvgClip,
}
# Options each strategy takes (all optional), as given on the command line.
STRATEGY_OPTIONS: dict[str, tuple[str, ...]] = {
    "fedavg": ("weighting",),
    "clip": ("bound", "weighting"),
    "trimmed-mean": ("trim",),
    "median": (),
    "fedavg-clip": ("weighting",),
}


def site_strategy(name: str, weighting: str, options: Mapping[str, Any]) -> Strategy:
    """The strategy a site aggregator runs over its devices under the central job's
    `weighting`: the weighted ones take it, the coordinate-wise ones are unweighted whatever
    it is (the weighting then only sets the site's weight upstream, broker/hierarchy.py)."""
    return make_strategy(
        name, weighting=weighting if name in WEIGHTED_STRATEGIES else None, **options
    )


def over_sites_note(strategy: Strategy) -> str | None:
    """One line saying what a central `strategy` means over site aggregates; None for FedAvg,
    which over sites weighted by their devices' weight is exactly the flat FedAvg."""
    if strategy.name == "fedavg":
        return None
    if strategy.name == "fedavg-clip":
        return (
            "strategy fedavg-clip over site aggregates: a site's delta is clipped at "
            f"{ADAPTIVE_CLIP_MULTIPLE:g}x the median of the sites' delta norms, then weighted by "
            "the site's weight; it bounds what one whole site can do (docs/hierarchy.md)"
        )
    if strategy.name == "clip":
        auto = getattr(strategy, "bound", None) is None
        return (
            "strategy clip over site aggregates: each site's delta (already its devices' "
            "aggregate) is clipped, then weighted by the site's weight; this bounds what a "
            "whole site can do, it is not the flat clip over devices"
            + (" (bound auto = the median of the sites' delta norms: about half the sites "
               "are clipped every round)" if auto else "")
            + " (docs/hierarchy.md)"
        )
    return (
        f"strategy {strategy.name} over site aggregates: unweighted over sites (each site "
        "counts once, its devices' weight is ignored); this guards against bad sites, not bad "
        "devices, and equals no flat aggregate over devices (docs/hierarchy.md)"
    )


def make_strategy(name: str, **options: Any) -> Strategy:
    """A strategy by name; `ConfigError` naming the valid names or options on a mistake.

    Options that are None are left at the strategy's default, so a CLI can pass every flag.
    `weighting` other than 'uniform' is refused for the coordinate-wise strategies, which are
    unweighted (a client's sample count is not something they could weigh a rank by).
    """
    if name not in STRATEGIES:
        close = difflib.get_close_matches(str(name), list(STRATEGIES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown strategy {name!r}{hint}; choose one of {', '.join(STRATEGIES)}")
    given = {k: v for k, v in options.items() if v is not None}
    allowed = STRATEGY_OPTIONS[name]
    if name in ("trimmed-mean", "median") and given.get("weighting", "uniform") == "uniform":
        given.pop("weighting", None)
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        takes = ", ".join(allowed) if allowed else "no options"
        raise ConfigError(f"strategy {name!r} does not take {', '.join(unknown)} (takes: {takes})")
    if name == "clip" and isinstance(given.get("bound"), str) and given["bound"] != "auto":
        try:
            given["bound"] = float(given["bound"])
        except ValueError:
            raise ConfigError(
                f"clip bound must be a number > 0 or 'auto', got {given['bound']!r}"
            ) from None
    try:
        return STRATEGIES[name](**given)
    except ValueError as exc:
        raise ConfigError(f"strategy {name!r}: {exc}") from None
