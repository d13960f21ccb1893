"""fedclip_edge.exporters: open_clip -> ONNX (fp32/fp16/int8) -> TensorRT, with a manifest,
and the runtimes that open such an artifact on a device.

Public API (imported lazily, so `ort_utils`'s child process stays light):
- `export_artifact(out, model=..., pretrained=..., precision=..., ...)` -> ExportResult
- `open_extractor(artifacts_dir, backend="auto", device="auto")` -> an Extractor
- `Extractor` (protocol: `name`, `extract(batch) -> features`)
- `PreprocessConfig`, `preprocess_image`, `preprocess_images`
- `read_manifest`, `verify_artifact`
- `export_fused(FusedSource.from_version(v), out, ...)`, `open_fused(dir)`: the fused classifier
  (encoder + adapter + classes in one graph; docs/serving.md)
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "export_artifact": "fedclip_edge.exporters.export",
    "ExportResult": "fedclip_edge.exporters.export",
    "open_extractor": "fedclip_edge.exporters.runtimes",
    "Extractor": "fedclip_edge.exporters.runtimes",
    "PreprocessConfig": "fedclip_edge.exporters.preprocess",
    "preprocess_image": "fedclip_edge.exporters.preprocess",
    "preprocess_images": "fedclip_edge.exporters.preprocess",
    "read_manifest": "fedclip_edge.exporters.manifest",
    "verify_artifact": "fedclip_edge.exporters.manifest",
    "export_fused": "fedclip_edge.exporters.fused",
    "FusedSource": "fedclip_edge.exporters.fused",
    "open_fused": "fedclip_edge.exporters.fused_runtime",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fedclip_edge.exporters' has no attribute {name!r}")
