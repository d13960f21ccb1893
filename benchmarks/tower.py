"""Full-model FedAvg in `bench fedavg`: fine-tune and ship the whole CLIP image tower.

Why: the baseline FedCLIP is compared with. Same loss and optimizer family as the adapter
(Adam with coupled L2, re-created every round), same clients, splits and rounds; every
floating tensor of the tower (weights and buffers) goes down and up every round.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.nn import functional as F

from fedclip_edge.benchmarks.mqtt_link import MqttLink
from fedclip_edge.benchmarks.rounds import Client, federate
from fedclip_edge.config import TrainConfig
from fedclip_edge.losses import get_loss
from fedclip_edge.train import accuracy


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def state_hash(module: torch.nn.Module) -> str:
    """sha256 of the state: proves which method left the tower untouched."""
    from fedclip_edge.models import state_sha256

    return state_sha256(module.state_dict())


def float_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What FedAvg ships: every floating tensor of the tower (weights and buffers)."""
    return {k: v.detach() for k, v in module.state_dict().items() if v.is_floating_point()}


def tower_accuracy(
    visual: torch.nn.Module,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    text: torch.Tensor,
    batch: int,
) -> float:
    """Zero-shot style accuracy of the tower's features against the class prompts."""
    if labels.numel() == 0:
        return float("nan")
    visual.eval()
    with torch.no_grad():
        feats = torch.cat([visual(pixels[i : i + batch]) for i in range(0, len(pixels), batch)])
    return accuracy(None, feats, labels, text)


def train_tower(
    visual: torch.nn.Module,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    text: torch.Tensor,
    cfg: TrainConfig,
    scale: float,
    generator: torch.Generator,
) -> tuple[float, int]:
    """One client's local fine-tuning of the whole image tower (same loss and optimizer family
    as FedCLIP's adapter: Adam with coupled L2, re-created every round)."""
    loss_fn = get_loss(cfg.loss)
    text_n = F.normalize(text.float(), dim=-1)
    for p in visual.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(
        visual.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
    )
    visual.train()
    total, steps = 0.0, 0
    for _ in range(cfg.epochs):
        order = torch.randperm(len(labels), generator=generator)
        for s in range(0, len(order), cfg.batch_size):
            idx = order[s : s + cfg.batch_size]
            if cfg.loss == "clip" and idx.numel() < 2:
                continue
            feats = F.normalize(visual(pixels[idx]), dim=-1)
            loss = loss_fn(feats, text_n, labels[idx], scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            steps += 1
    visual.eval()
    return (total / steps if steps else float("nan")), steps


def run_fedavg(
    report: dict[str, Any],
    parts: list[Client],
    visual0: torch.nn.Module,
    text: torch.Tensor,
    scale: float,
    held: Any,
    cfg: TrainConfig,
    *,
    rounds: int,
    fedavg_dtype: str,
    seed: int,
    link: MqttLink | None,
    log: Any,
    save: Any,
) -> None:
    """Full FedAvg's rounds into report['fedavg'] (and the zero-shot accuracy before them)."""
    global_tower = copy.deepcopy(visual0)
    report["fedavg"]["tower_sha256_before"] = state_hash(global_tower)
    report["zero_shot_test"] = {
        c.name: tower_accuracy(
            global_tower, c.pixels["test"], c.labels["test"], text, cfg.batch_size
        )
        for c in parts
    }

    def train_one(local: torch.nn.Module, c: Client, gen: torch.Generator) -> tuple:
        loss, steps = train_tower(
            local, c.pixels["train"], c.labels["train"], text, cfg, scale, gen
        )
        return loss, steps, int(c.labels["train"].numel())

    def eval_tower() -> tuple[dict[str, float], float | None]:
        accs = {
            c.name: tower_accuracy(
                global_tower, c.pixels["test"], c.labels["test"], text, cfg.batch_size
            )
            for c in parts
        }
        gen = (
            tower_accuracy(global_tower, held[0], held[1], text, cfg.batch_size)
            if held is not None
            else None
        )
        return accs, gen

    federate(
        "fedavg",
        report["fedavg"],
        global_tower,
        parts,
        rounds=rounds,
        dtype=fedavg_dtype,
        seed=seed,
        start_wall=0.0,
        state=float_state,
        make_local=lambda: copy.deepcopy(global_tower),
        train=train_one,
        evaluate=eval_tower,
        log=log,
        save=save,
        link=link,
    )
    report["fedavg"]["tower_sha256_after"] = state_hash(global_tower)
