"""CUDA and TensorRT paths: run where a GPU (and TensorRT) is present, skip with a reason
elsewhere."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fedclip_edge.errors import ExportError
from fedclip_edge.exporters import names as N
from fedclip_edge.exporters.tensorrt_build import import_tensorrt

HAS_CUDA = torch.cuda.is_available()
TRT, TRT_WHY = import_tensorrt()

needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (torch sees none)")
needs_trt = pytest.mark.skipif(
    not HAS_CUDA or TRT is None,
    reason="needs TensorRT's Python bindings and a CUDA GPU"
    + ("" if TRT is not None else f" (tensorrt: {TRT_WHY})"),
)


def _ort_has(provider: str) -> bool:
    import onnxruntime as ort

    return provider in ort.get_available_providers()


def _export(root: Path, precision: str, trt: bool) -> Path:
    from fedclip_edge.exporters.export import export_artifact

    out = root / f"art-{precision}"
    export_artifact(
        out,
        model="fedclip-tiny",
        pretrained="none",
        precision=precision,
        max_batch=8,
        opt_batch=4,
        trt=trt,
        parity_per_domain=8,
        parity_random=8,
    )
    return out


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tmp_path_factory.mktemp("gpu"), "fp32", trt=False)


@pytest.mark.gpu
@needs_cuda
def test_torch_cuda_autocast_meets_the_fp16_bound(fp32: Path) -> None:
    from fedclip_edge.exporters.runtimes import open_extractor

    ext = open_extractor(fp32, "torch:cuda")
    assert ext.precision == "fp16" and ext.parity["min_cosine"] >= 0.999


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(
    not _ort_has("CUDAExecutionProvider"),
    reason="onnxruntime here has no CUDAExecutionProvider (needs onnxruntime-gpu)",
)
def test_onnxruntime_cuda(fp32: Path) -> None:
    from fedclip_edge.exporters.runtimes import open_extractor

    ext = open_extractor(fp32, "onnxruntime:cuda")
    assert ext.session.get_providers()[0] == "CUDAExecutionProvider"
    assert ext.extract(np.zeros((3, 3, 64, 64), np.float32)).shape == (3, 128)


@pytest.mark.gpu
@needs_cuda
def test_auto_prefers_the_gpu(fp32: Path) -> None:
    from fedclip_edge.exporters.runtimes import open_extractor

    ext = open_extractor(fp32, "auto")
    assert ext.device != "cpu" and "auto picked" in ext.picked


@pytest.mark.tensorrt
@needs_trt
@pytest.mark.skipif(
    not _ort_has("TensorrtExecutionProvider"),
    reason="onnxruntime here has no TensorrtExecutionProvider",
)
def test_onnxruntime_tensorrt_provider_caches_engines(
    fp32: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedclip_edge.exporters.runtimes import open_extractor

    monkeypatch.setenv("FEDCLIP_EDGE_CACHE", str(tmp_path))
    ext = open_extractor(fp32, "onnxruntime:tensorrt")
    ext.extract(np.zeros((2, 3, 64, 64), np.float32))
    assert any((tmp_path / "ort-tensorrt").rglob("*")), "no TensorRT engine cache written"


@pytest.fixture(scope="module")
def fp16_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tmp_path_factory.mktemp("trt"), "fp16", trt=True)


@pytest.mark.tensorrt
@needs_trt
def test_fp16_engine_build_records_version_gpu_and_profile(fp16_engine: Path) -> None:
    from fedclip_edge.exporters.manifest import read_manifest

    m = read_manifest(fp16_engine)
    rec = m["tensorrt"]
    assert rec["file"] == N.ENGINE_FILE and rec["tensorrt_version"] == TRT.__version__
    assert rec["gpu_name"] == torch.cuda.get_device_name(0)
    major, minor = torch.cuda.get_device_capability(0)
    assert rec["compute_capability"] == f"{major}.{minor}"
    assert rec["profile"]["min"][0] == 1 and rec["profile"]["opt"][0] == 4
    assert rec["profile"]["max"][0] == 8
    assert rec["parity"]["min_cosine"] >= 0.999
    assert rec["strongly_typed"] == (int(TRT.__version__.split(".")[0]) >= 11)
    assert (fp16_engine / N.TIMING_CACHE_FILE).stat().st_size > 0
    assert N.TRT_LOG_FILE in m["files"]


@pytest.mark.tensorrt
@needs_trt
def test_native_engine_at_batch_1_and_max(fp16_engine: Path) -> None:
    from fedclip_edge.exporters.runtimes import open_extractor

    ext = open_extractor(fp16_engine, "tensorrt")
    assert ext.backend == "tensorrt" and ext.parity["status"] == "passed"
    for n in (1, 8, 11):  # 11 > max: split into 8 + 3
        assert ext.extract(np.zeros((n, 3, 64, 64), np.float32)).shape == (n, 128)


@pytest.mark.tensorrt
@needs_trt
def test_mismatched_engine_is_refused(fp16_engine: Path, tmp_path: Path) -> None:
    from fedclip_edge.exporters.manifest import file_records
    from fedclip_edge.exporters.runtimes import open_extractor
    from fedclip_edge.exporters.tensorrt_build import read_engine, write_engine

    art = tmp_path / "art"
    shutil.copytree(fp16_engine, art)
    header, plan = read_engine(art / N.ENGINE_FILE)
    header["tensorrt_version"] = "9.9.9"
    write_engine(art / N.ENGINE_FILE, header, plan)
    manifest = json.loads((art / N.MANIFEST_FILE).read_text())
    manifest["files"] = file_records(art)  # the manifest agrees: only the header check can refuse
    (art / N.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="built with TensorRT 9.9.9"):
        open_extractor(art, "tensorrt")
    m = json.loads((art / N.MANIFEST_FILE).read_text())
    assert m["tensorrt"]["file"] == N.ENGINE_FILE
