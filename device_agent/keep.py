"""The agent's end of job (issue 17): keep the final global adapter and its personalized copy in
this device's model store and let the gate pick what it serves (`serving.keep.keep_models`).

Separate from the loop so that the loop calls one function once, after the job's `done`. Nothing
here speaks MQTT: it turns what the loop received (the final global, decoded and, with signing
on, verified) into the store's inputs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from fedclip_edge.config import TrainConfig
from fedclip_edge.device_agent.agent_config import round_generator
from fedclip_edge.errors import ConfigError
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


def keep_final_models(agent: Any) -> KeptModels | None:
    """`agent` is the loop's Agent (duck-typed: an import would be a cycle). The final global
    (round `rounds`, the job's seed and training settings) and its personalized copy, measured
    on the device's val split, written to `agent.cfg.models` and gated; one line per decision."""
    g, state, cfg, data = agent.final_global, agent.final_state, agent.cfg, agent.data
    if g is None or state is None:
        agent.log("no final global adapter received: no model kept")
        return None
    try:
        tcfg = TrainConfig.from_untrusted(g.train) if g.train else TrainConfig()
    except ConfigError as exc:
        agent.log(f"error: the final global's training settings are refused ({exc}): no model "
                  "kept")
        return None
    splits = data.split(g.seed)
    classes = list(data.classes) or [f"class{i}" for i in range(int(data.text_features.shape[0]))]
    kept = keep_models(
        cfg.models,
        global_state=state,
        text_features=data.text_features,
        classes=classes,
        logit_scale=data.logit_scale,
        train=splits["train"],
        val=splits["val"],
        train_cfg=tcfg,
        personalize_epochs=cfg.personalize_epochs,
        promote_margin=cfg.promote_margin,
        provenance={
            "job": cfg.job,
            "round": g.rounds,
            "client_id": cfg.client_id,
            "global_sha256": hashlib.sha256(g.frame).hexdigest(),
            "signature_checked": agent._registry is not None,
            "artifact": data.artifact,
            "split_seed": g.seed,
        },
        # the round after the last: a generator no training round of this job used
        generator=round_generator(g.seed, g.rounds + 1, cfg.client_id),
        log=agent.log,
    )
    agent.log(f"models in {cfg.models}: current {kept.current or 'none'}")
    return kept
