"""open_extractor: backends on CPU, the golden-set check on load, refusal of bad artifacts."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from support.export import MAX_BATCH, copy_artifact, rehash

from fedclip_edge.data import synth
from fedclip_edge.errors import ExportError
from fedclip_edge.exporters import names as N
from fedclip_edge.exporters.preprocess import preprocess_images
from fedclip_edge.exporters.runtimes import Extractor, open_extractor, parse_backend


@pytest.fixture(scope="module")
def fp32(exported_artifact) -> Path:
    return exported_artifact("fp32")


def _images(n: int) -> np.ndarray:
    ims = [
        synth.render(synth.DOMAINS[i % 4], synth.CLASSES[i % 8], 5, i, size=64) for i in range(n)
    ]
    from fedclip_edge.exporters.preprocess import PreprocessConfig

    return preprocess_images(ims, PreprocessConfig(size=(64, 64)))


def test_auto_picks_onnxruntime_on_cpu_and_says_so(fp32: Path, tiny) -> None:
    ext = open_extractor(fp32)
    assert isinstance(ext, Extractor)
    assert ext.backend == "onnxruntime" and ext.picked and "auto picked onnxruntime" in ext.picked
    assert ext.parity["status"] == "passed" and ext.parity["min_cosine"] >= 0.9999
    x = _images(2 * MAX_BATCH + 1)  # more than max batch: split into chunks
    got = ext.extract(x)
    with torch.no_grad():
        ref = tiny.model.encode_image(torch.from_numpy(x)).numpy()
    assert got.shape == (len(x), 128) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=1e-4)
    assert ext.extract(x[:0]).shape == (0, 128)
    with pytest.raises(ExportError, match=r"expects \[N, 3, 64, 64\]"):
        ext.extract(np.zeros((2, 3, 32, 32), np.float32))


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_every_cpu_backend_passes_its_golden_check(
    exported_artifact, precision: str, backend: str
) -> None:
    ext = open_extractor(exported_artifact(precision), backend, device="cpu")
    assert ext.parity["status"] == "passed"
    assert ext.extract(_images(3)).shape == (3, 128)


def test_extract_images_uses_the_manifest_preprocessing(fp32: Path) -> None:
    ext = open_extractor(fp32, "onnxruntime:cpu")
    ims = [synth.render("sketch", "star", 1, i, size=90) for i in range(3)]
    np.testing.assert_allclose(
        ext.extract_images(ims), ext.extract(preprocess_images(ims, ext.preprocess)), atol=1e-6
    )
    names, feats = ext.class_features()
    assert names[:2] == ["circle", "square"] and feats.shape == (4, 128)


def test_tampered_onnx_is_refused(fp32: Path, tmp_path: Path) -> None:
    art = copy_artifact(fp32, tmp_path / "art")
    data = bytearray((art / N.IMAGE_ONNX_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (art / N.IMAGE_ONNX_FILE).write_bytes(bytes(data))
    with pytest.raises(ExportError, match=r"image_encoder\.onnx does not match its sha256"):
        open_extractor(art)


def test_truncated_file_is_refused(fp32: Path, tmp_path: Path) -> None:
    art = copy_artifact(fp32, tmp_path / "art")
    path = art / N.GOLDEN_FILE
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ExportError, match=r"golden\.npz has 100 bytes"):
        open_extractor(art)


def test_corrupt_onnx_gives_a_clear_error(fp32: Path, tmp_path: Path) -> None:
    art = copy_artifact(fp32, tmp_path / "art")
    (art / N.IMAGE_ONNX_FILE).write_bytes(b"this is not a protobuf" * 10)
    rehash(art)  # the manifest agrees with the broken file: the loader must still say why
    with pytest.raises(ExportError, match=r"ONNX Runtime cannot load image_encoder\.onnx"):
        open_extractor(art, "onnxruntime")


def test_manifest_naming_a_missing_file(fp32: Path, tmp_path: Path) -> None:
    art = copy_artifact(fp32, tmp_path / "art")
    (art / N.CLASS_FEATURES_FILE).unlink()
    with pytest.raises(ExportError, match=r"artifact file missing: .*class_features\.npz"):
        open_extractor(art)
    m = json.loads((art / N.MANIFEST_FILE).read_text())
    m["image_encoder"]["file"] = "elsewhere.onnx"
    (art / N.MANIFEST_FILE).write_text(json.dumps(m))
    with pytest.raises(ExportError, match="references elsewhere.onnx"):
        open_extractor(art)


def test_golden_miss_refuses_to_load(fp32: Path, tmp_path: Path) -> None:
    art = copy_artifact(fp32, tmp_path / "art")
    with np.load(art / N.GOLDEN_FILE) as g:
        inputs, feats = g["inputs"], g["features"]
    feats = feats.copy()
    feats[0] = -feats[0]  # as if this device's engine produced garbage for one image
    np.savez(art / N.GOLDEN_FILE, inputs=inputs, features=feats)
    rehash(art)
    with pytest.raises(ExportError, match="misses the golden-set parity bound on this device"):
        open_extractor(art, "onnxruntime")
    assert open_extractor(art, "onnxruntime", check_parity=False).parity is None


def test_torch_backend_refuses_other_weights(fp32: Path, tmp_path: Path) -> None:
    art = copy_artifact(fp32, tmp_path / "art")
    m = json.loads((art / N.MANIFEST_FILE).read_text())
    m["model"]["seed"] = 1  # random init with another seed: different weights
    (art / N.MANIFEST_FILE).write_text(json.dumps(m))
    with pytest.raises(ExportError, match="not the same model"):
        open_extractor(art, "torch")


def test_unavailable_backends_say_why(fp32: Path) -> None:
    from fedclip_edge.exporters.tensorrt_build import import_tensorrt

    with pytest.raises(ExportError, match="unknown backend"):
        open_extractor(fp32, "tvm")
    with pytest.raises(ExportError, match="no TensorRT engine"):
        open_extractor(fp32, "tensorrt")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ExportError, match="onnxruntime-gpu"):
            open_extractor(fp32, "onnxruntime:cuda")
    if not torch.cuda.is_available() and import_tensorrt()[0] is None:
        with pytest.raises(ExportError, match="no backend could open"):
            open_extractor(fp32, "auto", device="cuda")
    assert parse_backend("ort:tensorrt") == ("onnxruntime", "tensorrt")


def test_child_crash_becomes_an_export_error(monkeypatch: pytest.MonkeyPatch, fp32: Path) -> None:
    from fedclip_edge.exporters import ort_utils

    def fake_run(*args, **kwargs):
        return subprocess.CompletedProcess(args, -11, "", "")

    monkeypatch.setattr(ort_utils.subprocess, "run", fake_run)
    with pytest.raises(ExportError, match=r"crashed \(SIGSEGV\)"):
        ort_utils.run_isolated(
            fp32 / N.IMAGE_ONNX_FILE, N.IMAGE_INPUT, [np.zeros((1, 3, 64, 64), np.float32)]
        )


def test_engine_header_and_mismatch_messages(tmp_path: Path) -> None:
    from fedclip_edge.exporters import tensorrt_build as tb

    header = {
        "tensorrt_version": "10.3.0",
        "gpu_name": "Orin",
        "compute_capability": "8.7",
        "input": N.IMAGE_INPUT,
        "output": N.IMAGE_OUTPUT,
        "profile": {"min": [1, 3, 64, 64], "opt": [8, 3, 64, 64], "max": [32, 3, 64, 64]},
    }
    tb.write_engine(tmp_path / "e.engine", header, b"\x00plan-bytes")
    got, plan = tb.read_engine(tmp_path / "e.engine")
    assert got == header and plan == b"\x00plan-bytes"
    tb.check_engine_compat(got, "10.3.0", {"name": "Orin", "compute_capability": "8.7"})
    with pytest.raises(ExportError, match="built with TensorRT 10.3.0, this device has 11.0.1"):
        tb.check_engine_compat(got, "11.0.1", {"name": "Orin", "compute_capability": "8.7"})
    with pytest.raises(ExportError, match=r"built for Orin \(compute capability 8.7\)"):
        tb.check_engine_compat(got, "10.3.0", {"name": "NVIDIA H100", "compute_capability": "9.0"})
    (tmp_path / "raw.engine").write_bytes(b"raw trtexec plan")
    with pytest.raises(ExportError, match="no fedclip-edge engine header"):
        tb.read_engine(tmp_path / "raw.engine")
