"""The FedCLIP core on tiny tensors whose results can be worked out by hand."""

import math

import pytest
import torch
from torch.nn import functional as F

from fedclip_edge.adapter import AttentionAdapter, adapter_param_count
from fedclip_edge.config import TrainConfig
from fedclip_edge.errors import ConfigError
from fedclip_edge.losses import ce_loss, clip_loss
from fedclip_edge.strategy import FedAvg
from fedclip_edge.train import accuracy, predict, train_local


def test_adapter_parameter_count_matches_reference_for_vit_b_32():
    adapter = AttentionAdapter(512)
    assert sum(p.numel() for p in adapter.parameters()) == 525_312 == adapter_param_count(512)
    assert sorted(adapter.state_dict()) == [
        "fea_attn.0.bias",
        "fea_attn.0.weight",
        "fea_attn.2.bias",
        "fea_attn.2.weight",
    ]


def test_adapter_output_is_unit_norm_and_zero_weights_keep_direction():
    adapter = AttentionAdapter(4)
    for p in adapter.parameters():
        torch.nn.init.zeros_(p)
    f = torch.tensor([[3.0, 0.0, 4.0, 0.0]])
    # zero weights -> softmax of zeros = 1/4 each -> att * f = f/4 -> normalized f/5
    out = adapter(f)
    assert torch.allclose(out, torch.tensor([[0.6, 0.0, 0.8, 0.0]]))


def test_adapter_rejects_wrong_width():
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        AttentionAdapter(4)(torch.zeros(2, 5))


def test_clip_loss_worked_example():
    # two samples, two classes, features equal to their own prompts, scale 1:
    # logits = [[1, 0], [0, 1]] -> CE per row = log(1 + e^-1) = 0.3133, same for columns
    image = torch.eye(2)
    text = torch.eye(2)
    labels = torch.tensor([0, 1])
    expected = math.log(1 + math.exp(-1))
    assert clip_loss(image, text, labels, 1.0).item() == pytest.approx(expected, abs=1e-6)


def test_clip_loss_counts_same_class_as_negative_but_ce_does_not():
    image = torch.eye(2)[[0, 0]]  # two samples of class 0, both exactly on prompt 0
    text = torch.eye(2)
    labels = torch.tensor([0, 0])
    # clip: both rows have logits [1, 1] (the other sample's prompt is the same) -> log 2
    assert clip_loss(image, text, labels, 1.0).item() == pytest.approx(math.log(2), abs=1e-6)
    # ce over all prompts: logits [1, 0] -> log(1 + e^-1)
    assert ce_loss(image, text, labels, 1.0).item() == pytest.approx(
        math.log(1 + math.exp(-1)), abs=1e-6
    )


def test_fedavg_uniform_and_weighted_by_hand():
    a = {"w": torch.tensor([1.0, 2.0])}
    b = {"w": torch.tensor([3.0, 6.0])}
    assert torch.equal(FedAvg("uniform").aggregate([(a, 1), (b, 3)])["w"], torch.tensor([2.0, 4.0]))
    # weights 1 and 3: (1*1 + 3*3)/4 = 2.5, (2 + 18)/4 = 5
    assert torch.equal(FedAvg("samples").aggregate([(a, 1), (b, 3)])["w"], torch.tensor([2.5, 5.0]))


def test_fedavg_rejects_mismatched_updates():
    acc = FedAvg().start_round()
    acc.add({"w": torch.zeros(2)}, 1)
    with pytest.raises(ValueError, match="shape"):
        acc.add({"w": torch.zeros(3)}, 1)
    with pytest.raises(ValueError, match="differ"):
        acc.add({"v": torch.zeros(2)}, 1)
    with pytest.raises(ValueError, match="no update"):
        FedAvg().start_round().result()
    with pytest.raises(ValueError, match="weighting"):
        FedAvg("median")


def test_running_mean_keeps_one_copy():
    acc = FedAvg().start_round()
    for i in range(100):
        acc.add({"w": torch.full((3,), float(i))}, 1)
    assert acc.count == 100
    assert torch.allclose(acc.result()["w"], torch.full((3,), 49.5))


def test_train_config_defaults_are_the_reference_and_validate():
    cfg = TrainConfig()
    assert (cfg.lr, cfg.betas, cfg.eps, cfg.weight_decay, cfg.batch_size, cfg.epochs, cfg.loss) == (
        5e-5,
        (0.9, 0.98),
        1e-6,
        0.2,
        32,
        1,
        "clip",
    )
    assert cfg.with_overrides(lr=1e-3, loss=None).lr == 1e-3
    with pytest.raises(ConfigError, match="loss"):
        TrainConfig(loss="mse")
    with pytest.raises(ConfigError, match="unknown training setting"):
        cfg.with_overrides(momentum=0.9)


def _toy(n_per_class=40, dim=8, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.eye(classes, dim)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    # features: own prompt direction plus a strong shared nuisance direction
    nuisance = torch.zeros(dim)
    nuisance[-1] = 3.0
    feats = text[labels] + nuisance + 0.3 * torch.randn(len(labels), dim, generator=g)
    return feats, labels, text


def test_train_local_learns_a_toy_problem_and_resets_optimizer():
    feats, labels, text = _toy()
    adapter = AttentionAdapter(8)
    before = accuracy(adapter, feats, labels, text)
    cfg = TrainConfig(lr=1e-2, weight_decay=0.0, loss="ce", epochs=20, batch_size=16)
    res = train_local(
        adapter,
        feats,
        labels,
        text,
        cfg,
        logit_scale=10.0,
        generator=torch.Generator().manual_seed(0),
    )
    after = accuracy(adapter, feats, labels, text)
    assert res.steps == 20 * math.ceil(120 / 16)
    assert after > before and after > 0.9


def test_train_local_skips_single_sample_batches_for_clip_loss():
    feats, labels, text = _toy(n_per_class=11)  # 33 samples, batch 32 -> last batch of 1
    res = train_local(AttentionAdapter(8), feats, labels, text, TrainConfig(), logit_scale=10.0)
    assert res.steps == 1 and res.samples == 32


def test_train_local_rejects_bad_inputs():
    feats, labels, text = _toy()
    with pytest.raises(ValueError, match="agree"):
        train_local(AttentionAdapter(8), feats, labels[:-1], text, TrainConfig())
    bad = feats.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        train_local(AttentionAdapter(8), bad, labels, text, TrainConfig())
    with pytest.raises(ValueError, match="labels"):
        train_local(AttentionAdapter(8), feats, labels + 5, text, TrainConfig())


def test_zero_shot_predict_is_cosine_argmax():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    feats = torch.tensor([[10.0, 1.0], [0.1, 0.2]])
    assert predict(None, feats, text).tolist() == [0, 1]
    assert accuracy(None, feats, torch.tensor([0, 0]), text) == 0.5
    assert math.isnan(accuracy(None, feats[:0], torch.tensor([], dtype=torch.long), text))
    assert torch.allclose(F.normalize(feats, dim=-1).norm(dim=1), torch.ones(2))


def test_train_config_from_untrusted_bounds_every_field() -> None:
    import pytest as _pytest

    from fedclip_edge.config import TrainConfig
    from fedclip_edge.errors import ConfigError

    ok = TrainConfig.from_untrusted({"lr": 1e-3, "betas": [0.9, 0.98], "epochs": 2, "loss": "ce"})
    assert ok.lr == 1e-3 and ok.betas == (0.9, 0.98) and ok.epochs == 2 and ok.loss == "ce"
    for bad, word in [
        ({"batch_size": 1.5}, "batch_size"), ({"batch_size": True}, "batch_size"),
        ({"eps": -1}, "eps"), ({"eps": float("nan")}, "eps"), ({"betas": [2, 3]}, "betas"),
        ({"betas": [0.9]}, "betas"), ({"epochs": 10**9}, "epochs"), ({"lr": 10**400}, "lr"),
        ({"lr": "x"}, "lr"), ({"loss": "mse"}, "loss"), ({"nope": 1}, "nope"),
        ({"logit_scale": float("inf")}, "logit_scale"),
    ]:
        with _pytest.raises(ConfigError, match=word):
            TrainConfig.from_untrusted(bad)
    with _pytest.raises(ConfigError):
        TrainConfig.from_untrusted([1, 2])


def test_training_stops_at_the_next_step_boundary_when_asked() -> None:
    """issue 22, item 9: SIGTERM waited for the whole local training (36.7 s with a large signed
    `epochs`). The stop event is set from inside step 3 (the optimizer's step is the hook, so the
    moment is certain): training ends before step 4, with 3 steps taken."""
    import threading

    from fedclip_edge.train import TrainingStopped

    torch.manual_seed(0)
    feats, labels, text = torch.randn(64, 8), torch.arange(64) % 4, torch.randn(4, 8)
    adapter = AttentionAdapter(8)
    stop = threading.Event()
    steps: list[int] = []
    real_step = torch.optim.Adam.step

    def counting_step(self, *a, **k):  # noqa: ANN001, ANN202
        steps.append(1)
        if len(steps) == 3:
            stop.set()
        return real_step(self, *a, **k)

    cfg = TrainConfig(lr=1e-3, weight_decay=0.0, loss="ce", batch_size=4, epochs=1000)
    torch.optim.Adam.step = counting_step  # type: ignore[method-assign]
    try:
        with pytest.raises(TrainingStopped) as stopped:
            train_local(adapter, feats, labels, text, cfg, stop=stop)
    finally:
        torch.optim.Adam.step = real_step  # type: ignore[method-assign]
    assert stopped.value.steps == 3 and len(steps) == 3  # 16 steps per epoch x 1000 epochs asked
    assert not adapter.training
