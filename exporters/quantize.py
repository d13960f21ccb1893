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

# Ops whose weights get quantized. In a ViT, Conv is only the patch embedding (~1% of the work)
# and quantizing it cost ~15-20% of int8 throughput on ViT-B-32 here (ConvInteger plus a
# quantization of the input image), so it stays fp32 unless convolutions hold most of the
# weights (ResNet towers), where int8 would otherwise quantize almost nothing.
QUANTIZED_OPS = ("MatMul", "Gemm")
CONV_SHARE_FOR_CONV = 0.5


def op_types_for(path: Path) -> list[str]:
    """MatMul/Gemm, plus Conv when convolution weights are most of the model's weights."""
    import numpy as np
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    conv = sum(sizes.get(n.input[1], 0) for n in model.graph.node if n.op_type == "Conv")
    total = sum(sizes.values()) or 1
    ops = list(QUANTIZED_OPS)
    if conv / total > CONV_SHARE_FOR_CONV:
        ops.append("Conv")
    return ops


def quantize_int8(
    fp32_path: Path,
    int8_path: Path,
    per_channel: bool = False,
    nodes_to_exclude: list[str] | None = None,
) -> list[str]:
    """Write a dynamically quantized (QInt8 weights) copy of `fp32_path` to `int8_path`;
    returns the op types that were quantized. `nodes_to_exclude` (node names) stay fp32."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as exc:  # pragma: no cover - onnxruntime is a dependency
        raise ExportError(f"int8 needs onnxruntime.quantization: {exc}") from exc
    ops = op_types_for(fp32_path)
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
                op_types_to_quantize=ops,
                nodes_to_exclude=list(nodes_to_exclude or []),
            )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else repr(exc)
        raise ExportError(f"int8 dynamic quantization failed: {first}") from exc
    finally:
        quiet.setLevel(level)
    if not int8_path.is_file():
        raise ExportError("int8 dynamic quantization wrote no file")
    return ops
