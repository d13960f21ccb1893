"""The adapter head as an ONNX graph, and its composition with an encoder artifact's graph.

The head is written with `onnx.helper` from the adapter's weights (no tracing): raw image features
[N, D] -> AttentionAdapter (Gemm, Tanh, Gemm, Softmax, x features, L2 normalize) -> logits =
adapted @ (logit_scale * text_features).T [N, C] -> probs = softmax(logits). The class matrix
has the logit scale folded in, so a class change is a new initializer, nothing else.
`compose` joins it to the encoder with `onnx.compose.merge_models` (encoder's `features` output
-> head input), keeping the encoder's opset and IR version.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fedclip_edge.errors import ExportError
from fedclip_edge.exporters.names import IMAGE_OUTPUT, LOGITS_OUTPUT, PROBS_OUTPUT

HEAD_INPUT = "head/features"
HEAD_PREFIX = "head/"  # every node and initializer of the head; int8 leaves these in fp32
NORM_EPS = 1e-12  # torch.nn.functional.normalize's default eps


def _opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise ExportError("the encoder graph declares no default-domain opset")


def class_matrix(text_features: np.ndarray, logit_scale: float) -> np.ndarray:
    """[D, C] float32: logit_scale * L2-normalized class text features, transposed."""
    t = np.asarray(text_features, dtype=np.float32)
    if t.ndim != 2 or not len(t):
        raise ExportError(f"class text features must be [C, D] with C >= 1, got {list(t.shape)}")
    n = np.linalg.norm(t, axis=1, keepdims=True)
    if not np.all(np.isfinite(t)) or np.any(n == 0):
        raise ExportError("class text features contain zero or non-finite rows")
    return np.ascontiguousarray((np.float32(logit_scale) * (t / n)).T, dtype=np.float32)


def build_head(
    state: Mapping[str, np.ndarray],
    text_features: np.ndarray,
    logit_scale: float,
    *,
    opset: int,
    ir_version: int,
) -> onnx.ModelProto:
    """Adapter + classes as an ONNX model: `head/features` [N, D] -> logits, probs [N, C]."""
    try:
        w1 = np.asarray(state["fea_attn.0.weight"], dtype=np.float32)
        b1 = np.asarray(state["fea_attn.0.bias"], dtype=np.float32)
        w2 = np.asarray(state["fea_attn.2.weight"], dtype=np.float32)
        b2 = np.asarray(state["fea_attn.2.bias"], dtype=np.float32)
    except KeyError as exc:
        raise ExportError(f"adapter state lacks {exc.args[0]} (not an AttentionAdapter)") from None
    d = w1.shape[1]
    if w1.shape != (d, d) or w2.shape != (d, d) or b1.shape != (d,) or b2.shape != (d,):
        raise ExportError(f"adapter weights are not [D, D] + [D] (got {list(w1.shape)})")
    cls = class_matrix(text_features, logit_scale)
    if cls.shape[0] != d:
        raise ExportError(f"class text features have dim {cls.shape[0]}, the adapter {d}")
    c = cls.shape[1]
    p = HEAD_PREFIX
    inits = [
        numpy_helper.from_array(w1, p + "w1"),
        numpy_helper.from_array(b1, p + "b1"),
        numpy_helper.from_array(w2, p + "w2"),
        numpy_helper.from_array(b2, p + "b2"),
        numpy_helper.from_array(cls, p + "classes"),
        numpy_helper.from_array(np.array(NORM_EPS, dtype=np.float32), p + "eps"),
    ]
    nodes = [
        helper.make_node("Gemm", [HEAD_INPUT, p + "w1", p + "b1"], [p + "h"], transB=1,
                         name=p + "gemm1"),
        helper.make_node("Tanh", [p + "h"], [p + "t"], name=p + "tanh"),
        helper.make_node("Gemm", [p + "t", p + "w2", p + "b2"], [p + "a"], transB=1,
                         name=p + "gemm2"),
        helper.make_node("Softmax", [p + "a"], [p + "att"], axis=1, name=p + "attention"),
        helper.make_node("Mul", [p + "att", HEAD_INPUT], [p + "m"], name=p + "reweight"),
    ]
    if opset >= 18:  # ReduceL2's axes became an input in opset 18
        inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), p + "axes"))
        nodes.append(helper.make_node("ReduceL2", [p + "m", p + "axes"], [p + "norm"],
                                      keepdims=1, name=p + "norm"))
    else:
        nodes.append(helper.make_node("ReduceL2", [p + "m"], [p + "norm"], axes=[1],
                                      keepdims=1, name=p + "norm"))
    nodes += [
        helper.make_node("Max", [p + "norm", p + "eps"], [p + "norm_eps"], name=p + "clamp"),
        helper.make_node("Div", [p + "m", p + "norm_eps"], [p + "g"], name=p + "normalize"),
        helper.make_node("MatMul", [p + "g", p + "classes"], [LOGITS_OUTPUT], name=p + "logits"),
        helper.make_node("Softmax", [LOGITS_OUTPUT], [PROBS_OUTPUT], axis=1, name=p + "probs"),
    ]
    graph = helper.make_graph(
        nodes,
        "fedclip_adapter_head",
        [helper.make_tensor_value_info(HEAD_INPUT, TensorProto.FLOAT, ["batch", d])],
        [
            helper.make_tensor_value_info(LOGITS_OUTPUT, TensorProto.FLOAT, ["batch", c]),
            helper.make_tensor_value_info(PROBS_OUTPUT, TensorProto.FLOAT, ["batch", c]),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    onnx.checker.check_model(model, full_check=True)
    return model


def compose(encoder: onnx.ModelProto, head: onnx.ModelProto) -> onnx.ModelProto:
    """encoder (`image` -> `features`) + head -> one model (`image` -> logits, probs)."""
    outs = [o.name for o in encoder.graph.output]
    if IMAGE_OUTPUT not in outs:
        raise ExportError(f"the encoder graph's outputs are {outs}, expected {IMAGE_OUTPUT!r}")
    try:
        fused = onnx.compose.merge_models(
            encoder,
            head,
            io_map=[(IMAGE_OUTPUT, HEAD_INPUT)],
            outputs=[LOGITS_OUTPUT, PROBS_OUTPUT],
            name="fedclip_fused_classifier",
            producer_name="fedclip-edge",
        )
    except Exception as exc:  # onnx raises ValueError/checker errors with long texts
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else repr(exc)
        raise ExportError(f"composing encoder and adapter head failed: {first}") from exc
    fused.ir_version = encoder.ir_version
    # merge_models lists the default domain twice ("" from the head, unset from the exporter),
    # which onnxruntime.quantization refuses: keep one entry per domain.
    seen: dict[str, int] = {}
    for imp in fused.opset_import:
        domain = "" if imp.domain in ("", "ai.onnx") else imp.domain
        seen[domain] = max(seen.get(domain, 0), int(imp.version))
    del fused.opset_import[:]
    fused.opset_import.extend(helper.make_opsetid(d, v) for d, v in seen.items())
    return fused


def head_opset_ir(encoder: onnx.ModelProto) -> tuple[int, int]:
    """The (opset, IR version) the head must be written with to merge into `encoder`."""
    return _opset(encoder), int(encoder.ir_version)
