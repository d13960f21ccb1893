"""Aggregation strategies: FedAvg and the robust ones (clip, trimmed-mean, median), worked out by
hand on tiny tensors, then one poisoned round on real features from the offline model."""

from __future__ import annotations

import math

import pytest
import torch

import fedclip_edge.strategy as S
from fedclip_edge.errors import ConfigError
from fedclip_edge.strategy import (
    STRATEGIES,
    Clip,
    FedAvg,
    Median,
    Strategy,
    TrimmedMean,
    make_strategy,
)


def _w(*values: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values, dtype=torch.float32)}


def _close(got: dict[str, torch.Tensor], want: list[float]) -> None:
    assert torch.allclose(got["w"].double(), torch.tensor(want, dtype=torch.float64), atol=1e-6), (
        got["w"],
        want,
    )


# ----------------------------------------------------------------------------- base and FedAvg


def test_every_strategy_is_a_strategy_and_fedavg_keeps_its_api() -> None:
    assert set(STRATEGIES) == {"fedavg", "clip", "trimmed-mean", "median", "fedavg-clip"}
    for name in STRATEGIES:
        assert isinstance(make_strategy(name), Strategy)
    acc = FedAvg().start_round()
    acc.add(_w(1, 2), 1)  # the old two-argument call
    acc.add(_w(3, 6), 1, global_state=_w(0, 0))  # the common API: the global is ignored
    _close(acc.result(), [2, 4])
    assert (acc.count, acc.samples) == (2, 2)
    # weights 1 and 3 with sample weighting: (1 + 9) / 4, (2 + 18) / 4
    _close(FedAvg("samples").aggregate([(_w(1, 2), 1), (_w(3, 6), 3)]), [2.5, 5.0])


# ----------------------------------------------------------------------------- clip


def test_clip_fixed_bound_by_hand() -> None:
    """global (1, 1); deltas (3, 4) (norm 5) and (0, 1) (norm 1); bound 2: the first becomes
    (1.2, 1.6), the second stays; mean (0.6, 1.3); plus the global: (1.6, 2.3)."""
    g = _w(1, 1)
    acc = Clip(bound=2.0).start_round()
    acc.add(_w(4, 5), 10, g)
    acc.add(_w(1, 2), 10, g)
    _close(acc.result(), [1.6, 2.3])
    assert acc.norms == pytest.approx([5.0, 1.0])
    assert acc.clipped == 1 and acc.used_bound == 2.0


def test_clip_auto_bound_is_the_median_norm() -> None:
    """Norms 5, 1, 2 -> bound 2: (3, 4) -> (1.2, 1.6); mean of (1.2, 1.6), (0, 1), (2, 0)."""
    g = _w(0, 0)
    acc = Clip(bound="auto").start_round()
    for s in (_w(3, 4), _w(0, 1), _w(2, 0)):
        acc.add(s, 1, g)
    _close(acc.result(), [3.2 / 3, 2.6 / 3])
    assert acc.used_bound == pytest.approx(2.0) and acc.clipped == 1


def test_clip_norm_spans_the_whole_adapter() -> None:
    """Two tensors (3) and (4): norm 5 over the adapter, not 3 and 4 per tensor."""
    g = {"a": torch.zeros(1), "b": torch.zeros(1)}
    out = Clip(bound=1.0).aggregate([({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}, 1)], g)
    assert out["a"].item() == pytest.approx(0.6) and out["b"].item() == pytest.approx(0.8)


def test_clip_sample_weighting_and_no_clipping_is_fedavg() -> None:
    g = _w(0, 0)
    out = Clip(bound=100.0, weighting="samples").aggregate([(_w(1, 2), 1), (_w(3, 6), 3)], g)
    _close(out, [2.5, 5.0])


def test_clip_needs_the_global_and_matching_shapes() -> None:
    acc = Clip(bound=1.0).start_round()
    with pytest.raises(ValueError, match="global"):
        acc.add(_w(1, 2), 1)
    acc.add(_w(1, 2), 1, _w(0, 0))
    with pytest.raises(ValueError, match="shape"):
        acc.add(_w(1, 2, 3), 1, _w(0, 0))
    with pytest.raises(ValueError, match="no update"):
        Clip(bound=1.0).start_round().result()


def test_clip_huge_values_do_not_overflow_the_norm() -> None:
    """float32 squares of 1e30 overflow; the norm is taken in float64."""
    out = Clip(bound=1.0).aggregate([(_w(1e30, 0), 1), (_w(0, 0), 1)], _w(0, 0))
    _close(out, [0.5, 0.0])


# ----------------------------------------------------------------------------- coordinate-wise


def test_trimmed_mean_by_hand() -> None:
    """5 clients, trim 0.2 -> 1 value dropped at each end per coordinate:
    (1, 2, 3, 4, 100) -> mean(2, 3, 4) = 3; (-50, 0, 1, 2, 3) -> mean(0, 1, 2) = 1."""
    cols = [(1, -50), (100, 3), (2, 0), (4, 2), (3, 1)]  # clients in no particular order
    acc = TrimmedMean(trim=0.2).start_round()
    for a, b in cols:
        acc.add(_w(a, b), 7)
    _close(acc.result(), [3.0, 1.0])
    assert acc.trimmed() == 1 and acc.samples == 35


def test_trimmed_mean_trim_count_is_floor_of_fraction() -> None:
    """4 clients: trim 0.2 would drop floor(0.8) = 0 and is refused (issue 22: it let a x1e6
    update through as the plain mean); trim 0.25 drops 1 at each end; trim 0 asks for the mean."""
    ups = [(_w(1), 1), (_w(2), 1), (_w(3), 1), (_w(100), 1)]
    with pytest.raises(ConfigError, match=r"drops nothing from a round of 4 .* --trim >= 0.25"):
        TrimmedMean(trim=0.2).aggregate(ups)
    _close(TrimmedMean(trim=0.25).aggregate(ups), [2.5])
    _close(TrimmedMean(trim=0.0).aggregate(ups), [26.5])


def test_median_by_hand_odd_and_even() -> None:
    _close(Median().aggregate([(_w(v, -v), 1) for v in (1, 100, 2, 4, 3)]), [3.0, -3.0])
    # even: the mean of the two middle values
    _close(Median().aggregate([(_w(v), 1) for v in (1, 100, 2, 3)]), [2.5])
    _close(Median().aggregate([(_w(7, 8), 1)]), [7.0, 8.0])


def test_coordinate_wise_keeps_names_and_shapes_and_blocks(monkeypatch) -> None:
    """Several tensors, sorted in column blocks smaller than the adapter: same as torch's."""
    monkeypatch.setattr(S, "_SORT_SCRATCH_VALUES", 7 * 3)  # 3 columns per block with 7 clients
    gen = torch.Generator().manual_seed(0)
    states = [
        {"b": torch.randn(2, 3, generator=gen), "a": torch.randn(5, generator=gen)}
        for _ in range(7)
    ]
    med = Median().aggregate([(s, 1) for s in states])
    tm = TrimmedMean(trim=0.3).aggregate([(s, 1) for s in states])  # floor(2.1) = 2 each end
    for k in ("a", "b"):
        stack = torch.stack([s[k] for s in states]).double()
        assert med[k].shape == states[0][k].shape and med[k].dtype == torch.float32
        assert torch.allclose(med[k].double(), stack.median(dim=0).values, atol=1e-6)
        want = torch.sort(stack, dim=0).values[2:5].mean(dim=0)
        assert torch.allclose(tm[k].double(), want, atol=1e-6)


def test_coordinate_wise_refuse_mismatches_and_empty() -> None:
    acc = Median().start_round()
    acc.add(_w(1, 2), 1)
    with pytest.raises(ValueError, match="differ"):
        acc.add({"v": torch.zeros(2)}, 1)
    with pytest.raises(ValueError, match="no update"):
        TrimmedMean().start_round().result()


# ----------------------------------------------------------------------------- registry


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("trimmed_mean", {}, "did you mean 'trimmed-mean'.*choose one of fedavg, clip"),
        ("krum", {}, "unknown strategy 'krum'; choose one of fedavg, clip, trimmed-mean, median"),
        ("fedavg", {"trim": 0.1}, "does not take trim"),
        ("median", {"bound": 1.0}, "does not take bound"),
        ("median", {"weighting": "samples"}, "does not take weighting"),
        ("clip", {"bound": "x"}, "clip bound must be a number"),
        ("clip", {"bound": "-1"}, "clip bound must be a finite number > 0"),
        ("clip", {"bound": math.inf}, "clip bound must be a finite number > 0"),
        ("trimmed-mean", {"trim": 0.5}, r"trim fraction must be in \[0, 0.5\)"),
        ("fedavg", {"weighting": "mean"}, "unknown weighting"),
    ],
)
def test_make_strategy_errors_name_what_is_valid(name, options, match) -> None:
    with pytest.raises(ConfigError, match=match):
        make_strategy(name, **options)


def test_make_strategy_options() -> None:
    assert make_strategy("clip", bound="0.5").describe() == {
        "name": "clip",
        "bound": 0.5,
        "weighting": "uniform",
    }
    assert make_strategy("clip", bound=None).describe()["bound"] == "auto"
    assert make_strategy("trimmed-mean", trim=0.1, weighting="uniform").describe() == {
        "name": "trimmed-mean",
        "trim": 0.1,
    }
    assert make_strategy("fedavg", weighting="samples", bound=None).weighting == "samples"


# ----------------------------------------------------------------------------- poisoning


def _movement(new: dict[str, torch.Tensor], old: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(((new[k].double() - old[k].double()) ** 2).sum()) for k in old))


def _poisoned_round(make_states):
    """(movement of the global per strategy) with client 0's state scaled by 1e6."""
    glob, honest = make_states()
    poisoned = [({k: v * 1e6 for k, v in honest[0].items()}, 10)] + [(s, 10) for s in honest[1:]]
    moves = {}
    for name in STRATEGIES:
        new = make_strategy(name).aggregate(poisoned, glob)
        moves[name] = _movement(new, glob)
    honest_move = _movement(FedAvg().aggregate([(s, 10) for s in honest]), glob)
    return moves, honest_move


def test_one_scaled_client_moves_fedavg_orders_of_magnitude_more_tiny() -> None:
    def states():
        gen = torch.Generator().manual_seed(1)
        glob = {"w": torch.randn(4, 4, generator=gen), "b": torch.randn(4, generator=gen)}
        honest = [{k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in glob.items()}]
        honest += [
            {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in glob.items()}
            for _ in range(4)
        ]
        return glob, honest

    moves, honest_move = _poisoned_round(states)
    for name in ("clip", "trimmed-mean", "median"):
        assert moves["fedavg"] > 1e3 * moves[name], moves
        assert moves[name] < 10 * honest_move + 0.05, (name, moves, honest_move)


@pytest.fixture(scope="module")
def five_clients(tmp_path_factory):
    """Real features from the offline model (as tests/integration/test_learning.py gets them),
    the three training domains' train splits dealt into 5 clients, photo held out."""
    from fedclip_edge.data.split import split_indices
    from fedclip_edge.data.synth import write_dataset
    from fedclip_edge.models.tiny import ensure_pretrained
    from fedclip_edge.runs import build_features

    ensure_pretrained()
    root = tmp_path_factory.mktemp("strategies")
    write_dataset(root / "data", per_class=40, seed=0)
    fs = build_features(root / "data", root / "features", progress=False)
    held = "photo"
    train_x, train_y, test = [], [], {}
    for d, dom in fs.domains.items():
        if d == held:
            continue
        tr, _, te = (
            torch.from_numpy(ix).long() for ix in split_indices(len(dom), 0, (0.6, 0.2, 0.2))
        )
        train_x.append(dom.features[tr])
        train_y.append(dom.labels[tr])
        test[d] = (dom.features[te], dom.labels[te])
    x, y = torch.cat(train_x), torch.cat(train_y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    shards = [(x[ix], y[ix]) for ix in order.chunk(5)]
    return fs, shards, test, (fs.domains[held].features, fs.domains[held].labels)


@pytest.mark.slow
@pytest.mark.integration
def test_one_scaled_client_of_five_on_real_features(five_clients) -> None:
    """One client of five sends its honest update x1e6: FedAvg's global moves orders of
    magnitude more than with each robust strategy, and with each robust strategy the held-out
    and the mean per-domain accuracy after the round stay within 2 points of the honest round."""
    from fedclip_edge.adapter import AttentionAdapter
    from fedclip_edge.runs import train_config
    from fedclip_edge.train import accuracy, train_local

    fs, shards, test, held = five_clients
    torch.manual_seed(0)
    glob = AttentionAdapter(fs.dim).state_dict()
    cfg = train_config("learning").with_overrides(epochs=2)
    honest = []
    for i, (feats, labels) in enumerate(shards):
        local = AttentionAdapter(fs.dim)
        local.load_state_dict(glob)
        gen = torch.Generator().manual_seed(i)
        train_local(
            local, feats, labels, fs.text_features, cfg, logit_scale=fs.logit_scale, generator=gen
        )
        honest.append({k: v.detach().clone() for k, v in local.state_dict().items()})
    poisoned = [{k: v * 1e6 for k, v in honest[0].items()}] + honest[1:]

    def evaluate(state) -> tuple[float, float]:
        model = AttentionAdapter(fs.dim)
        model.load_state_dict(state)
        per_domain = [accuracy(model, f, lab, fs.text_features) for f, lab in test.values()]
        return accuracy(model, *held, fs.text_features), sum(per_domain) / len(per_domain)

    ref = FedAvg().aggregate([(s, 1) for s in honest], glob)
    ref_held, ref_dom = evaluate(ref)

    moves, accs = {}, {}
    for name in STRATEGIES:
        new = make_strategy(name).aggregate([(s, 1) for s in poisoned], glob)
        moves[name] = _movement(new, glob)
        accs[name] = evaluate(new)
    for name in ("clip", "trimmed-mean", "median"):
        assert moves["fedavg"] > 1e3 * moves[name], moves
        held_acc, dom_acc = accs[name]
        assert abs(held_acc - ref_held) <= 0.02 and abs(dom_acc - ref_dom) <= 0.02, (
            name,
            accs[name],
            (ref_held, ref_dom),
        )
    # and the attack is real: FedAvg's global is wrecked
    assert accs["fedavg"][1] < ref_dom - 0.1, (accs["fedavg"], ref_dom)
