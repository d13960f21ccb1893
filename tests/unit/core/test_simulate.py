"""The simulation honours its configured split."""

import torch

from fedclip_edge.features import DomainFeatures, FeatureSet
from fedclip_edge.simulate import _client_splits


def test_client_splits_follow_the_configured_fractions():
    n = 20
    d = DomainFeatures(
        "a",
        torch.randn(n, 4),
        torch.zeros(n, dtype=torch.long),
        ["x"] * n,
        torch.zeros(n, 32, dtype=torch.uint8),
    )
    fs = FeatureSet({}, ["c"], torch.randn(1, 4), 10.0, {"a": d})
    sizes = {k: len(v[1]) for k, v in _client_splits(fs, ["a"], 0, (0.5, 0.25, 0.25))["a"].items()}
    assert sizes == {"train": 10, "val": 5, "test": 5}
    sizes = {k: len(v[1]) for k, v in _client_splits(fs, ["a"], 0, (0.6, 0.2, 0.2))["a"].items()}
    assert sizes == {"train": 12, "val": 4, "test": 4}
