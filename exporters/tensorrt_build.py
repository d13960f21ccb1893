"""ONNX -> TensorRT engine with the TensorRT Python API (TensorRT 10 and 11).

- TensorRT 10 (JetPack 6 on Orin): a weakly typed network; fp16 through `BuilderFlag.FP16`, with
  normalization, softmax and reduction layers constrained to fp32 (PREFER_PRECISION_CONSTRAINTS),
  the same islands the fp16 ONNX keeps. TF32 is switched off for fp32 engines so they meet the
  fp32 parity bound.
- TensorRT 11: weak typing is gone (no FP16 flag, no precision constraints); every network is
  strongly typed, so the precision comes from the ONNX types: the fp16 artifact's graph, which
  already carries fp32 islands and fp32 I/O.
Every step's result is checked (parser errors, a None from build_serialized_network), the build
log's warnings are kept, a timing cache is used and saved, and the optimization profile covers
batch 1..max-batch with `opt` at a typical device batch (a static batch-1 engine is the classic
trap with dynamic-axis ONNX files).

Engines only run on the GPU model and TensorRT version that built them. The engine file starts
with a small header (magic, length, JSON: TensorRT version, GPU name, compute capability,
profile) so a loader can refuse a mismatch with a clear message before TensorRT sees the bytes.
Where TensorRT is not importable, `trtexec_commands` gives the equivalent command line.
"""

from __future__ import annotations

import json
import shlex
import struct
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedclip_edge.errors import ExportError

ENGINE_MAGIC = b"FCEDGTRT"  # 8 bytes, then uint32 little-endian header length, header, plan
_HEADER_STRUCT = struct.Struct("<I")
MAX_WARNINGS_IN_MANIFEST = 50


def import_tensorrt() -> tuple[Any | None, str]:
    """(module, "") when TensorRT's Python bindings import, else (None, reason)."""
    try:
        import tensorrt as trt  # type: ignore[import-not-found]
    except Exception as exc:  # ImportError, or a broken install raising OSError
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0]
    if not hasattr(trt, "Builder"):  # a namespace package: stubs only (tensorrt-stubs), no .so
        where = ", ".join(getattr(trt, "__path__", [])) or "?"
        return None, f"{where} holds no TensorRT bindings (type stubs only, or a broken install)"
    return trt, ""


def trt_major(trt: Any) -> int:
    return int(str(trt.__version__).split(".")[0])


def gpu_info(device: int = 0) -> dict[str, str]:
    """Name and compute capability of the CUDA device (torch, cuda-python, then nvidia-smi)."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(device)
            return {
                "name": torch.cuda.get_device_name(device),
                "compute_capability": f"{major}.{minor}",
            }
    except Exception:  # torch missing or CUDA broken: try cuda-python, then nvidia-smi
        pass
    try:  # cuda-python ships beside TensorRT on some Jetson images; nvidia-smi may not
        try:
            from cuda.bindings import runtime as cudart  # type: ignore[import-not-found]
        except ImportError:
            from cuda import cudart  # type: ignore[import-not-found,no-redef]
        err, prop = cudart.cudaGetDeviceProperties(device)
        if int(err) == 0:
            name = prop.name.decode() if isinstance(prop.name, bytes) else str(prop.name)
            return {
                "name": name.strip("\x00 "),
                "compute_capability": f"{prop.major}.{prop.minor}",
            }
    except Exception:
        pass
    try:
        out = (
            subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=name,compute_cap",
                    "--format=csv,noheader",
                    f"--id={device}",
                ],
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            )
            .stdout.strip()
            .splitlines()
        )
        name, cap = (s.strip() for s in out[0].split(","))
        return {"name": name, "compute_capability": cap}
    except Exception as exc:
        raise ExportError(f"cannot identify the GPU (no CUDA device visible?): {exc}") from exc


# --------------------------------------------------------------------------- engine file I/O


def write_engine(path: Path, header: dict[str, Any], plan: bytes) -> None:
    """Engine file = magic + header length + JSON header + TensorRT plan."""
    blob = json.dumps(header, sort_keys=True).encode()
    with open(path, "wb") as f:
        f.write(ENGINE_MAGIC)
        f.write(_HEADER_STRUCT.pack(len(blob)))
        f.write(blob)
        f.write(plan)


def read_engine(path: Path) -> tuple[dict[str, Any], bytes]:
    """(header, plan) of an engine file written by `write_engine`."""
    data = Path(path).read_bytes()
    n = len(ENGINE_MAGIC)
    if data[:n] != ENGINE_MAGIC:
        raise ExportError(
            f"{Path(path).name} has no fedclip-edge engine header (a raw trtexec plan?): "
            "wrap it with fedclip_edge.exporters.tensorrt_build.adopt_engine on the device"
        )
    (length,) = _HEADER_STRUCT.unpack_from(data, n)
    start = n + _HEADER_STRUCT.size
    try:
        header = json.loads(data[start : start + length])
    except ValueError as exc:
        raise ExportError(f"{Path(path).name}: corrupt engine header") from exc
    return header, data[start + length :]


def check_engine_compat(header: dict[str, Any], trt_version: str, gpu: dict[str, str]) -> None:
    """Refuse an engine built by another TensorRT version or for another GPU."""
    built_v = header.get("tensorrt_version")
    if built_v != trt_version:
        raise ExportError(
            f"engine was built with TensorRT {built_v}, this device has {trt_version}: "
            "rebuild it here (fedclip-edge export ... --trt) or use the ONNX file"
        )
    built_cc, built_gpu = header.get("compute_capability"), header.get("gpu_name")
    if built_cc != gpu["compute_capability"] or built_gpu != gpu["name"]:
        raise ExportError(
            f"engine was built for {built_gpu} (compute capability {built_cc}), this device is "
            f"{gpu['name']} ({gpu['compute_capability']}): engines do not move between GPUs; "
            "rebuild it here or use the ONNX file"
        )


# --------------------------------------------------------------------------- build


def _make_logger(trt: Any) -> Any:
    class CapturingLogger(trt.ILogger):
        """Keeps every message at WARNING or above (and INFO, for the log file)."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.records: list[tuple[str, str]] = []

        def log(self, severity: Any, msg: str) -> None:
            name = getattr(severity, "name", str(severity))
            if "VERBOSE" not in name:
                self.records.append((name, str(msg)))

    return CapturingLogger()


def _errors(logger: Any) -> list[str]:
    return [m for s, m in logger.records if "ERROR" in s]


def _warnings(logger: Any) -> list[str]:
    return [m for s, m in logger.records if "WARNING" in s]


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    *,
    input_name: str,
    output_name: str,
    image_size: Sequence[int],
    max_batch: int,
    opt_batch: int,
    precision: str,
    timing_cache_path: Path,
    log_path: Path,
    workspace_bytes: int = 2 << 30,
) -> dict[str, Any]:
    """Build and write the engine; returns the manifest's `tensorrt` record."""
    trt, why = import_tensorrt()
    if trt is None:
        raise ExportError(f"TensorRT is not importable here ({why})")
    if precision == "int8":
        raise ExportError(
            "int8 artifacts use ONNX Runtime dynamic quantization (CPU); TensorRT int8 needs "
            "explicit Q/DQ quantization, which this exporter does not do: "
            "use --precision fp16 --trt"
        )
    major = trt_major(trt)
    gpu = gpu_info()
    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    if builder is None:
        raise ExportError("TensorRT could not create a builder (no usable GPU?)")
    strongly_typed = major >= 11
    flags = 0
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)] or _errors(logger)
        raise ExportError(
            f"TensorRT could not parse {Path(onnx_path).name}: {'; '.join(errs)[:500]}"
        )
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if input_name not in names:
        raise ExportError(f"parsed network has inputs {names}, expected {input_name!r}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    h, w = int(image_size[0]), int(image_size[1])
    opt_batch = max(1, min(int(opt_batch), int(max_batch)))
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, (1, 3, h, w), (opt_batch, 3, h, w), (int(max_batch), 3, h, w))
    if config.add_optimization_profile(profile) < 0:
        raise ExportError("TensorRT rejected the optimization profile")
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    constrained = 0
    if precision == "fp16" and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        keep = {trt.LayerType.SOFTMAX, trt.LayerType.REDUCE}
        if hasattr(trt.LayerType, "NORMALIZATION"):
            keep.add(trt.LayerType.NORMALIZATION)
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            floats = layer.num_outputs > 0 and all(
                layer.get_output(j).dtype in (trt.float32, trt.float16)
                for j in range(layer.num_outputs)
            )
            if layer.type in keep and floats:  # not reductions over shape tensors
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
                constrained += 1

    cache_bytes = timing_cache_path.read_bytes() if timing_cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    if cache is None or not config.set_timing_cache(cache, False):
        raise ExportError("TensorRT rejected the timing cache (built by another version?)")

    plan = builder.build_serialized_network(network, config)
    log_path.write_text("".join(f"[{s}] {m}\n" for s, m in logger.records))
    if plan is None:
        errs = _errors(logger)
        raise ExportError(
            "TensorRT engine build failed: "
            + ("; ".join(errs)[:500] if errs else f"see {log_path}")
        )
    timing_cache_path.write_bytes(bytes(cache.serialize()))

    header = {
        "tensorrt_version": str(trt.__version__),
        "gpu_name": gpu["name"],
        "compute_capability": gpu["compute_capability"],
        "precision": precision,
        "strongly_typed": strongly_typed,
        "input": input_name,
        "output": output_name,
        "profile": {
            "min": [1, 3, h, w],
            "opt": [opt_batch, 3, h, w],
            "max": [int(max_batch), 3, h, w],
        },
    }
    write_engine(engine_path, header, bytes(plan))

    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(bytes(plan))
    if engine is None:
        raise ExportError(
            f"the engine just built does not deserialize: {'; '.join(_errors(logger))[:300]}"
        )
    io_names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    if input_name not in io_names or output_name not in io_names:
        raise ExportError(
            f"engine tensors are {io_names}, expected {input_name!r} and {output_name!r}"
        )

    warnings = _warnings(logger)
    return {
        "file": engine_path.name,
        **header,
        "fp16_flag": precision == "fp16" and not strongly_typed,
        "fp32_constrained_layers": constrained,
        "timing_cache": timing_cache_path.name,
        "build_log": log_path.name,
        "build_warnings": warnings[:MAX_WARNINGS_IN_MANIFEST],
        "build_warning_count": len(warnings),
    }


def fp32_layer_names(onnx_path: Path) -> list[str]:
    """ONNX node names of the fp32 islands (TensorRT names parsed layers after their nodes)."""
    import onnx

    from fedclip_edge.exporters.fp16 import FP32_OPS

    model = onnx.load(str(onnx_path), load_external_data=False)
    return [n.name for n in model.graph.node if n.op_type in FP32_OPS and n.name]


def trtexec_commands(
    onnx_path: Path,
    engine_path: Path,
    *,
    input_name: str,
    image_size: Sequence[int],
    max_batch: int,
    opt_batch: int,
    precision: str,
    fp32_layers: Sequence[str] = (),
    trtexec: str = "/usr/src/tensorrt/bin/trtexec",
) -> dict[str, str]:
    """The equivalent trtexec command lines for TensorRT 10 and 11 (run them on the device).

    TensorRT 10: `--fp16` with the normalization/softmax layers pinned to fp32 by name.
    TensorRT 11: no precision flags (strong typing is always on; the ONNX types decide).
    """
    h, w = int(image_size[0]), int(image_size[1])
    opt_batch = max(1, min(int(opt_batch), int(max_batch)))
    base = [
        trtexec,
        f"--onnx={onnx_path}",
        f"--saveEngine={engine_path}",
        f"--minShapes={input_name}:1x3x{h}x{w}",
        f"--optShapes={input_name}:{opt_batch}x3x{h}x{w}",
        f"--maxShapes={input_name}:{max_batch}x3x{h}x{w}",
        f"--timingCacheFile={Path(engine_path).with_suffix('.timing.cache')}",
    ]
    v10 = list(base)
    if precision == "fp16":
        v10 += ["--fp16"]
        if fp32_layers:
            v10 += [
                "--precisionConstraints=prefer",
                "--layerPrecisions=" + ",".join(f"{n}:fp32" for n in fp32_layers),
            ]
    elif precision == "fp32":
        v10 += ["--noTF32"]
    v11 = list(base) + (["--noTF32"] if precision == "fp32" else [])
    return {"tensorrt10": shlex.join(v10), "tensorrt11": shlex.join(v11)}


def adopt_engine(artifact_dir: Path, engine_file: Path) -> dict[str, Any]:
    """Adopt a raw plan built on this device (e.g. by the printed trtexec command).

    Wraps it with the engine header (this machine's TensorRT version and GPU), records it in the
    manifest and re-hashes the files. The golden-set check runs when the engine is loaded.
    Needs TensorRT's Python bindings here, to record the version that will load the engine.
    """
    from fedclip_edge.exporters.manifest import read_manifest, verify_artifact, write_manifest
    from fedclip_edge.exporters.names import ENGINE_FILE, IMAGE_INPUT, IMAGE_OUTPUT

    trt, why = import_tensorrt()
    if trt is None:
        raise ExportError(f"adopting an engine needs TensorRT's Python bindings ({why})")
    artifact_dir = Path(artifact_dir)
    manifest = verify_artifact(artifact_dir, read_manifest(artifact_dir))
    plan = Path(engine_file).read_bytes()
    if plan[: len(ENGINE_MAGIC)] == ENGINE_MAGIC:
        raise ExportError(f"{engine_file} already carries a fedclip-edge header")
    gpu = gpu_info()
    h, w = manifest["preprocess"]["size"]
    mb = int(manifest["max_batch"])
    opt = int(manifest.get("opt_batch", min(8, mb)))
    header = {
        "tensorrt_version": str(trt.__version__),
        "gpu_name": gpu["name"],
        "compute_capability": gpu["compute_capability"],
        "precision": manifest["precision"],
        "strongly_typed": trt_major(trt) >= 11,
        "input": IMAGE_INPUT,
        "output": IMAGE_OUTPUT,
        "profile": {"min": [1, 3, h, w], "opt": [opt, 3, h, w], "max": [mb, 3, h, w]},
        "built_by": "trtexec (adopted)",
    }
    write_engine(artifact_dir / ENGINE_FILE, header, plan)
    manifest["tensorrt"] = {"file": ENGINE_FILE, **header}
    return write_manifest(artifact_dir, manifest)
