"""Export of fedclip-tiny (random init) in fp32, fp16 and int8: graph, parity, manifest, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from support.export import CLASSES, MAX_BATCH, MODEL

from fedclip_edge.errors import ExportError
from fedclip_edge.exporters import names as N
from fedclip_edge.exporters import parity
from fedclip_edge.exporters.manifest import read_manifest, sha256_file, verify_artifact
from fedclip_edge.models import encode_prompts


@pytest.fixture(scope="module", params=["fp32", "fp16", "int8"])
def artifact(request: pytest.FixtureRequest, exported_artifact) -> Path:
    return exported_artifact(request.param)


def _session(path: Path, precision: str):
    opts = ["NchwcTransformer"] if precision == "fp16" else None  # see ort_utils
    return ort.InferenceSession(
        str(path), providers=["CPUExecutionProvider"], disabled_optimizers=opts
    )


def test_manifest_schema(artifact: Path, tiny) -> None:
    m = read_manifest(artifact)
    assert m["schema"] == N.SCHEMA and m["schema_version"] == N.SCHEMA_VERSION
    assert m["model"]["name"] == MODEL and m["model"]["pretrained"] == "none"
    assert m["model"]["weights_sha256"] == tiny.weights_sha256
    assert m["model"]["embed_dim"] == 128
    assert m["preprocess"] == {**tiny.preprocess_cfg, "size": [64, 64]}
    assert m["opset"] >= 17 and m["max_batch"] == MAX_BATCH
    enc = m["image_encoder"]
    assert enc["inputs"] == [
        {"name": N.IMAGE_INPUT, "dtype": "float32", "shape": [N.BATCH_AXIS, 3, 64, 64]}
    ]
    assert enc["outputs"] == [
        {"name": N.IMAGE_OUTPUT, "dtype": "float32", "shape": [N.BATCH_AXIS, 128]}
    ]
    for key in ("torch", "open_clip", "onnx", "onnxruntime"):
        assert m["versions"][key]
    for rel, rec in m["files"].items():
        assert sha256_file(artifact / rel) == rec["sha256"]
    assert {N.IMAGE_ONNX_FILE, N.GOLDEN_FILE, N.CLASS_FEATURES_FILE} <= set(m["files"])
    assert m["class_features"]["classes"] == CLASSES
    assert verify_artifact(artifact)["precision"] == m["precision"]


def test_parity_meets_its_bound(artifact: Path) -> None:
    m = read_manifest(artifact)
    p = m["parity"]
    bound = parity.BOUNDS[m["precision"]]
    assert p["status"] == "passed"
    assert p["min_cosine"] >= bound.min_cosine
    assert p["top1_agreement"] >= bound.min_top1_agreement
    assert set(p["sets"]) == {"real", "random", "batch_1", f"batch_{MAX_BATCH}"}
    assert p["sets"]["real"]["count"] == 80 and p["sets"]["random"]["count"] == 20
    assert p["top1_agreement_over"]["count"] == 100
    assert p["dynamic_batch_checked"] == [1, MAX_BATCH]


def test_onnx_checker_and_opset(artifact: Path) -> None:
    path = artifact / N.IMAGE_ONNX_FILE
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == [N.IMAGE_INPUT]
    assert [o.name for o in model.graph.output] == [N.IMAGE_OUTPUT]
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def test_dynamic_batch_really_works(artifact: Path, tiny) -> None:
    m = read_manifest(artifact)
    sess = _session(artifact / N.IMAGE_ONNX_FILE, m["precision"])
    bound = parity.BOUNDS[m["precision"]].min_cosine
    x = np.random.default_rng(7).standard_normal((MAX_BATCH + 2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        ref = tiny.model.encode_image(torch.from_numpy(x)).numpy()
    for n in (1, 2, MAX_BATCH, MAX_BATCH + 2):
        got = sess.run(None, {N.IMAGE_INPUT: x[:n]})[0]
        assert got.shape == (n, 128) and got.dtype == np.float32
        assert parity.cosine_rows(ref[:n], got).min() >= bound


def test_golden_set_is_pytorch_fp32(artifact: Path, tiny) -> None:
    with np.load(artifact / N.GOLDEN_FILE) as g:
        inputs, feats = g["inputs"], g["features"]
    assert inputs.shape == (6, 3, 64, 64) and feats.shape == (6, 128)
    with torch.no_grad():
        ref = tiny.model.encode_image(torch.from_numpy(inputs)).numpy()
    np.testing.assert_allclose(feats, ref, atol=1e-5)


def test_class_features_ship_with_the_model(artifact: Path, tiny) -> None:
    with np.load(artifact / N.CLASS_FEATURES_FILE) as d:
        assert [str(c) for c in d["classes"]] == CLASSES
        np.testing.assert_allclose(d["features"], encode_prompts(tiny, CLASSES).numpy(), atol=1e-5)


def test_fp16_keeps_normalization_softmax_and_io_in_fp32(exported_artifact) -> None:
    from fedclip_edge.exporters.fp16 import FP32_OPS

    art = exported_artifact("fp16")
    model = onnx.shape_inference.infer_shapes(onnx.load(str(art / N.IMAGE_ONNX_FILE)))
    g = model.graph
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in list(g.value_info) + list(g.input) + list(g.output)
    }
    types.update({i.name: i.data_type for i in g.initializer})
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert types[N.IMAGE_INPUT] == f32 and types[N.IMAGE_OUTPUT] == f32
    fp32_model = onnx.load(str(exported_artifact("fp32") / N.IMAGE_ONNX_FILE))
    expected = sum(n.op_type in FP32_OPS for n in fp32_model.graph.node)
    islands = [n for n in g.node if n.op_type in FP32_OPS]
    assert expected > 0 and len(islands) == expected  # every LayerNorm/Softmax/... kept
    for node in islands:
        assert types[node.input[0]] == f32 and types[node.output[0]] == f32, node.name
    inits = {t.name for t in g.initializer}
    weights = [
        n.input[1]
        for n in g.node
        if n.op_type in ("MatMul", "Gemm", "Conv") and n.input[1] in inits
    ]
    assert weights and all(types[w] == f16 for w in weights)
    m = read_manifest(art)
    fp32 = read_manifest(exported_artifact("fp32"))
    assert m["files"][N.IMAGE_ONNX_FILE]["bytes"] < 0.6 * fp32["files"][N.IMAGE_ONNX_FILE]["bytes"]
    assert "child process" in m["parity"]["measured_on"]


def test_int8_is_dynamically_quantized(exported_artifact) -> None:
    art = exported_artifact("int8")
    ops = {n.op_type for n in onnx.load(str(art / N.IMAGE_ONNX_FILE)).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops
    m = read_manifest(art)
    assert m["image_encoder"]["int8"]["weight_type"] == "QInt8"
    fp32 = read_manifest(exported_artifact("fp32"))
    assert m["files"][N.IMAGE_ONNX_FILE]["bytes"] < 0.6 * fp32["files"][N.IMAGE_ONNX_FILE]["bytes"]


def test_text_encoder_on_request(exported_artifact, tiny) -> None:
    art = exported_artifact("fp32")
    m = read_manifest(art)
    entry = m["text_encoder"]
    assert (
        entry["inputs"][0]["name"] == N.TEXT_INPUT and entry["outputs"][0]["name"] == N.TEXT_OUTPUT
    )
    tokens = tiny.tokenizer(["a picture of a star", "a picture of a moon", "x"])
    sess = ort.InferenceSession(str(art / entry["file"]), providers=["CPUExecutionProvider"])
    got = sess.run(None, {N.TEXT_INPUT: tokens.numpy()})[0]
    with torch.no_grad():
        ref = tiny.model.encode_text(tokens).numpy()
    assert parity.cosine_rows(ref, got).min() >= 0.9999


def test_trt_without_tensorrt_gives_trtexec_commands(exported_artifact) -> None:
    from fedclip_edge.exporters.tensorrt_build import import_tensorrt

    if import_tensorrt()[0] is not None:
        pytest.skip("TensorRT is importable here: the engine path is covered in tests/gpu")
    m = read_manifest(exported_artifact("fp16"))
    trt = m["tensorrt"]
    assert trt["status"] == "not built" and "not importable" in trt["reason"]
    v10, v11 = trt["trtexec"]["tensorrt10"], trt["trtexec"]["tensorrt11"]
    for cmd in (v10, v11):
        assert (
            "--minShapes=image:1x3x64x64" in cmd and f"--maxShapes=image:{MAX_BATCH}x3x64x64" in cmd
        )
        assert "--optShapes=image:2x3x64x64" in cmd and "--timingCacheFile=" in cmd
    assert "--fp16" in v10 and "--precisionConstraints=prefer" in v10 and ":fp32" in v10
    assert "--fp16" not in v11 and "--layerPrecisions" not in v11


def test_failed_parity_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedclip_edge.exporters.export import export_artifact

    monkeypatch.setitem(
        parity.BOUNDS, "fp32", parity.Bound(min_cosine=1.5, min_top1_agreement=0.99)
    )
    out = tmp_path / "art"
    with pytest.raises(
        ExportError, match=r"misses its parity bound: min cosine 1\.0000\d* \(bound 1\.5\)"
    ):
        export_artifact(
            out, model=MODEL, pretrained="none", max_batch=2, parity_per_domain=2, parity_random=2
        )
    assert list(tmp_path.iterdir()) == []  # no artifact, no staging directory


def test_existing_out_needs_force(tmp_path: Path) -> None:
    from fedclip_edge.exporters.export import export_artifact

    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="--force"):
        export_artifact(tmp_path / "art", model=MODEL, pretrained="none")
    assert (tmp_path / "art" / "keep.txt").read_text() == "mine"


def test_bad_options_fail_early(tmp_path: Path) -> None:
    from fedclip_edge.exporters.export import export_artifact, resolve_classes

    with pytest.raises(ExportError, match="int8"):
        export_artifact(tmp_path / "a", pretrained="none", precision="int8", trt=True)
    with pytest.raises(ExportError, match="precision"):
        export_artifact(tmp_path / "a", pretrained="none", precision="bf16")
    with pytest.raises(ExportError, match="opset"):
        export_artifact(tmp_path / "a", pretrained="none", opset=13)
    with pytest.raises(ExportError, match="no such file"):
        resolve_classes(tmp_path / "missing.txt")
    (tmp_path / "dup.txt").write_text("cat\ndog\ncat\n")
    with pytest.raises(ExportError, match="more than once"):
        resolve_classes(tmp_path / "dup.txt")


def test_classes_from_a_dataset_folder(tmp_path: Path) -> None:
    from fedclip_edge.data import synth
    from fedclip_edge.exporters.export import resolve_classes

    synth.write_dataset(tmp_path / "data", per_class=1, seed=0, size=16)
    assert resolve_classes(tmp_path / "data") == list(synth.CLASSES)


def test_cli_export_and_its_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from fedclip_edge.cli import main

    out = tmp_path / "cli-art"
    args = f"export -m {MODEL} --pretrained none --precision int8 --max-batch 3 --out".split()
    code = main([*args, str(out)])
    assert code == 0, capsys.readouterr().err
    assert read_manifest(out)["precision"] == "int8"
    assert "min cosine" in capsys.readouterr().out
    code = main(["export", "-m", MODEL, "--pretrained", "none", "--out", str(out)])
    assert code == ExportError.exit_code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--force" in err and "Traceback" not in err


def test_manifest_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="not found"):
        read_manifest(tmp_path / "nowhere")
    (tmp_path / "a").mkdir()
    with pytest.raises(ExportError, match="no manifest.json"):
        read_manifest(tmp_path / "a")
    (tmp_path / "a" / "manifest.json").write_text("{not json")
    with pytest.raises(ExportError, match="not valid JSON"):
        read_manifest(tmp_path / "a")
    (tmp_path / "a" / "manifest.json").write_text(
        json.dumps({"schema": N.SCHEMA, "schema_version": 99})
    )
    with pytest.raises(ExportError, match="version 99 is not supported"):
        read_manifest(tmp_path / "a")


def test_a_provider_crash_is_an_export_error(tmp_path: Path, monkeypatch) -> None:
    """fp16 checks run in a child process: a child that dies of SIGSEGV (as onnxruntime 1.32's
    CPU provider did on an fp16 ViT graph) must end the export with one clear line and leave
    nothing behind, not kill the CLI."""
    import sys

    from fedclip_edge.exporters import ort_utils
    from fedclip_edge.exporters.export import export_artifact

    crash = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
    monkeypatch.setattr(ort_utils, "child_command", lambda req: [sys.executable, "-c", crash])
    out = tmp_path / "art"
    with pytest.raises(ExportError, match=r"ONNX Runtime crashed \(SIGSEGV\) while running"):
        export_artifact(
            out,
            model=MODEL,
            pretrained="none",
            precision="fp16",
            max_batch=2,
            parity_per_domain=1,
            parity_random=2,
        )
    assert list(tmp_path.iterdir()) == []
