"""Best-round selection as the reference does it: among trained rounds only, zero-shot reported
beside it, and the output says which round was selected. Worked out by hand."""

import math

import pytest
import torch

from fedclip_edge.config import SimulationConfig, TrainConfig
from fedclip_edge.features import DomainFeatures, FeatureSet
from fedclip_edge.simulate import result_table, select_round, selection_line, simulate

NAN = float("nan")


@pytest.mark.parametrize(
    ("vals", "expected"),
    [
        ([0.50, 0.60, 0.55], 2),
        ([0.60, 0.60, 0.59], 1),  # ties: the earliest round
        ([0.40, 0.40, 0.41], 3),
        ([NAN, 0.30, 0.30], 2),  # an empty validation never wins over a number
        ([NAN, NAN], 1),
        ([0.10], 1),
    ],
)
def test_select_round_by_hand(vals, expected):
    assert select_round(vals) == expected


def test_select_round_needs_a_trained_round():
    with pytest.raises(ValueError):
        select_round([])


def test_selection_line_says_round_and_zero_shot():
    sel = {
        "round": 7,
        "mean_val_acc": 0.52,
        "zero_shot_mean_val_acc": 0.55,
        "beats_zero_shot_on_val": False,
    }
    line = selection_line(0, 20, sel)
    assert "selected round 7/20" in line and "among the trained rounds" in line
    assert "52.0%" in line and "not above zero-shot: zero-shot 55.0%" in line


def _features(seed: int = 0) -> FeatureSet:
    """Three domains, 4 classes, features near the class prompts (zero-shot well above chance)."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(4, 8, generator=g)
    domains = {}
    for i, name in enumerate(("a", "b", "held")):
        n = 40
        labels = torch.arange(n) % 4
        feats = 3 * text[labels] + (1.5 + 0.5 * i) * torch.randn(n, 8, generator=g)
        domains[name] = DomainFeatures(
            name,
            feats,
            labels,
            [f"{name}/{k}.png" for k in range(n)],
            torch.zeros(n, 32, dtype=torch.uint8),
        )
    return FeatureSet({"model": "test"}, ["w", "x", "y", "z"], text, 10.0, domains)


def test_simulate_never_selects_the_untrained_adapter():
    """The reference setting barely moves: even when no trained round beats zero-shot on
    validation, a trained round is selected and its figures are the ones reported."""
    fs = _features()
    lines = []
    cfg = SimulationConfig(test_domain="held", rounds=3, seeds=(0,), train=TrainConfig())
    s = simulate(fs, cfg, log=lines.append)
    run = s["per_seed"][0]
    vals = [h["mean_val_acc"] for h in run["history"]]
    assert run["best_round"] == select_round(vals) >= 1
    assert run["personalization_acc"] == run["history"][run["best_round"] - 1]["test_acc"]
    assert s["generalization_acc"] == run["history"][run["best_round"] - 1]["generalization_acc"]
    sel = s["selection"]
    assert sel["round"] == run["best_round"]
    assert sel["beats_zero_shot_on_val"] == (sel["mean_val_acc"] > sel["zero_shot_mean_val_acc"])
    assert any(f"selected round {run['best_round']}/3" in line for line in lines)
    # zero-shot is reported beside the selection, for clients and the held-out domain
    assert set(run["zero_shot_test"]) == {"a", "b"} and 0 <= s["zero_shot_heldout"] <= 1
    assert s["adapter_change"]["max_abs"] > 0
    assert not math.isnan(s["adam_bound_lr_x_steps"])


def test_adam_moves_each_weight_by_at_most_about_lr_per_step():
    fs = _features()
    cfg = SimulationConfig(
        test_domain="held",
        rounds=2,
        seeds=(0,),
        train=TrainConfig(lr=1e-3, weight_decay=0.0, batch_size=8),
    )
    s = simulate(fs, cfg, log=lambda line: None)
    steps = s["per_seed"][0]["local_steps"]
    assert steps == {"a": 6, "b": 6}  # 24 training samples per client, batch 8, 2 rounds
    assert s["adam_bound_lr_x_steps"] == pytest.approx(6e-3)
    # Adam's step is about lr per weight (bias-corrected m / sqrt(v) is near 1 at most)
    assert 0 < s["adapter_change"]["max_abs"] <= 1.5 * s["adam_bound_lr_x_steps"]


def test_result_table_lists_round_clients_and_heldout():
    fs = _features()
    cfg = SimulationConfig(test_domain="held", rounds=2, seeds=(0, 1), train=TrainConfig())
    s = simulate(fs, cfg, log=lambda line: None)
    lines = result_table(s)
    rounds = ", ".join(
        f"{r['best_round']}" + ("" if r["selection"]["beats_zero_shot_on_val"] else "*")
        for r in s["per_seed"]
    )
    assert lines[0].startswith(f"selected rounds (seeds 0, 1): {rounds} of 2; rule: best mean")
    assert lines[1].split() == ["client", "zero-shot", "selected", "round", "gain"]
    assert lines[3].startswith("a ") and lines[4].startswith("b ")
    assert lines[5].startswith("held (held out)") and "±" in lines[5]
