"""fp32 ONNX graph -> fp16 body with fp32 islands, written with the plain onnx API.

Why not the usual tools (measured here, shared/MEASURED.md): onnxconverter-common's converter
produced a ViT-B-32 model ONNX Runtime refused to load (a Cast typed float16 where float was
expected) and its op block list crashed; a model exported from a `.half()` torch module killed
ONNX Runtime's CPU provider with a segmentation fault.

What this does instead, from the types that ONNX shape inference gives every tensor:
- every float32 tensor of the body becomes float16: initializers are stored in fp16, `Cast(to=
  float)` becomes `Cast(to=float16)`, float `Constant`/`ConstantOfShape` values become fp16
  (finite values clipped to +-65504);
- LayerNormalization, Softmax and the other ops in `FP32_OPS` stay fp32: Casts to fp32 before
  them, back to fp16 after, and their own weights stay fp32 (a normalization in fp16 is where
  overflow and lost precision start);
- the graph inputs and outputs stay float32 (a Cast right after the input and right before the
  output), so callers and the manifest see the same I/O as the fp32 artifact.
The result is checked with strict type inference here and with onnx.checker by the caller.
ONNX Runtime's CPU provider runs it (it inserts its own Casts where it has no fp16 kernel), which
makes the parity check real on a CPU machine; the speed is for GPU providers.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fedclip_edge.errors import ExportError

FLOAT = TensorProto.FLOAT
FLOAT16 = TensorProto.FLOAT16
FP16_MAX = 65504.0

# Ops whose inputs and outputs stay fp32: normalizations, softmax, and the reductions that make
# up a decomposed normalization.
FP32_OPS = frozenset(
    {
        "LayerNormalization",
        "Softmax",
        "LogSoftmax",
        "BatchNormalization",
        "InstanceNormalization",
        "GroupNormalization",
        "LpNormalization",
        "ReduceMean",
        "ReduceSumSquare",
        "ReduceL2",
    }
)
# Ops that create float tensors out of an attribute: their attributes are rewritten.
_UNSUPPORTED_DTYPE_OPS = frozenset(
    {
        "EyeLike",
        "RandomNormal",
        "RandomUniform",
        "RandomNormalLike",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
        "CastLike",
        "Resize",
        "Upsample",
    }
)


def _to_fp16_array(arr: np.ndarray) -> np.ndarray:
    finite = np.isfinite(arr)
    clipped = np.where(finite, np.clip(arr, -FP16_MAX, FP16_MAX), arr)
    return clipped.astype(np.float16)


def _fp16_tensor(t: onnx.TensorProto, name: str | None = None) -> onnx.TensorProto:
    arr = numpy_helper.to_array(t)
    return numpy_helper.from_array(_to_fp16_array(arr), name if name is not None else t.name)


def _float_types(model: onnx.ModelProto) -> dict[str, int]:
    """elem_type of every named tensor in the graph, from strict shape inference."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as exc:
        raise ExportError(
            f"fp16 conversion: shape inference failed on the fp32 graph: {exc}"
        ) from exc
    g = inferred.graph
    types: dict[str, int] = {}
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in g.initializer:
        types[init.name] = init.data_type
    return types


def _fold_initializer_identities(graph: onnx.GraphProto) -> None:
    """Drop `Identity(initializer)` nodes (the exporter's de-duplication) by renaming uses."""
    inits = {i.name for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    keep = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in outputs:
            rename[node.output[0]] = node.input[0]
        else:
            keep.append(node)
    if not rename:
        return
    for node in keep:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    del graph.node[:]
    graph.node.extend(keep)


def convert_to_fp16(model: onnx.ModelProto, fp32_ops: frozenset[str] = FP32_OPS) -> onnx.ModelProto:
    """Return an fp16-body copy of `model` (fp32 I/O, fp32 islands for `fp32_ops`)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    for node in g.node:
        if any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for a in node.attribute
        ):
            raise ExportError(f"fp16 conversion does not handle subgraphs ({node.op_type} node)")
        if node.op_type in _UNSUPPORTED_DTYPE_OPS:
            raise ExportError(f"fp16 conversion does not handle {node.op_type} nodes")
        if node.domain not in ("", "ai.onnx"):
            raise ExportError(f"fp16 conversion does not handle custom-domain op {node.op_type}")
    _fold_initializer_identities(g)
    types = _float_types(model)
    is_float = {name for name, t in types.items() if t == FLOAT}

    graph_inputs = {i.name for i in g.input if i.type.tensor_type.elem_type == FLOAT}
    graph_outputs = {o.name for o in g.output if o.type.tensor_type.elem_type == FLOAT}
    init_by_name = {i.name: i for i in g.initializer}

    # Which initializers feed fp32 islands only (stay fp32), body only (fp16), or both (copy).
    pinned_use: dict[str, bool] = {}
    body_use: dict[str, bool] = {}
    for node in g.node:
        pinned = node.op_type in fp32_ops
        for name in node.input:
            if name in init_by_name:
                (pinned_use if pinned else body_use)[name] = True
    fp16_name: dict[str, str] = {}  # fp32 initializer kept -> name of its fp16 copy
    new_inits: list[onnx.TensorProto] = []
    for init in g.initializer:
        if init.data_type != FLOAT:
            new_inits.append(init)
        elif pinned_use.get(init.name) and body_use.get(init.name):
            new_inits.append(init)
            copy = _fp16_tensor(init, init.name + "__fp16")
            new_inits.append(copy)
            fp16_name[init.name] = copy.name
        elif pinned_use.get(init.name):
            new_inits.append(init)
        else:
            new_inits.append(_fp16_tensor(init))
    fp32_inits = {i.name for i in new_inits if i.data_type == FLOAT}

    new_nodes: list[onnx.NodeProto] = []
    to_fp32_cache: dict[str, str] = {}

    def cast(src: str, dst: str, to: int) -> onnx.NodeProto:
        return helper.make_node("Cast", [src], [dst], to=to, name=f"fp16conv/{dst}")

    # Graph inputs: one Cast to fp16 for the body; fp32 islands read the input itself.
    input_fp16: dict[str, str] = {}
    for name in graph_inputs:
        input_fp16[name] = name + "__fp16"
        new_nodes.append(cast(name, input_fp16[name], FLOAT16))

    for node in g.node:
        if node.op_type in fp32_ops:
            for i, name in enumerate(node.input):
                if not name or name not in is_float or name in fp32_inits or name in graph_inputs:
                    continue  # already fp32 (or not a float tensor at all)
                if name not in to_fp32_cache:
                    to_fp32_cache[name] = name + "__fp32"
                    new_nodes.append(cast(name, to_fp32_cache[name], FLOAT))
                node.input[i] = to_fp32_cache[name]
            post = []
            for i, name in enumerate(node.output):
                if not name or name not in is_float or name in graph_outputs:
                    continue
                node.output[i] = name + "__fp32out"
                post.append(cast(node.output[i], name, FLOAT16))
            new_nodes.append(node)
            new_nodes.extend(post)
            continue

        for i, name in enumerate(node.input):
            if name in input_fp16:
                node.input[i] = input_fp16[name]
            elif name in fp16_name:
                node.input[i] = fp16_name[name]
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == FLOAT:
                attr.i = FLOAT16
            elif node.op_type in ("Constant", "ConstantOfShape") and attr.name == "value":
                if attr.t.data_type == FLOAT:
                    attr.t.CopyFrom(_fp16_tensor(attr.t, attr.t.name))
        if node.op_type == "Constant":
            for attr in list(node.attribute):
                if attr.name in ("value_float", "value_floats"):
                    arr = np.array(
                        attr.f if attr.name == "value_float" else list(attr.floats),
                        dtype=np.float32,
                    )
                    node.attribute.remove(attr)
                    node.attribute.append(
                        helper.make_attribute("value", numpy_helper.from_array(_to_fp16_array(arr)))
                    )
        post = []
        for i, name in enumerate(node.output):
            if name in graph_outputs:
                node.output[i] = name + "__fp16"
                post.append(cast(node.output[i], name, FLOAT))
        new_nodes.append(node)
        new_nodes.extend(post)

    del g.node[:]
    g.node.extend(new_nodes)
    del g.initializer[:]
    g.initializer.extend(new_inits)
    del g.value_info[:]  # stale fp32 types; re-inferred below
    try:
        checked = onnx.shape_inference.infer_shapes(model, strict_mode=True, check_type=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300]
        raise ExportError(f"fp16 conversion produced an inconsistent graph: {first}") from exc
    del checked
    return model


def fp16_summary(model: onnx.ModelProto) -> dict[str, int]:
    """How much of the graph ended up in each precision (recorded in the manifest)."""
    inits = model.graph.initializer
    return {
        "fp16_initializers": sum(1 for i in inits if i.data_type == FLOAT16),
        "fp32_initializers": sum(1 for i in inits if i.data_type == FLOAT),
        "casts": sum(1 for n in model.graph.node if n.op_type == "Cast"),
        "fp32_islands": sum(1 for n in model.graph.node if n.op_type in FP32_OPS),
    }
