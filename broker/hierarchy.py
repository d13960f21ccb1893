"""What the central aggregator and a site aggregator agree on: how a site's update is weighted.

Why a module of its own: the central (`aggregator.py`) reads a site's weight and the site
(`site.py`) writes it; both import this, neither imports the other (no import circle).

A site sends ONE update per round: its devices' aggregate as the frame (the weighted mean with
FedAvg; the site's --strategy otherwise), and in the update's metrics the weight flat FedAvg
would give those devices together (uniform: how many answered; samples: their sample total).
The central adds that aggregate with that weight, so with FedAvg at both levels
sum_sites(W_s * mean_s) / sum_sites(W_s) is exactly the flat mean over all devices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fedclip_edge.broker.protocol import MessageRejected

SITE_BACKEND = "site"  # the `backend` of a site's hello: the central weights its updates as sites
WEIGHT_KEY = "site_weight"
DEVICES_KEY = "site_devices"
SAMPLES_KEY = "site_samples"
WEIGHTING_KEY = "site_weighting"
# what the site runs over its devices: in its hello's `versions` (strings), not in its updates'
# metrics, whose text fields a central of an earlier build refuses
STRATEGY_KEY = "site_strategy"


def site_weight_of(devices: int, samples: int, weighting: str) -> float:
    """The weight flat FedAvg gives `devices` devices holding `samples` samples together."""
    return float(devices if weighting == "uniform" else samples)


def site_metrics(devices: int, samples: int, weighting: str) -> dict[str, Any]:
    """The metrics fields a site's update carries. Whatever `strategy` the site ran over its
    devices (a robust one drops or clips bad devices), its weight is that of all the devices
    that answered: the site speaks for them."""
    return {
        WEIGHT_KEY: site_weight_of(devices, samples, weighting),
        DEVICES_KEY: int(devices),
        SAMPLES_KEY: int(samples),
        WEIGHTING_KEY: weighting,
    }


def read_site_weight(metrics: Mapping[str, Any], samples: int, weighting: str) -> float:
    """The weight of a site's update as the central checks it; `MessageRejected('fields')` when
    it is missing, not a finite positive number, computed under another weighting, or (samples
    weighting) not the sample total the update declares."""
    w = metrics.get(WEIGHT_KEY)
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
        raise MessageRejected("fields", f"a site update needs a positive {WEIGHT_KEY}, got {w!r}")
    got = metrics.get(WEIGHTING_KEY)
    if got != weighting:
        raise MessageRejected(
            "fields",
            f"site aggregated with weighting {got!r}, this job weights by {weighting!r}",
        )
    if weighting == "samples" and float(w) != float(samples):
        raise MessageRejected(
            "fields", f"site weight {w} is not the update's sample total {samples}"
        )
    devices = metrics.get(DEVICES_KEY)
    if weighting == "uniform" and (
        isinstance(devices, bool) or not isinstance(devices, int) or float(devices) != float(w)
    ):
        raise MessageRejected(
            "fields", f"site weight {w} is not the number of its devices ({devices!r})"
        )
    return float(w)
