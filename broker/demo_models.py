"""The demo's last step (issue 17, item 6): each device's kept model, exported as one fused ONNX
classifier and measured on the device's test split, beside the same adapter in torch on the
device's cached features. The two must agree (within an image: the fused graph re-encodes the
images, the torch figure reads the features the agent cached).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedclip_edge.data.split import split_indices
from fedclip_edge.errors import FedClipError
from fedclip_edge.features import load_feature_cache
from fedclip_edge.serving.evaluate import score_classifier, score_version
from fedclip_edge.serving.store import ModelStore
from fedclip_edge.tables import pct, text_table


def models_dir(agents: Path, client: str) -> Path:
    """Where a demo device keeps its models (its agent's --models)."""
    return agents / f"{client}-models"


def measure_device(
    agents: Path, client: str, domain: str, data: Path, seed: int, *, log: Callable[[str], None]
) -> dict[str, Any]:
    """One device's row: its current model (else the gate's newest candidate, marked not
    promoted), the val accuracies the gate saw, and test accuracy in torch and through the fused
    ONNX graph."""
    from fedclip_edge.exporters.fused import FusedSource, export_fused
    from fedclip_edge.serving.classifier import open_classifier

    store = ModelStore(models_dir(agents, client))
    current = store.current()
    versions = store.versions()
    if current is None and not versions:
        return {"client": client, "version": None, "error": "no model kept"}
    candidates = [v for v in versions if v.manifest.get("gate_candidate")]
    version = current or (candidates or versions)[-1]
    fs = load_feature_cache(agents / f"{client}-cache", [domain])
    d = fs.domains[domain]
    test = torch.from_numpy(split_indices(len(d), seed)[2]).long()
    truth = [fs.class_names[int(y)] for y in d.labels[test]]
    torch_score = score_version(version, d.features[test], d.labels[test], fs.class_names)
    fused_dir = agents / f"{client}-fused"
    export_fused(FusedSource.from_version(version), fused_dir, overwrite=True)
    clf = open_classifier(fused_dir, backend="onnxruntime")
    try:
        fused_score = score_classifier(clf, [data / d.paths[int(i)] for i in test], truth)
    finally:
        clf.close()
    disagree = sum(a != b for a, b in zip(torch_score.predicted, fused_score.predicted,
                                          strict=True))
    log(f"    {client}: {version.name} exported to {fused_dir} (fused ONNX)")
    return {
        "client": client,
        "version": version.name,
        "current": current is not None,
        "gate": version.manifest.get("gate"),
        "val": version.accuracy,
        "test_n": torch_score.n,
        "test_torch": torch_score.accuracy,
        "test_torch_correct": torch_score.correct,
        "test_fused": fused_score.accuracy,
        "test_fused_correct": fused_score.correct,
        "predictions_differ": disagree,
        "fused": str(fused_dir),
    }


def device_models_table(rows: list[dict[str, Any]]) -> list[str]:
    """The demo's final table of what each device serves."""
    body = []
    for r in rows:
        if r.get("version") is None:
            body.append([r["client"], "-", "-", "-", "-", "-", "-", "-"])
            continue
        val = r["val"]
        mark = "" if r["current"] else " (kept, not promoted)"
        body.append([
            r["client"],
            r["version"] + mark,
            pct(val.get("zero_shot")),
            pct(val.get(r["version"].rsplit("-", 1)[1])),
            str(r["test_n"]),
            pct(r["test_torch"]),
            pct(r["test_fused"]),
            str(r["predictions_differ"]),
        ])
    return text_table(
        ["device", "model", "val zero-shot", "val model", "test n", "test torch",
         "test fused ONNX", "differ"],
        body,
    )


def measure_devices(
    agents: Path, clients: dict[str, str], data: Path, seed: int, *, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Every device's row; one device's failure is its row's error, not the demo's end."""
    rows = []
    for client, domain in clients.items():
        try:
            rows.append(measure_device(agents, client, domain, data, seed, log=log))
        except FedClipError as exc:
            log(f"    {client}: {exc}")
            rows.append({"client": client, "version": None, "error": str(exc)})
    return rows


def agree_within(row: dict[str, Any], images: int = 1) -> bool:
    """The fused graph's test accuracy is the torch one within `images` images."""
    if row.get("version") is None or not row["test_n"]:
        return False
    diff = abs(row["test_torch_correct"] - row["test_fused_correct"])
    return diff <= images and not math.isnan(row["test_fused"])
