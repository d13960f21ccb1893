"""Export fedclip-tiny (random init) once per precision per session.

Not a test module: a per-session cache so the export, runtime and extractor-benchmark tests share
the same artifacts (tests/conftest.py wraps it as the `exported_artifact` fixture).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from fedclip_edge.exporters.manifest import file_records

# The small model the export tests use; FEDCLIP_EXPORT_TEST_MODEL picks another small config
# (e.g. fedclip-tiny-vit) to run the same checks on a different tower. Random init ('none').
MODEL = os.environ.get("FEDCLIP_EXPORT_TEST_MODEL", "fedclip-tiny")
CLASSES = ["circle", "square", "star", "heart"]
MAX_BATCH = 5  # odd on purpose: a batch axis baked to 2 (the example batch) would show
_CACHE: dict[str, Path] = {}


def exported(factory: pytest.TempPathFactory, precision: str) -> Path:
    """Path of a fedclip-tiny artifact in `precision` (exported on first use this session)."""
    if precision not in _CACHE:
        from fedclip_edge.exporters.export import export_artifact

        root = factory.mktemp(f"artifact-{precision}")
        classes = root / "classes.txt"
        classes.write_text("# shapes\n" + "\n".join(CLASSES) + "\n")
        out = root / "artifact"
        export_artifact(
            out,
            model=MODEL,
            pretrained="none",
            precision=precision,
            max_batch=MAX_BATCH,
            opt_batch=2,
            classes=classes,
            text_encoder=precision == "fp32",
            trt=precision == "fp16",  # no TensorRT here: records the trtexec commands
        )
        _CACHE[precision] = out
    return _CACHE[precision]


def copy_artifact(src: Path, dst: Path) -> Path:
    """A private copy to tamper with."""
    shutil.copytree(src, dst)
    return dst


def rehash(root: Path) -> None:
    """Rewrite the manifest's file hashes (a tampered file that the manifest agrees with)."""
    path = root / "manifest.json"
    data = json.loads(path.read_text())
    data["files"] = file_records(root)
    path.write_text(json.dumps(data, indent=2))
