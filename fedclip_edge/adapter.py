"""The FedCLIP attention adapter ("AttAI"), exactly as in the reference implementation.

CLIP stays frozen; this is the only trainable part and the only thing that travels.
"""

from __future__ import annotations

import torch
from torch import nn


class AttentionAdapter(nn.Module):
    """att = softmax(W2 tanh(W1 f)); g = normalize(att * f).

    The softmax over channels starts near uniform (about 1/d each), so at init the adapter only
    rescales the feature, which normalization undoes: the adapted model starts at zero-shot.
    Layer names follow the reference (`fea_attn.0`, `fea_attn.2`) so its checkpoints map directly.
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


def adapter_param_count(dim: int) -> int:
    """2*(d*d + d): 525,312 for ViT-B-32 (d = 512)."""
    return 2 * (dim * dim + dim)
