"""`bench infer`, short: the tiny model, one fused precision, a 3 s service run with one hot
swap. Checks the report's structure and its arithmetic (ratios from the rows it holds), that
the service run failed no request, and that the markdown quotes the JSON's figures."""

from __future__ import annotations

import json

import pytest
from support import tiny_artifact

from fedclip_edge.benchmarks.infer import TORCH, run_infer_bench, synthetic_jpegs
from fedclip_edge.benchmarks.render import infer_markdown
from fedclip_edge.cli import main

pytestmark = pytest.mark.integration


def test_synthetic_jpegs_are_camera_sized_and_distinct() -> None:
    from io import BytesIO

    from PIL import Image

    imgs = synthetic_jpegs(3)
    assert len(set(imgs)) == 3
    assert Image.open(BytesIO(imgs[0])).size == (640, 480)


def test_bench_infer_short_run(tmp_path_factory: pytest.TempPathFactory, tmp_path) -> None:
    _, artifact = tiny_artifact.shared_artifact(tmp_path_factory)
    report = run_infer_bench(
        tmp_path, models=("fedclip-tiny",), precisions=("fp32",), batches=(1, 2), rounds=2,
        warmup=0, serve_seconds=3, serve_clients=3, serve_batch=2, swaps=1,
        artifacts={"fedclip-tiny": artifact},
    )
    rows = report["results"]
    assert {(r["backend"], r["batch"]) for r in rows} == {
        (b, n) for b in (TORCH, "fused fp32") for n in (1, 2)}
    for r in rows:
        assert r["images_per_s"] > 0 and r["p50_ms"] <= r["p99_ms"] and len(r["times_s"]) == 2
        torch_row = next(t for t in rows if t["backend"] == TORCH and t["batch"] == r["batch"])
        assert r["ratio_to_torch"] == pytest.approx(r["images_per_s"]
                                                    / torch_row["images_per_s"])
    assert any(s["backend"] == "fused TensorRT" for s in report["skipped"]) or any(
        "TensorRT" in r["backend"] for r in rows)
    s = report["serve"]
    assert s["failed"] == 0, s["errors"]
    assert s["service"]["ok"] > 0 and s["swaps_done"] == 1 and s["swaps"][0]["took_s"] > 0
    assert s["ratio"] == pytest.approx(s["service"]["images_per_s"] / s["bare"]["images_per_s"])
    assert sum(s["answers_by_version"].values()) == s["service_during_swaps"]["ok"]
    md = infer_markdown(report)
    assert f"{rows[0]['images_per_s']:.1f}" in md and f"{s['ratio']:.2f}x" in md
    json.dumps(report)  # JSON-ready


def test_bench_infer_command_refuses_bad_settings_in_one_line(tmp_path, capsys) -> None:
    code = main(["bench", "infer", "--out", str(tmp_path), "--models", "fedclip-tiny",
                 "--serve-model", "ViT-B-32", "--rounds", "1", "--precisions", "fp32"])
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1 and "--serve-model" in err, err
