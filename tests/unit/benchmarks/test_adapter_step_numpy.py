"""benchmarks/adapter_step.py: the numpy adapter step it times must be the same computation as
torch's (loss and every gradient), or the speed comparison means nothing."""

from __future__ import annotations

import numpy as np
import pytest

from fedclip_edge.benchmarks import adapter_step as A


def test_numpy_step_matches_torch_and_reports_both_sides() -> None:
    r = A.run(dim=16, batch=8, steps=3, warmup=0)
    assert r["parity"]["max_relative_grad_error"] < 1e-4
    assert abs(r["parity"]["loss_torch"] - r["parity"]["loss_numpy"]) < 1e-4
    assert r["torch_ms_per_step"] > 0 and r["numpy_ms_per_step"] > 0
    assert r["numpy_over_torch"] == pytest.approx(r["numpy_ms_per_step"] / r["torch_ms_per_step"])


def test_a_wrong_gradient_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    real = A.NumpyAdapterStep.loss_and_grads

    def wrong(self, f, text, scale):
        loss, grads = real(self, f, text, scale)
        grads[A.NAMES[2]] = grads[A.NAMES[2]] * np.float32(1.01)  # 1% off in one tensor
        return loss, grads

    monkeypatch.setattr(A.NumpyAdapterStep, "loss_and_grads", wrong)
    with pytest.raises(AssertionError, match="differs from torch"):
        A.run(dim=16, batch=8, steps=1, warmup=0)


def test_numpy_adam_moves_the_weights_the_way_torch_does() -> None:
    """Several steps of each from the same start end at the same weights."""
    import torch

    from fedclip_edge.adapter import AttentionAdapter

    torch.manual_seed(0)
    ad = AttentionAdapter(8)
    init = {k: v.detach().numpy().copy() for k, v in ad.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    f = torch.randn(6, 8, generator=g)
    text = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    tstep = A.torch_step_fn(ad, 1e-2, (0.9, 0.98), 1e-6, 0.2)
    nstep = A.NumpyAdapterStep(init, 1e-2, (0.9, 0.98), 1e-6, 0.2)
    for _ in range(5):
        tstep(f, text, 10.0)
        nstep.step(f.numpy(), text.numpy(), 10.0)
    for k in A.NAMES:
        np.testing.assert_allclose(nstep.p[k], ad.state_dict()[k].numpy(), atol=1e-4)
