"""The adapter's docstring claims, made checkable: the reference's bare Sequential loads into it
and gives the same output; the untrained adapter is near zero-shot but not exactly at it, while
uniform attention (what a zero W2 would give) is exactly zero-shot."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fedclip_edge.adapter import AttentionAdapter
from fedclip_edge.train import predict


def _reference_sequential(d: int) -> nn.Sequential:
    """How the upstream code builds its adapter (`img_adap`), on a plain object."""
    return nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, d), nn.Softmax(dim=1))


@pytest.mark.parametrize("prefix", ["", "img_adap."])
def test_reference_state_dict_loads_and_matches(prefix):
    torch.manual_seed(3)
    ref = _reference_sequential(16)
    ours = AttentionAdapter(16)
    ours.load_reference_state_dict({prefix + k: v for k, v in ref.state_dict().items()})
    f = torch.randn(5, 16)
    expected = F.normalize(ref(f) * f, dim=-1)  # the reference's forward, written out
    assert torch.equal(ours(f), expected)


def test_reference_state_dict_rejects_other_keys():
    ours = AttentionAdapter(4)
    with pytest.raises(ValueError, match="not a key of the reference adapter"):
        ours.load_reference_state_dict({"fea_attn.0.weight": torch.zeros(4, 4)})


def test_same_seed_same_start_as_the_reference():
    """Same layer order, same default init: the seeded start equals the reference's."""
    torch.manual_seed(0)
    ref = _reference_sequential(8)
    torch.manual_seed(0)
    ours = AttentionAdapter(8)
    for (_, a), (_, b) in zip(ref.state_dict().items(), ours.state_dict().items(), strict=True):
        assert torch.equal(a, b)


def test_untrained_is_near_but_not_at_zero_shot_and_uniform_attention_is():
    torch.manual_seed(0)
    d = 32  # a power of two: 1/d and f/d are exact, so uniform attention is exactly f
    text = torch.randn(6, d)
    feats = text[torch.arange(300) % 6] + 1.2 * torch.randn(300, d)
    zero_shot = predict(None, feats, text)
    untrained = predict(AttentionAdapter(d), feats, text)
    agree = float((zero_shot == untrained).float().mean())
    assert 0.5 < agree < 1.0, agree  # reweighted channels: some predictions change
    uniform = AttentionAdapter(d)
    with torch.no_grad():
        uniform.fea_attn[2].weight.zero_()
        uniform.fea_attn[2].bias.zero_()
    assert torch.equal(predict(uniform, feats, text), zero_shot)
