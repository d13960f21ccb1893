"""The agent's end of job (issue 17): keep the final global adapter and its personalized copy in
this device's model store and let the gate pick what it serves (`serving.keep.keep_models`).

Separate from the agent loop so that the loop calls one function once: nothing here speaks
MQTT; it turns what the loop received (the final global, already decoded and, with signing on,
verified) into the store's inputs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedclip_edge.config import TrainConfig
from fedclip_edge.serving.keep import KeptModels, keep_models


def default_models_path(cache: Path | None, client: str) -> Path:
    """`models/<client>` beside the feature cache folder (its parent when --cache is given, else
    the project's cache folder), like the agent's codec state: not inside the cache."""
    if cache is not None:
        base = Path(cache).resolve().parent
    else:
        from fedclip_edge.models.registry import cache_dir

        base = cache_dir()
    return base / "models" / client


def keep_job_models(
    *,
    models: Path,
    job: str,
    client_id: str,
    final_frame: bytes,
    final_state: dict[str, torch.Tensor],
    seed: int,
    rounds: int,
    train: dict[str, Any],
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]],
    text_features: torch.Tensor,
    classes: list[str],
    logit_scale: float,
    artifact: dict[str, Any] | None,
    signature_checked: bool,
    personalize_epochs: int,
    promote_margin: float,
    generator: torch.Generator,
    log: Callable[[str], None],
) -> KeptModels:
    """The final global (round `rounds`) and its personalized copy, gated on the val split."""
    tcfg = TrainConfig.from_untrusted(train) if train else TrainConfig()
    names = list(classes) or [f"class{i}" for i in range(int(text_features.shape[0]))]
    return keep_models(
        models,
        global_state=final_state,
        text_features=text_features,
        classes=names,
        logit_scale=logit_scale,
        train=splits["train"],
        val=splits["val"],
        train_cfg=tcfg,
        personalize_epochs=personalize_epochs,
        promote_margin=promote_margin,
        provenance={
            "job": job,
            "round": rounds,
            "client_id": client_id,
            "global_sha256": hashlib.sha256(final_frame).hexdigest(),
            "signature_checked": signature_checked,
            "artifact": artifact,
            "split_seed": seed,
        },
        generator=generator,
        log=log,
    )
