"""Aggregation strategies. A strategy owns aggregation; it never touches a transport.

Aggregation streams: one running sum per round, not one copy of the adapter per client, so a
round with 1000 devices costs the memory of one adapter.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

WEIGHTINGS = ("uniform", "samples")


class RunningMean:
    """Weighted mean of state dicts, accumulated one update at a time in float64."""

    def __init__(self, weighting: str) -> None:
        self.weighting = weighting
        self._sum: dict[str, torch.Tensor] | None = None
        self._weight = 0.0
        self.count = 0
        self.samples = 0

    def add(
        self, state: Mapping[str, torch.Tensor], num_samples: int, weight: float | None = None
    ) -> None:
        """`weight` overrides the weighting rule: a site's partial mean stands for all the
        devices behind it (broker/site.py), so it weighs what they would together."""
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if weight is not None and not 0 <= weight < float("inf"):
            raise ValueError(f"weight must be >= 0, got {weight}")
        if weight is not None:
            w = float(weight)
        else:
            w = 1.0 if self.weighting == "uniform" else float(num_samples)
        if self._sum is None:
            self._sum = {k: _scaled64(v, w) for k, v in state.items()}
        else:
            if set(state) != set(self._sum):
                raise ValueError(
                    f"update tensors {sorted(state)} differ from the round's {sorted(self._sum)}"
                )
            for k, v in state.items():
                if v.shape != self._sum[k].shape:
                    want = list(self._sum[k].shape)
                    raise ValueError(f"tensor {k!r} has shape {list(v.shape)}, expected {want}")
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


class FedAvg:
    """FedAvg. `uniform` (the reference: 1/K per client) or `samples` (weights by sample count)."""

    name = "fedavg"

    def __init__(self, weighting: str = "uniform") -> None:
        if weighting not in WEIGHTINGS:
            raise ValueError(
                f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}"
            )
        self.weighting = weighting

    def start_round(self) -> RunningMean:
        return RunningMean(self.weighting)

    def aggregate(
        self, updates: list[tuple[Mapping[str, torch.Tensor], int]]
    ) -> dict[str, torch.Tensor]:
        """Mean of (state, num_samples) pairs."""
        acc = self.start_round()
        for state, n in updates:
            acc.add(state, n)
        return acc.result()
