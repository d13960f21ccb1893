"""Clipping, noise and DP-FedAvg on tiny tensors whose results are worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from fedclip_edge.privacy import dp


def _t(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def test_norm_and_clip_over_the_whole_state() -> None:
    delta = {"a": _t(3.0, 0.0), "b": torch.tensor([[4.0]])}  # ||.|| = 5 over both tensors
    assert dp.l2_norm(delta) == pytest.approx(5.0)
    clipped, norm = dp.clip_delta(delta, 1.0)  # scaled by 1/5
    assert norm == pytest.approx(5.0)
    assert torch.allclose(clipped["a"], _t(0.6, 0.0))
    assert torch.allclose(clipped["b"], torch.tensor([[0.8]]))
    assert dp.l2_norm(clipped) == pytest.approx(1.0)
    same, _ = dp.clip_delta(delta, 10.0)  # under C: untouched
    assert torch.equal(same["a"], delta["a"]) and torch.equal(same["b"], delta["b"])


def test_delta_roundtrip_and_mismatch() -> None:
    g = {"w": _t(1.0, 2.0)}
    local = {"w": _t(1.5, 1.0)}
    d = dp.delta_of(local, g)
    assert torch.allclose(d["w"], _t(0.5, -1.0))
    assert torch.allclose(dp.apply_delta(g, d)["w"], local["w"])
    with pytest.raises(ValueError, match="different tensors"):
        dp.delta_of({"v": _t(1.0)}, g)


def test_noise_has_std_z_times_c() -> None:
    """N = 200k zero coordinates, C = 2, z = 0.5: the noise std must be z*C = 1.0. The sample
    std's own std is 1/sqrt(2N) ~ 0.0016, so the +-1% bound rejects z alone (0.5), z*C^2 (2)
    and C alone (2)."""
    zero = {"w": torch.zeros(200_000)}
    noised, norm = dp.privatize_delta(zero, 2.0, 0.5, torch.Generator().manual_seed(0))
    assert norm == 0.0
    std = float(noised["w"].std())
    mean = float(noised["w"].mean())
    assert abs(std - 1.0) < 0.01, std
    assert abs(mean) < 0.01, mean


def test_noise_is_reproducible_with_a_seed_and_zero_noise_is_plain_clipping() -> None:
    d = {"w": _t(3.0, 4.0)}
    a, _ = dp.privatize_delta(d, 1.0, 1.0, torch.Generator().manual_seed(7))
    b, _ = dp.privatize_delta(d, 1.0, 1.0, torch.Generator().manual_seed(7))
    assert torch.equal(a["w"], b["w"])
    plain, _ = dp.privatize_delta(d, 1.0, 0.0, torch.Generator().manual_seed(7))
    assert torch.allclose(plain["w"], _t(0.6, 0.8))


def test_dp_fedavg_mean_by_hand() -> None:
    deltas = [{"w": _t(3.0, 4.0)}, {"w": _t(0.5, 0.0)}]
    # z = 0: clipped [0.6, 0.8] + [0.5, 0] = [1.1, 0.8], over the EXPECTED count 4, not 2
    out = dp.dp_fedavg_mean(deltas, 1.0, 0.0, 4, torch.Generator())
    assert torch.allclose(out["w"], _t(0.275, 0.2))
    # z = 2, C = 1: the sum gets 2 * N(0, 1) drawn from the same generator state
    noise = torch.randn(2, generator=torch.Generator().manual_seed(3))
    out = dp.dp_fedavg_mean(deltas, 1.0, 2.0, 4, torch.Generator().manual_seed(3))
    assert torch.allclose(out["w"], (_t(1.1, 0.8) + 2.0 * noise) / 4)
    with pytest.raises(ValueError, match="expected device count"):
        dp.dp_fedavg_mean(deltas, 1.0, 1.0, 0, torch.Generator())


def test_adaptive_clip_geometric_update() -> None:
    ac = dp.AdaptiveClip(clip=1.0, target_quantile=0.5, lr=0.2)
    # 2 of 4 norms <= 1: the fraction is the target, the clip stays
    assert ac.update([0.5, 2.0, 3.0, 0.9], 4, torch.Generator()) == pytest.approx(1.0)
    # all 4 under: fraction 1, C * exp(-0.2 * 0.5)
    assert ac.update([0.1, 0.2, 0.3, 0.4], 4, torch.Generator()) == pytest.approx(math.exp(-0.1))
    # none under: the clip grows, C * exp(+0.2 * 0.5)
    c = ac.clip
    assert ac.update([5.0, 6.0], 4, torch.Generator()) == pytest.approx(c * math.exp(0.1))


def test_adaptive_clip_noised_count() -> None:
    """sigma_b = 1: the count gets one N(0,1) draw from the generator, replayed here."""
    ac = dp.AdaptiveClip(clip=1.0, target_quantile=0.5, lr=0.2, count_stddev=1.0)
    draw = float(torch.randn((), generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    got = ac.update([0.5, 2.0], 2, torch.Generator().manual_seed(5))
    assert got == pytest.approx(math.exp(-0.2 * ((1 + draw) / 2 - 0.5)))


def test_split_noise_multiplier() -> None:
    # Andrew et al. Thm 1: z = 1, sigma_b = 1 -> (1 - 1/4)^(-1/2)
    assert dp.split_noise_multiplier(1.0, 1.0) == pytest.approx(0.75 ** -0.5)
    with pytest.raises(ValueError, match="too small"):
        dp.split_noise_multiplier(1.0, 0.4)


def test_bad_parameters_refused() -> None:
    with pytest.raises(ValueError, match="clip norm"):
        dp.clip_delta({"w": _t(1.0)}, -1.0)
    with pytest.raises(ValueError, match="noise multiplier"):
        dp.privatize_delta({"w": _t(1.0)}, 1.0, float("nan"), torch.Generator())
    with pytest.raises(ValueError, match="target quantile"):
        dp.AdaptiveClip(clip=1.0, target_quantile=1.5)
