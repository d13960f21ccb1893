"""A small exported artifact and a matching dataset for tests that run the agent's path.

Why: the slim-install test and the doctor tests need a real artifact (manifest, hashes, golden
set, class features) without a download; fedclip-tiny with random weights exports in seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedclip_edge.data import synth

_SHARED: dict[str, tuple[Path, Path]] = {}


def make_dataset(root: Path, per_class: int = 3) -> Path:
    """One synthetic domain ('photo'), every class: enough images for a 60/20/20 split."""
    data = root / "data"
    if not data.is_dir():
        synth.write_dataset(data, per_class=per_class, seed=0, size=64, domains=["photo"])
    return data


def make_artifact(root: Path, data: Path) -> Path:
    """fedclip-tiny (random init, fp32) exported with the dataset's classes."""
    from fedclip_edge.exporters.export import export_artifact

    out = root / "artifact"
    if not (out / "manifest.json").is_file():
        export_artifact(
            out,
            model="fedclip-tiny",
            pretrained="none",
            precision="fp32",
            max_batch=4,
            opt_batch=2,
            classes=str(data),
            parity_per_domain=4,
            parity_random=4,
        )
    return out


def shared_artifact(factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(dataset, artifact), made once per test session and shared by every module using it."""
    if "tiny" not in _SHARED:
        root = factory.mktemp("tiny-artifact")
        data = make_dataset(root)
        _SHARED["tiny"] = (data, make_artifact(root, data))
    return _SHARED["tiny"]
