"""Differential privacy of adapter updates, pure on dicts of tensors.

The unit of privacy is a device (user-level DP): its whole update delta (every tensor of the
adapter state together) is clipped to L2 norm C, so adding or removing one device moves the sum
of clipped deltas by at most C; Gaussian noise of std z*C on that sum is the Gaussian mechanism
with noise multiplier z, which `accountant.py` turns into (epsilon, delta). DP-FedAvg
(McMahan et al. 2018) divides the noised sum by the *expected* number of devices, not the
number that answered: dividing by a data-dependent count would leak it.

Every random draw takes a `torch.Generator`, so tests and simulations are reproducible. A
device or an aggregator protecting real data must seed it unpredictably (`secure_generator`):
noise an observer can regenerate is no noise.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

State = dict[str, torch.Tensor]


def secure_generator() -> torch.Generator:
    """A generator seeded from the OS's randomness (for noise that protects real data)."""
    return torch.Generator().manual_seed(secrets.randbits(63))


def _check_nonneg(name: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")


def delta_of(local: Mapping[str, torch.Tensor], glob: Mapping[str, torch.Tensor]) -> State:
    """local - global, per tensor, in float32 (the update a device's data shaped)."""
    if set(local) != set(glob):
        raise ValueError(f"local and global adapters have different tensors: "
                         f"{sorted(set(local) ^ set(glob))}")
    return {k: local[k].detach().float() - glob[k].detach().float() for k in local}


def apply_delta(glob: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> State:
    """global + delta, in each global tensor's dtype."""
    return {k: (glob[k].float() + delta[k]).to(glob[k].dtype) for k in glob}


def l2_norm(delta: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm over all tensors together (in float64: a sum of many squares)."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in delta.values()))


def clip_delta(delta: Mapping[str, torch.Tensor], clip: float) -> tuple[State, float]:
    """Scale the whole delta by min(1, C / ||delta||): its L2 norm becomes at most C and its
    direction is kept. Returns the clipped delta and the norm before clipping (adaptive
    clipping counts how many norms were under C)."""
    _check_nonneg("clip norm", clip)
    norm = l2_norm(delta)
    scale = 1.0 if norm <= clip else clip / norm
    return {k: t.float() * scale for k, t in delta.items()}, norm


def add_gaussian_noise(values: Mapping[str, torch.Tensor], std: float,
                       generator: torch.Generator) -> State:
    """values + N(0, std^2) independently on every coordinate."""
    _check_nonneg("noise std", std)
    out = {}
    for k in sorted(values):  # a fixed order: the same generator gives the same noise
        t = values[k].float()
        noise = torch.randn(t.shape, generator=generator, dtype=torch.float32)
        out[k] = t + std * noise
    return out


def privatize_delta(delta: Mapping[str, torch.Tensor], clip: float, noise_multiplier: float,
                    generator: torch.Generator) -> tuple[State, float]:
    """Local DP on one device: clip to C, then add N(0, (z*C)^2) per coordinate. Returns the
    noised delta and the norm before clipping."""
    _check_nonneg("noise multiplier", noise_multiplier)
    clipped, norm = clip_delta(delta, clip)
    return add_gaussian_noise(clipped, noise_multiplier * clip, generator), norm


def sum_deltas(deltas: Iterable[Mapping[str, torch.Tensor]]) -> State:
    total: State = {}
    for d in deltas:
        for k, t in d.items():
            total[k] = total[k] + t.float() if k in total else t.float().clone()
    if not total:
        raise ValueError("no updates to sum")
    return total


def dp_fedavg_mean(deltas: list[Mapping[str, torch.Tensor]], clip: float,
                   noise_multiplier: float, expected_count: float,
                   generator: torch.Generator) -> State:
    """Central DP-FedAvg: clip each delta to C, sum, add N(0, (z*C)^2), divide by the expected
    number of devices per round (sampling rate x population), a constant: the noised mean then
    has sensitivity C / expected_count whatever the round's actual count."""
    if not expected_count > 0:
        raise ValueError(f"expected device count must be > 0, got {expected_count}")
    _check_nonneg("noise multiplier", noise_multiplier)
    total = sum_deltas(clip_delta(d, clip)[0] for d in deltas)
    noised = add_gaussian_noise(total, noise_multiplier * clip, generator)
    return {k: t / expected_count for k, t in noised.items()}


def split_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """Andrew et al. 2021, Theorem 1: adaptive clipping releases a noised count too; to keep the
    overall noise multiplier z, the deltas' sum gets z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2).
    Refuses a count noise too small for z (the budget would all go to the count)."""
    if noise_multiplier <= 0 or count_stddev <= 0:
        raise ValueError("adaptive clipping needs a noise multiplier > 0 and a count noise > 0")
    rest = noise_multiplier ** -2 - (2 * count_stddev) ** -2
    if rest <= 0:
        raise ValueError(f"count noise std {count_stddev} is too small for noise multiplier "
                         f"{noise_multiplier}: it needs more than {1 / (2 * noise_multiplier):g}")
    return rest ** -0.5


@dataclass
class AdaptiveClip:
    """Adaptive clipping toward a target quantile (Andrew et al., NeurIPS 2021, Algorithm 1).

    Each round every device reports b_i = 1 if its delta's norm is <= C (before clipping); the
    server noises the count, sum b_i + N(0, count_stddev^2), divides by the expected count
    to get b~, and moves C geometrically: C <- C * exp(-lr * (b~ - target)). With the target
    quantile 0.5 C tracks the median norm; the noised count keeps the clip itself private.
    """

    clip: float
    target_quantile: float = 0.5
    lr: float = 0.2  # eta_C: the paper's geometric learning rate
    count_stddev: float = 0.0  # sigma_b; the paper suggests expected_count / 20

    def __post_init__(self) -> None:
        if not self.clip > 0:
            raise ValueError(f"initial clip must be > 0, got {self.clip}")
        if not 0.0 <= self.target_quantile <= 1.0:
            raise ValueError(f"target quantile must be in [0, 1], got {self.target_quantile}")
        _check_nonneg("clip learning rate", self.lr)
        _check_nonneg("count noise std", self.count_stddev)

    def update(self, norms: Iterable[float], expected_count: float,
               generator: torch.Generator) -> float:
        """One round: the new clip from this round's unclipped norms; returns it."""
        if not expected_count > 0:
            raise ValueError(f"expected device count must be > 0, got {expected_count}")
        count = float(sum(1 for n in norms if n <= self.clip))
        if self.count_stddev > 0:
            count += self.count_stddev * float(
                torch.randn((), generator=generator, dtype=torch.float64))
        fraction = count / expected_count
        self.clip = self.clip * math.exp(-self.lr * (fraction - self.target_quantile))
        return self.clip
