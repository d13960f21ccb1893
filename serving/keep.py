"""What a device keeps at the end of a federation job (issue 17, item 1): the final global adapter
and its personalized copy as store versions, then the gate's decision.

One function the agent calls once, after the job's `done`: it knows nothing of MQTT, only tensors,
the store and where the model came from (job, round, the global frame's hash, whether its
signature was checked, the encoder artifact the adapter's features come from).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedclip_edge.adapter import AttentionAdapter
from fedclip_edge.config import TrainConfig
from fedclip_edge.errors import ModelStoreError
from fedclip_edge.serving.gate import (
    DEFAULT_PERSONALIZE_EPOCHS,
    DEFAULT_PROMOTE_MARGIN,
    GateDecision,
    check_margin,
    decide,
)
from fedclip_edge.serving.store import ModelStore, ModelVersion
from fedclip_edge.train import accuracy, personalize


@dataclass(frozen=True)
class KeptModels:
    """The versions written, the gate's decision and the store's current version after it."""

    global_version: ModelVersion
    personal_version: ModelVersion | None
    decision: GateDecision
    current: str | None
    accuracy: dict[str, Any]


def artifact_record(artifacts: Path) -> dict[str, Any]:
    """The encoder export an adapter pairs with (its features are the adapter's input): enough to
    find it again and to tell it from another export of other weights or precision."""
    path = Path(artifacts).resolve()
    try:
        raw = (path / "manifest.json").read_bytes()
        manifest = json.loads(raw)
    except (OSError, ValueError) as exc:
        raise ModelStoreError(f"{path / 'manifest.json'}: unreadable ({exc})") from None
    model = manifest.get("model") or {}
    return {
        "path": str(path),
        "manifest_sha256": hashlib.sha256(raw).hexdigest(),
        "model": model.get("name"),
        "weights_sha256": model.get("weights_sha256"),
        "precision": manifest.get("precision"),
    }


def _current_accuracy(
    store: ModelStore,
    val: tuple[torch.Tensor, torch.Tensor],
    classes: list[str],
    dim: int,
    log: Callable[[str], None],
) -> tuple[str | None, float | None]:
    """The current version's accuracy measured now on this split; None when it is for other
    classes or another width (not comparable), or unreadable (then it is no bar either)."""
    try:
        current = store.current()
    except ModelStoreError as exc:
        log(f"warning: the current model is unreadable, the gate ignores it: {exc}")
        return store.current_name(), None
    if current is None:
        return None, None
    if current.classes != classes or current.dim != dim:
        return current.name, None
    state, text, _ = current.load()
    adapter = AttentionAdapter(dim)
    adapter.load_state_dict(state)
    return current.name, accuracy(adapter, *val, text)


def keep_models(
    store: ModelStore | Path,
    *,
    global_state: Mapping[str, torch.Tensor],
    text_features: torch.Tensor,
    classes: list[str],
    logit_scale: float,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    train_cfg: TrainConfig,
    personalize_epochs: int = DEFAULT_PERSONALIZE_EPOCHS,
    promote_margin: float = DEFAULT_PROMOTE_MARGIN,
    provenance: Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
    log: Callable[[str], None] = print,
) -> KeptModels:
    """Write the global (and, with personalize_epochs > 0, the personalized) adapter as
    versions, measured on `val` against zero-shot and the current version; promote what the
    gate allows; one log line per decision. `provenance`: job, round, client_id,
    global_sha256, signature_checked, artifact (see docs/serving.md)."""
    store = store if isinstance(store, ModelStore) else ModelStore(store)
    margin = check_margin(promote_margin)
    if personalize_epochs < 0:
        raise ModelStoreError(f"--personalize-epochs {personalize_epochs}: 0 or more")
    dim = int(text_features.shape[1])
    state = {k: v.detach().float() for k, v in global_state.items()}
    glob = AttentionAdapter(dim)
    glob.load_state_dict(state)
    acc: dict[str, Any] = {
        "split": "val",
        "n": int(val[1].shape[0]),
        "zero_shot": accuracy(None, *val, text_features),
        "global": accuracy(glob, *val, text_features),
        "personal": None,
    }
    personal_state = None
    if personalize_epochs > 0:
        local = personalize(
            state,
            *train,
            text_features,
            train_cfg,
            personalize_epochs,
            logit_scale=logit_scale,
            generator=generator,
        )
        personal_state = local.state_dict()
        acc["personal"] = accuracy(local, *val, text_features)
    current_name, current_acc = _current_accuracy(store, val, classes, dim, log)
    decision = decide(
        zero_shot=acc["zero_shot"],
        global_acc=acc["global"],
        personal_acc=acc["personal"],
        current_acc=current_acc,
        current_name=current_name,
        margin=margin,
    )
    base = {
        **dict(provenance or {}),
        "classes": list(classes),
        "logit_scale": float(logit_scale),
        "accuracy": {
            k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in acc.items()
        },
        "gate_margin": margin,
    }
    if current_name is not None:
        base["compared_with"] = {"name": current_name, "val_accuracy": current_acc}
    written: dict[str, ModelVersion] = {}
    for kind, kind_state in (("global", state), ("personal", personal_state)):
        if kind_state is None:
            continue
        fields = {
            **base,
            "kind": kind,
            "promoted": decision.promote == kind,
            "gate_candidate": decision.candidate == kind,
            "gate": decision.reasons[kind],
        }
        if kind == "personal":
            fields["personalize_epochs"] = personalize_epochs
        written[kind] = store.add(kind_state, text_features, fields)
    for kind, version in written.items():
        if decision.promote == kind:
            store.promote(version.name, decision.reasons[kind])
        log(f"model {version.name}: {decision.reasons[kind]}")
    return KeptModels(
        global_version=written["global"],
        personal_version=written.get("personal"),
        decision=decision,
        current=store.current_name(),
        accuracy=acc,
    )
