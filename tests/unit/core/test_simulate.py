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


def _features(dim: int = 8, n: int = 24) -> FeatureSet:
    g = torch.Generator().manual_seed(0)
    domains = {}
    for name in ("a", "b", "c"):
        labels = torch.arange(n) % 2
        feats = torch.randn(n, dim, generator=g) + labels[:, None].float()
        domains[name] = DomainFeatures(name, feats, labels, ["x"] * n,
                                       torch.zeros(n, 32, dtype=torch.uint8))
    return FeatureSet({}, ["c0", "c1"], torch.randn(2, dim, generator=g), 10.0, domains)


def test_simulate_with_a_global_codec_counts_its_frames_and_fp32_is_unchanged():
    from fedclip_edge.config import SimulationConfig, train_config
    from fedclip_edge.simulate import simulate

    fs = _features()

    def run(codec: str, down_fraction: float | None = None) -> dict:
        cfg = SimulationConfig(test_domain="c", rounds=4, seeds=(0,),
                               train=train_config("learning"), global_codec=codec,
                               topk_fraction=0.1, global_topk_fraction=down_fraction)
        return simulate(fs, cfg, None, log=lambda line: None)

    dense, packed = run("fp32"), run("topk-int8")
    assert "global_codec" not in dense and "down_bytes_by_round" not in dense["per_seed"][0]
    frames = packed["per_seed"][0]["down_bytes_by_round"]
    assert packed["global_codec"] == "topk-int8" and len(frames) == 4
    # round 1: derived from the seed on the device, only the digest counted
    assert frames[0] == 64 and packed["per_seed"][0]["initial_global"] == "derived"
    assert all(64 < b < dense["down_bytes_per_client_per_round"] for b in frames[1:])
    assert packed["down_bytes_per_client_per_round"] == sum(frames) / 4
    # round 1 trains from the same global both ways; later rounds from the compressed one
    h0, h1 = dense["history"], packed["history"]
    assert h0[0]["train_loss"] == h1[0]["train_loss"]
    assert h0[1]["train_loss"] != h1[1]["train_loss"]
    # --global-topk-fraction sets the downlink's fraction apart from the uplink's
    wide = run("topk-int8", 0.5)
    assert wide["global_topk_fraction"] == 0.5 and packed["global_topk_fraction"] == 0.1
    assert wide["up_bytes_per_client_per_round"] == packed["up_bytes_per_client_per_round"]
    assert all(w > p for w, p in zip(wide["per_seed"][0]["down_bytes_by_round"][1:],
                                     frames[1:], strict=True))
