"""Strategies across levels (sites under a central), worked out by hand on tiny tensors.

Why: FedAvg of FedAvgs is the flat FedAvg, robust rules do not compose. What each combination
means is in docs/hierarchy.md; these pin the arithmetic: a robust site strategy drops a poisoned
device before the central sees it, the central's FedAvg then weighs each site's result by its
devices' weight, a central clip clips whole sites' deltas, a central median or trimmed mean is
unweighted over sites.
"""

from __future__ import annotations

import pytest
import torch

from fedclip_edge.broker.hierarchy import read_site_weight, site_metrics
from fedclip_edge.errors import ConfigError
from fedclip_edge.strategy import (
    Clip,
    FedAvg,
    Median,
    TrimmedMean,
    make_strategy,
    over_sites_note,
    site_strategy,
)


def _w(*values: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values, dtype=torch.float32)}


def _close(got: dict[str, torch.Tensor], want: list[float]) -> None:
    assert torch.allclose(got["w"].double(), torch.tensor(want, dtype=torch.float64),
                          atol=1e-5, rtol=0), (got["w"], want)  # float32 results


# 2 sites x 3 devices, two coordinates; a3 is poisoned. (state, samples)
SITE_A = [(_w(1, 10), 10), (_w(2, 20), 20), (_w(100, 100), 30)]
SITE_B = [(_w(4, 40), 5), (_w(5, 50), 5), (_w(6, 60), 10)]
ZERO = _w(0, 0)


def _site(strategy_name: str, weighting: str, devices: list, **opts: object):
    """A site's round: its strategy over its devices, then what it sends upstream."""
    acc = site_strategy(strategy_name, weighting, opts).start_round()
    for state, n in devices:
        acc.add(state, n, ZERO)
    metrics = site_metrics(acc.count, acc.samples, weighting)
    return acc.result(), acc.samples, metrics


def _central(strategy, weighting: str, sites: list) -> dict[str, torch.Tensor]:
    acc = strategy.start_round()
    for state, samples, metrics in sites:
        acc.add(state, samples, ZERO, weight=read_site_weight(metrics, samples, weighting))
    return acc.result()


@pytest.mark.parametrize(("weighting", "want"), [
    # uniform: each site weighs its 3 devices: (3*[2,20] + 3*[5,50]) / 6
    ("uniform", [3.5, 35.0]),
    # samples: A holds 60, B 20: (60*[2,20] + 20*[5,50]) / 80
    ("samples", [2.75, 27.5]),
])
def test_site_median_drops_the_poisoned_device_central_fedavg_weighs_sites(
    weighting: str, want: list[float]
) -> None:
    a = _site("median", weighting, SITE_A)
    b = _site("median", weighting, SITE_B)
    _close(a[0], [2, 20])  # a3's 100s are gone
    _close(b[0], [5, 50])
    assert a[2]["site_weight"] == (3.0 if weighting == "uniform" else 60.0)
    _close(_central(FedAvg(weighting), weighting, [a, b]), want)
    # ... which is neither the flat FedAvg (poisoned) nor the flat median over the 6 devices
    flat = FedAvg("uniform").aggregate([*SITE_A, *SITE_B])
    _close(flat, [118 / 6, 280 / 6])
    _close(Median().aggregate([*SITE_A, *SITE_B]), [4.5, 45.0])


def test_site_trimmed_mean_and_clip_then_central_fedavg() -> None:
    # trim 1/3 of 3 devices = 1 per end: the middle one, as the median
    a = _site("trimmed-mean", "samples", SITE_A, trim=0.34)
    _close(a[0], [2, 20])
    # clip bound 50 around 0: a3's delta (norm 141.4) is scaled to norm 50, the others kept;
    # samples weighting: (10*[1,10] + 20*[2,20] + 30*[100,-100]*50/141.42) / 60
    c = _site("clip", "samples", SITE_A, bound=50.0)
    s = 50.0 / (2 ** 0.5 * 100)
    _close(c[0], [(10 + 40 + 3000 * s) / 60, (100 + 400 + 3000 * s) / 60])
    b = _site("fedavg", "samples", SITE_B)
    _close(b[0], [(20 + 25 + 60) / 20, (200 + 250 + 600) / 20])
    # central FedAvg over a trimmed site and a FedAvg site: (60*[2,20] + 20*[5.25,52.5]) / 80
    _close(_central(FedAvg("samples"), "samples", [a, b]), [2.8125, 28.125])


def test_central_clip_clips_each_sites_delta_then_weighs_sites() -> None:
    # site deltas from the global 0: A = [3,4] (norm 5, 1 device), B = [0.6,0.8] (norm 1, 3)
    a = (_w(3, 4), 1, site_metrics(1, 1, "uniform"))
    b = (_w(0.6, 0.8), 3, site_metrics(3, 3, "uniform"))
    # bound 2: A -> [1.2,1.6], B kept; weights 1 and 3: ([1.2,1.6] + 3*[0.6,0.8]) / 4
    _close(_central(Clip(2.0, "uniform"), "uniform", [a, b]), [0.75, 1.0])
    # a bound above both norms: plain weighted FedAvg over sites
    _close(_central(Clip(10.0, "uniform"), "uniform", [a, b]), [0.75 * 1.6, 1.0 * 1.6])


def test_central_median_and_trimmed_mean_are_unweighted_over_sites() -> None:
    sites = [(_w(1, 1), 100, site_metrics(100, 100, "uniform")),
             (_w(2, 3), 1, site_metrics(1, 1, "uniform")),
             (_w(10, -5), 1, site_metrics(1, 1, "uniform"))]
    # the median of 3 sites ignores that the first speaks for 100 devices
    _close(_central(Median(), "uniform", sites), [2, 1])
    _close(_central(TrimmedMean(0.34), "uniform", sites), [2, 1])
    # trim 0.2 of 3 sites would trim floor(0.6) = 0: refused, not the plain mean
    with pytest.raises(ConfigError, match="drops nothing"):
        _central(TrimmedMean(0.2), "uniform", sites)
    # whereas FedAvg weighs them: (100*[1,1] + [2,3] + [10,-5]) / 102
    _close(_central(FedAvg("uniform"), "uniform", sites), [112 / 102, 98 / 102])


def test_weights_are_checked_by_every_accumulator() -> None:
    for strategy in (FedAvg(), Clip(1.0), Median(), TrimmedMean()):
        acc = strategy.start_round()
        with pytest.raises(ValueError, match="weight"):
            acc.add(_w(1, 1), 1, ZERO, weight=-1.0)
        with pytest.raises(ValueError, match="weight"):
            acc.add(_w(1, 1), 1, ZERO, weight=float("inf"))


def test_site_strategy_under_the_jobs_weighting_and_the_central_note() -> None:
    # the coordinate-wise ones stay unweighted under samples (make_strategy alone refuses it)
    with pytest.raises(ConfigError, match="weighting"):
        make_strategy("median", weighting="samples")
    assert site_strategy("median", "samples", {"trim": None}).name == "median"
    assert site_strategy("trimmed-mean", "samples", {"trim": 0.1}).trim == 0.1
    clip = site_strategy("clip", "samples", {"bound": 3.0, "trim": None})
    assert (clip.weighting, clip.bound) == ("samples", 3.0)
    assert site_strategy("fedavg", "samples", {}).weighting == "samples"
    assert over_sites_note(FedAvg("samples")) is None
    assert "unweighted over sites" in (over_sites_note(Median()) or "")
    assert "unweighted over sites" in (over_sites_note(TrimmedMean()) or "")
    note = over_sites_note(Clip("auto")) or ""
    assert "each site's delta" in note and "half the sites" in note
    assert "half" not in (over_sites_note(Clip(1.0)) or "")
