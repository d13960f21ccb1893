"""The FedCLIP attention adapter ("AttAI"), exactly as in the reference implementation.

CLIP stays frozen; this is the only trainable part and the only thing that travels.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


class AttentionAdapter(nn.Module):
    """att = softmax(W2 tanh(W1 f)); g = normalize(att * f).

    Initialised as the reference does (PyTorch's default Linear init, seeded), so runs match it
    weight for weight. That start is *near* zero-shot, not at it: the softmax's weights per
    channel are about 1/d but not equal, so the untrained adapter reweights the channels a
    little. Measured on fedclip-tiny's synthetic domains (800 images each), untrained (seed 0)
    vs zero-shot: photo 51.9% vs 53.5%, art_painting 41.8% vs 42.0%, cartoon 90.5% vs 91.3%,
    sketch 59.0% vs 59.8%; 1.6-12.4% of the images change prediction (seeds 1 and 2: from 1.9
    points below to 0.1 above). Zero-initialising W2 would start exactly at zero-shot (uniform
    attention) but would leave the reference's training trajectory, so it is not done.

    The reference keeps these layers in a bare `nn.Sequential` (`img_adap`) and saves no
    checkpoint; its state dict (`0.weight`, `0.bias`, `2.weight`, `2.bias`, with or without an
    `img_adap.` prefix) loads here with `load_reference_state_dict`.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.fea_attn = nn.Sequential(
            nn.Linear(dim, dim),
            nn.Tanh(),
            nn.Linear(dim, dim),
            nn.Softmax(dim=1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Adapted, L2-normalized features from raw (unnormalized) image features."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(
                f"adapter expects features of shape [N, {self.dim}], got {list(features.shape)}"
            )
        att = self.fea_attn(features)
        return nn.functional.normalize(att * features, dim=-1)

    def load_reference_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load the reference's `img_adap` Sequential state dict (keys `0.*` and `2.*`,
        optionally prefixed `img_adap.`): same layers, our names under `fea_attn.`."""
        mapped = {}
        for key, value in state.items():
            bare = key.removeprefix("img_adap.")
            if bare not in {"0.weight", "0.bias", "2.weight", "2.bias"}:
                raise ValueError(
                    f"not a key of the reference adapter: {key!r} "
                    "(expected 0.weight, 0.bias, 2.weight, 2.bias, optionally img_adap.-prefixed)"
                )
            mapped[f"fea_attn.{bare}"] = value
        self.load_state_dict(mapped)


def adapter_param_count(dim: int) -> int:
    """2*(d*d + d): 525,312 for ViT-B-32 (d = 512)."""
    return 2 * (dim * dim + dim)
