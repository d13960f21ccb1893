"""The reference protocol's per-domain split: shuffle with the seed, then 60/20/20.

The permutation is numpy's legacy ``RandomState(seed)`` shuffle of ``arange(n)``, the same one
the FedCLIP reference gets from ``np.random.seed(seed); np.random.shuffle(index)``, so train
and validation indices match the reference exactly. One deliberate difference: the reference
sizes test as ``int(0.2 * n)`` and silently drops the rounding remainder (up to two items);
here test takes the rest, so the three parts always cover every image.
"""

from __future__ import annotations

import math

import numpy as np

from fedclip_edge.errors import ConfigError


def split_indices(
    n: int, seed: int, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Disjoint (train, val, test) index arrays covering range(n), deterministic from `seed`.

    Sizes are floor(f0 * n), floor(f1 * n) and the rest; each part keeps the shuffled order.
    """
    if n < 0:
        raise ConfigError(f"cannot split a negative number of items ({n})")
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ConfigError(
            f"split fractions must be three non-negative numbers summing to 1, got {fractions}"
        )
    if not 0 <= seed < 2**32:
        raise ConfigError(f"split seed must be in [0, 2**32), got {seed}")
    order = np.random.RandomState(seed).permutation(n).astype(np.int64)
    # The epsilon keeps 0.6 * 10 == 6 even when the float product lands a hair below.
    n_train = math.floor(fractions[0] * n + 1e-9)
    n_val = math.floor(fractions[1] * n + 1e-9)
    return order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]
