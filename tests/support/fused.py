"""Model versions and fused exports of fedclip-tiny for the serving and fused-export tests.

Why: the fused export, `open_classifier` and `classify` need a model version that pairs with a
real encoder artifact. This builds one with `ModelStore.add` (as the agent does) from the shared
random-init artifact (tests/support/export.py) and a seeded, untrained AttentionAdapter; the
fused exports are made once per precision per session.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedclip_edge.adapter import AttentionAdapter
from fedclip_edge.exporters.manifest import sha256_file
from fedclip_edge.serving.store import ModelStore, ModelVersion

_FUSED: dict[str, tuple[Path, Path]] = {}


def adapter_state(dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return AttentionAdapter(dim).state_dict()


def add_version(
    store: Path, artifact: Path, *, seed: int = 0, kind: str = "global", promote: bool = True
) -> ModelVersion:
    """A version of `artifact`'s classes (their prompt features) with a seeded adapter."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    with np.load(artifact / manifest["class_features"]["file"]) as data:
        text = torch.from_numpy(data["features"].astype(np.float32))
        classes = [str(c) for c in data["classes"]]
    s = ModelStore(store)
    v = s.add(
        adapter_state(int(manifest["model"]["embed_dim"]), seed),
        text,
        {
            "kind": kind,
            "job": "test-job",
            "round": 3,
            "client_id": "dev-1",
            "global_sha256": "0" * 64,
            "signature_checked": False,
            "artifact": {
                "path": str(artifact.absolute()),
                "manifest_sha256": sha256_file(artifact / "manifest.json"),
                "model": manifest["model"]["name"],
                "weights_sha256": manifest["model"]["weights_sha256"],
                "precision": manifest["precision"],
            },
            "logit_scale": float(manifest["model"]["logit_scale"]),
            "classes": classes,
        },
    )
    if promote:
        s.promote(v.name, "test")
    return v


def fused_export(
    factory: pytest.TempPathFactory, artifact: Path, precision: str
) -> tuple[Path, Path]:
    """(store, fused export of its current version in `precision`), once per session."""
    if precision not in _FUSED:
        from fedclip_edge.exporters.fused import FusedSource, export_fused

        root = factory.mktemp(f"fused-{precision}")
        store = root / "store"
        v = add_version(store, artifact)
        export_fused(FusedSource.from_version(v), root / "fused", precision=precision,
                     parity_per_domain=5, parity_random=5)
        _FUSED[precision] = (store, root / "fused")
    return _FUSED[precision]
