"""The extractor benchmark on two small exported artifacts: every (artifact, backend, batch)
row is measured, torch eager is the 1.0 reference, and the report serialises and renders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.export import copy_artifact

from fedclip_edge.benchmarks.extractor import render_table, run_extractor_bench


def test_bench_extractor_side_by_side(exported_artifact, tmp_path: Path) -> None:
    root = tmp_path / "arts"
    root.mkdir()
    for p in ("fp32", "int8"):
        copy_artifact(exported_artifact(p), root / p)
    report = run_extractor_bench(
        root, backends=("torch", "onnxruntime"), batches=(1, 4), repeats=2, warmup=1
    )
    rows = {(r["artifact"], r["backend"], r["batch"]): r for r in report["results"]}
    assert len(rows) == 3 * 2  # torch once (same model), onnxruntime per artifact; 2 batches
    torch_rows = [r for r in report["results"] if r["backend"] == "torch"]
    assert all(r["ratio_to_torch_eager"] == pytest.approx(1.0) for r in torch_rows)
    assert all(r["images_per_s"] > 0 and len(r["times_s"]) == 2 for r in report["results"])
    assert report["targets"][0]["what"].startswith("onnxruntime fp32 vs torch eager")
    json.dumps(report)
    render_table(report)
