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


# ----------------------------------------------------------------------------- roles
# A site is a site because the central was told so, not because its hello says "site": a
# registered device that called itself a site and claimed `site_weight` 1e15 took FedAvg over
# (issue 22). In a signed job the central's `--site-keys` lists the sites (their keys; each key
# may speak only as a site), and each site's weight is bounded by its registration.

SITE_CLAIM = "site_claim"  # the counted reason of a refused site role or weight
DEFAULT_MAX_SITE_WEIGHT = 10_000.0  # devices (or samples) a registered site may speak for
WEIGHT_FILE_SUFFIX = ".max-weight"


class SiteRegistry:
    """The sites a central accepts, their keys and the largest weight each may claim."""

    def __init__(self, keys: Any, max_weight: Mapping[str, float] | None = None,
                 default_max: float = DEFAULT_MAX_SITE_WEIGHT) -> None:
        self.keys = keys  # a fedclip_edge.signing.KeyRegistry
        self.max_weight = dict(max_weight or {})
        self.default_max = float(default_max)

    @classmethod
    def load(cls, path: Any, default_max: float = DEFAULT_MAX_SITE_WEIGHT) -> SiteRegistry:
        """A registry as `--device-keys` reads it; in a folder, `<site>.max-weight` (a number)
        beside `<site>.pub` bounds that site's weight (else `default_max`)."""
        from pathlib import Path

        from fedclip_edge.errors import ConfigError
        from fedclip_edge.signing import KeyRegistry

        path = Path(path)
        keys = KeyRegistry.load(path)
        limits: dict[str, float] = {}
        if path.is_dir():
            for f in sorted(path.glob(f"*{WEIGHT_FILE_SUFFIX}")):
                site = f.name[: -len(WEIGHT_FILE_SUFFIX)]
                try:
                    w = float(f.read_text().strip())
                except ValueError:
                    raise ConfigError(
                        f"{f}: expected a number (the site's largest weight)") from None
                if site not in keys or not (math.isfinite(w) and w > 0):
                    raise ConfigError(f"{f}: a positive weight for a site listed in {path}")
                limits[site] = w
        return cls(keys, limits, default_max)

    def __contains__(self, site: object) -> bool:
        return site in self.keys

    def bound(self, site: str) -> float:
        return self.max_weight.get(site, self.default_max)


def check_site_role(client: str, backend: str, sites: SiteRegistry | None, signed: bool) -> None:
    """A hello that says "site" from an id the central was not given as a site is refused
    (`site_claim`); unsigned jobs (`--insecure-unsigned`) have no credentials to check."""
    if signed and backend == SITE_BACKEND and (sites is None or client not in sites):
        raise MessageRejected(
            SITE_CLAIM, f"{client} says it is a site, but it is not registered as one "
            "(the central's --site-keys)")


def check_weight_claim(client: str, is_site: bool, metrics: Mapping[str, Any], weight: float | None,
                       sites: SiteRegistry | None, signed: bool) -> None:
    """A device's update may claim no site weight; a site's weight is bounded by its
    registration. `MessageRejected(site_claim)` otherwise."""
    if not is_site:
        if WEIGHT_KEY in metrics:
            raise MessageRejected(
                SITE_CLAIM, f"device {client} claims a {WEIGHT_KEY}: only a registered site may")
        return
    if signed and sites is not None and weight is not None and weight > sites.bound(client):
        raise MessageRejected(
            SITE_CLAIM, f"site {client} claims weight {weight:g}, above the "
            f"{sites.bound(client):g} it is registered for")
