"""Pure local training and evaluation on cached features: no files, no sockets."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from fedclip_edge.adapter import AttentionAdapter
from fedclip_edge.config import TrainConfig
from fedclip_edge.losses import get_loss


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean loss over the optimizer steps taken (nan when no step was taken)
    steps: int
    samples: int  # samples that contributed to a step


def _check_inputs(features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor) -> None:
    if features.ndim != 2 or labels.ndim != 1 or features.shape[0] != labels.shape[0]:
        raise ValueError(
            f"features [N, D] and labels [N] must agree, got {list(features.shape)} "
            f"and {list(labels.shape)}"
        )
    if text.ndim != 2 or text.shape[1] != features.shape[1]:
        raise ValueError(f"text features must be [C, {features.shape[1]}], got {list(text.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= text.shape[0]):
        raise ValueError(
            f"labels must lie in [0, {text.shape[0]}), got {labels.min()}..{labels.max()}"
        )
    if not torch.isfinite(features).all():
        raise ValueError("features contain NaN or infinite values")


def train_local(
    adapter: AttentionAdapter,
    features: torch.Tensor,
    labels: torch.Tensor,
    text_features: torch.Tensor,
    cfg: TrainConfig,
    *,
    logit_scale: float = 100.0,
    generator: torch.Generator | None = None,
) -> TrainResult:
    """Train the adapter in place for cfg.epochs over (features, labels).

    The optimizer is created here, so its state resets every call (every round), as in the
    reference. With the `clip` loss, a batch of one sample is skipped (as in the reference).
    """
    _check_inputs(features, labels, text_features)
    scale = cfg.logit_scale if cfg.logit_scale is not None else logit_scale
    loss_fn = get_loss(cfg.loss)
    text = F.normalize(text_features.float(), dim=-1)
    opt = torch.optim.Adam(
        adapter.parameters(),
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
    )
    adapter.train()
    total, steps, samples = 0.0, 0, 0
    n = features.shape[0]
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            if cfg.loss == "clip" and idx.numel() < 2:
                continue
            loss = loss_fn(adapter(features[idx].float()), text, labels[idx], scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            steps += 1
            samples += idx.numel()
    adapter.eval()
    return TrainResult(loss=total / steps if steps else float("nan"), steps=steps, samples=samples)


def personalize(
    global_state: dict[str, torch.Tensor],
    features: torch.Tensor,
    labels: torch.Tensor,
    text_features: torch.Tensor,
    cfg: TrainConfig,
    epochs: int,
    *,
    logit_scale: float = 100.0,
    generator: torch.Generator | None = None,
) -> AttentionAdapter:
    """FedCLIP's local personalization: a copy of the final global adapter fine-tuned for
    `epochs` on one client's own training features. One step for `simulate
    --personalize-epochs` and the agent's personalized model version."""
    local = AttentionAdapter(features.shape[1])
    local.load_state_dict(global_state)
    train_local(
        local,
        features,
        labels,
        text_features,
        cfg.with_overrides(epochs=epochs),
        logit_scale=logit_scale,
        generator=generator,
    )
    return local


@torch.no_grad()
def predict(
    adapter: AttentionAdapter | None, features: torch.Tensor, text_features: torch.Tensor
) -> torch.Tensor:
    """Class indices: argmax of cosine similarity to the prompts. No adapter = zero-shot CLIP."""
    image = (
        adapter(features.float()) if adapter is not None else F.normalize(features.float(), dim=-1)
    )
    return (image @ F.normalize(text_features.float(), dim=-1).T).argmax(dim=1)


def accuracy(
    adapter: AttentionAdapter | None,
    features: torch.Tensor,
    labels: torch.Tensor,
    text_features: torch.Tensor,
) -> float:
    """Top-1 accuracy in [0, 1]; nan for an empty split."""
    if labels.numel() == 0:
        return float("nan")
    if adapter is not None:
        adapter.eval()
    return float((predict(adapter, features, text_features) == labels).float().mean())
