"""open_clip towers -> ONNX with the TorchScript exporter (dynamo=False).

Measured here (shared/MEASURED.md): the TorchScript exporter with `dynamic_axes` gives a graph
ONNX Runtime runs at cosine 1.000000 to torch, with the weights inside one file. Two things make
it work on current torch: export with an example batch of 2 (a batch of 1 lets the tracer bake
the batch size into Reshape constants), and switch off nn.MultiheadAttention's fused "fast
path" while tracing (`aten::_native_multi_head_attention` has no ONNX symbolic).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import torch

from fedclip_edge.errors import ExportError
from fedclip_edge.exporters.names import (
    BATCH_AXIS,
    IMAGE_INPUT,
    IMAGE_OUTPUT,
    TEXT_INPUT,
    TEXT_OUTPUT,
)

MIN_OPSET = 17
_TWO_GB = 2**31 - 1


class ImageTower(torch.nn.Module):
    """The image side of a CLIP model: preprocessed images -> raw `encode_image` features."""

    def __init__(self, clip: torch.nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(image)


class TextTower(torch.nn.Module):
    """The text side: token ids -> raw `encode_text` features (no normalization)."""

    def __init__(self, clip: torch.nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(tokens)


@contextlib.contextmanager
def _export_mode() -> Iterator[None]:
    """MHA fast path off (no ONNX symbolic for it) and the exporter's chatter silenced."""
    mha = getattr(torch.backends, "mha", None)
    previous = mha.get_fastpath_enabled() if mha is not None else None
    if mha is not None:
        mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if mha is not None and previous is not None:
            mha.set_fastpath_enabled(previous)


def _export(
    module: torch.nn.Module,
    example: torch.Tensor,
    path: Path,
    input_name: str,
    output_name: str,
    opset: int,
) -> None:
    if opset < MIN_OPSET:
        raise ExportError(
            f"opset {opset} is too old: use {MIN_OPSET} or newer (LayerNormalization)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    module.eval()
    try:
        with _export_mode(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(
                module,
                (example,),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=[input_name],
                output_names=[output_name],
                dynamic_axes={input_name: {0: BATCH_AXIS}, output_name: {0: BATCH_AXIS}},
                do_constant_folding=True,
            )
    except Exception as exc:  # the exporter raises many types; say which step failed
        first = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else repr(exc)
        raise ExportError(f"torch.onnx.export failed for {path.name}: {first}") from exc
    check_onnx(path)


def check_onnx(path: Path) -> None:
    """`onnx.checker` with full shape/type inference; a failure becomes one ExportError line."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else repr(exc)
        raise ExportError(f"onnx.checker rejected {path.name}: {first}") from exc


def export_image_encoder(
    clip: torch.nn.Module,
    path: Path,
    image_size: tuple[int, int],
    opset: int = MIN_OPSET,
    example_batch: int = 2,
) -> None:
    """Write the image tower to `path` with a dynamic batch axis (example batch >= 2)."""
    example = torch.randn(
        max(2, example_batch), 3, *image_size, generator=torch.Generator().manual_seed(0)
    )
    _export(ImageTower(clip), example, path, IMAGE_INPUT, IMAGE_OUTPUT, opset)


def export_text_encoder(
    clip: torch.nn.Module, tokens: torch.Tensor, path: Path, opset: int = MIN_OPSET
) -> None:
    """Write the text tower to `path`; `tokens` is an example [N>=2, context_length] batch."""
    if tokens.shape[0] < 2:
        tokens = tokens.repeat(2, 1)
    _export(TextTower(clip), tokens.long(), path, TEXT_INPUT, TEXT_OUTPUT, opset)


def model_io(path: Path) -> dict[str, list[dict]]:
    """Names, element types and shapes of the graph inputs/outputs, as the manifest records them."""
    model = onnx.load(str(path), load_external_data=False)

    def describe(values) -> list[dict]:
        out = []
        for v in values:
            tt = v.type.tensor_type
            dims = [d.dim_param if d.dim_param else int(d.dim_value) for d in tt.shape.dim]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name
            out.append({"name": v.name, "dtype": dtype, "shape": dims})
        return out

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


def opset_of(path: Path) -> int:
    """The default-domain opset the graph was written for."""
    model = onnx.load(str(path), load_external_data=False)
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise ExportError(f"{path.name} declares no default-domain opset")


def save_onnx(model: onnx.ModelProto, path: Path) -> None:
    """Save with the weights inside the file when they fit in protobuf's 2 GB, else beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    size = sum(
        int(np.prod(t.dims)) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        for t in model.graph.initializer
    )
    if size < _TWO_GB - 64 * 2**20:
        onnx.save_model(model, str(path))
    else:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
        )
