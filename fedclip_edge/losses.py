"""Training losses on adapted image features and frozen, normalized prompt features."""

from __future__ import annotations

import torch
from torch.nn import functional as F

LOSSES = ("clip", "ce")


def clip_loss(
    image: torch.Tensor, text_all: torch.Tensor, labels: torch.Tensor, logit_scale: float
) -> torch.Tensor:
    """The reference's symmetric in-batch contrastive loss.

    Sample i's positive is the prompt of its own class; the other samples' prompts in the batch
    are negatives, even when they name the same class (false negatives, as in the reference).
    """
    text = text_all[labels]
    logits = logit_scale * image @ text.T
    targets = torch.arange(image.shape[0], device=image.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def ce_loss(
    image: torch.Tensor, text_all: torch.Tensor, labels: torch.Tensor, logit_scale: float
) -> torch.Tensor:
    """Cross-entropy over all class prompts: no false negatives, works at any batch size."""
    logits = logit_scale * image @ text_all.T
    return F.cross_entropy(logits, labels)


def get_loss(name: str):
    """Loss function by its CLI name."""
    if name == "clip":
        return clip_loss
    if name == "ce":
        return ce_loss
    raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
