"""Privacy loss of DP-FedAvg, accounted by dp-accounting (Google's maintained library), not
by a formula of our own.

Each round samples devices (Poisson, rate q = devices per round / population) and releases the
sum of their clipped deltas plus Gaussian noise with noise multiplier z: the Poisson-subsampled
Gaussian mechanism, composed over the rounds. `epsilon` gives the epsilon at a delta for that
schedule with the RDP accountant (default; fast, slightly loose) or the PLD accountant (tighter,
slower); `max_rounds` is the planner: how many rounds a target epsilon allows.

A device doing local DP does not know q (its participation rate is the aggregator's business):
`local_epsilon` assumes q = 1, the Gaussian mechanism every round it takes part in, which
upper-bounds the loss whatever the real rate.

dp_accounting (and scipy under it) is imported on first use: importing this module is cheap.
"""

from __future__ import annotations

import math
from typing import Any

ACCOUNTANTS = ("rdp", "pld")
# RDP orders: the library's default grid has fractional orders near 1 whose series fail to
# converge at q ~ 0.1 (a warning each, and seconds per call); these converge and are 20x faster,
# and give epsilon within about 1% of the default grid's for the schedules FL uses.
DEFAULT_ORDERS: tuple[float, ...] = (*range(2, 65), 128, 256, 512)


def _check(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float) -> None:
    if not math.isfinite(noise_multiplier) or noise_multiplier < 0:
        raise ValueError(f"noise multiplier must be >= 0, got {noise_multiplier}")
    if not 0.0 <= sampling_rate <= 1.0:
        raise ValueError(f"sampling rate must be in [0, 1], got {sampling_rate}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"rounds must be an integer >= 0, got {rounds!r}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def sampling_rate(per_round: int, population: int) -> float:
    """q = devices per round / population (the Poisson sampling rate the accountant assumes)."""
    if population < 1 or per_round < 1 or per_round > population:
        raise ValueError(f"devices per round {per_round} must be in 1..population ({population})")
    return per_round / population


def _event(noise_multiplier: float, sampling_rate: float, rounds: int) -> Any:
    import dp_accounting

    step = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1.0:
        step = dp_accounting.PoissonSampledDpEvent(sampling_rate, step)
    return dp_accounting.SelfComposedDpEvent(step, rounds)


def make_accountant(kind: str = "rdp", orders: list[float] | None = None) -> Any:
    """A fresh dp-accounting accountant (add-or-remove-one neighbouring, the library default)."""
    if kind == "rdp":
        from dp_accounting.rdp import RdpAccountant

        return RdpAccountant(list(orders if orders is not None else DEFAULT_ORDERS))
    if kind == "pld":
        from dp_accounting.pld import PLDAccountant

        return PLDAccountant()
    raise ValueError(f"unknown accountant {kind!r}; choose one of {', '.join(ACCOUNTANTS)}")


def epsilon(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float,
            accountant: str = "rdp", orders: list[float] | None = None) -> float:
    """Epsilon at `delta` after `rounds` rounds (0 for 0 rounds; inf for z = 0)."""
    _check(noise_multiplier, sampling_rate, rounds, delta)
    if rounds == 0 or sampling_rate == 0.0:
        return 0.0
    if noise_multiplier == 0.0:
        return math.inf
    acc = make_accountant(accountant, orders)
    acc.compose(_event(noise_multiplier, sampling_rate, rounds))
    return float(acc.get_epsilon(delta))


def local_epsilon(noise_multiplier: float, rounds: int, delta: float,
                  accountant: str = "rdp") -> float:
    """A device's own epsilon after `rounds` rounds of local DP: the Gaussian mechanism each
    round with sampling rate 1 (the device cannot know how often it is picked; sampling only
    lowers the true loss)."""
    return epsilon(noise_multiplier, 1.0, rounds, delta, accountant)


def max_rounds(target_epsilon: float, noise_multiplier: float, sampling_rate: float,
               delta: float, accountant: str = "rdp", limit: int = 1_000_000) -> int:
    """The most rounds whose epsilon stays <= target_epsilon (0 when even one round exceeds
    it; `limit` when the budget outlasts it). Epsilon grows with rounds, so a doubling then a
    bisection finds the boundary in O(log rounds) accountant calls."""
    if not target_epsilon > 0:
        raise ValueError(f"target epsilon must be > 0, got {target_epsilon}")
    _check(noise_multiplier, sampling_rate, 1, delta)

    def ok(r: int) -> bool:
        return epsilon(noise_multiplier, sampling_rate, r, delta, accountant) <= target_epsilon

    if not ok(1):
        return 0
    lo, hi = 1, 2
    while hi < limit and ok(hi):
        lo, hi = hi, min(2 * hi, limit)
    if hi >= limit and ok(limit):
        return limit
    while hi - lo > 1:  # ok(lo), not ok(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def schedule_epsilon(segments: list[tuple[float, float, int]], delta: float,
                     accountant: str = "rdp") -> float:
    """Epsilon at `delta` after a schedule of (noise multiplier, sampling rate, rounds) segments
    composed in order (a job resumed with other parameters has several): one accountant over
    all of them, so the composition is the library's, not a sum of epsilons."""
    acc = make_accountant(accountant)
    composed = 0
    for z, q, r in segments:
        _check(z, q, r, delta)
        if r == 0 or q == 0.0:
            continue
        if z == 0.0:
            return math.inf
        acc.compose(_event(z, q, r))
        composed += r
    return float(acc.get_epsilon(delta)) if composed else 0.0
