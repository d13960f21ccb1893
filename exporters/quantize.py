"""fp32 ONNX -> int8 with ONNX Runtime dynamic quantization (for CPU devices).

Dynamic quantization stores MatMul/Gemm weights as int8 and quantizes activations per batch at
run time: no calibration data, a quarter of the file, and on this machine's 2 AVX-512/VNNI cores
2.9x the fp32 speed on ViT-B-32 at min cosine 0.9998 (shared/MEASURED.md). It runs on ONNX
Runtime's CPU provider; GPU providers and TensorRT want fp16 instead.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

from fedclip_edge.errors import ExportError

# Ops whose weights get quantized. Conv (the patch embedding) stays fp32: it is ~1% of the work
# and ConvInteger is slow on ORT's CPU provider.
QUANTIZED_OPS = ("MatMul", "Gemm")


def quantize_int8(fp32_path: Path, int8_path: Path, per_channel: bool = False) -> None:
    """Write a dynamically quantized (QInt8 weights) copy of `fp32_path` to `int8_path`."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as exc:  # pragma: no cover - onnxruntime is a dependency
        raise ExportError(f"int8 needs onnxruntime.quantization: {exc}") from exc
    quiet = logging.getLogger("root")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_dynamic(
                model_input=str(fp32_path),
                model_output=str(int8_path),
                weight_type=QuantType.QInt8,
                per_channel=per_channel,
                op_types_to_quantize=list(QUANTIZED_OPS),
            )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else repr(exc)
        raise ExportError(f"int8 dynamic quantization failed: {first}") from exc
    finally:
        quiet.setLevel(level)
    if not int8_path.is_file():
        raise ExportError("int8 dynamic quantization wrote no file")
