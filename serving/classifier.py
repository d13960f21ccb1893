"""`open_classifier(path)`: image bytes -> class probabilities, from whatever a device holds.

Three kinds of model, one interface (`decode`, `predict`, `classify`):
- a fused export (`export --adapter`): one ONNX Runtime session (or TensorRT engine), image ->
  probabilities, golden-checked on open (exporters/fused_runtime.py);
- a model version folder: the encoder artifact it names, through `exporters.runtimes.
  open_extractor` (golden-checked too), then the PyTorch adapter head and the class matrix;
- a model store: its current version, as above.
`decode` and `predict` are separate so that a service can decode in its request handler and batch
`predict` across requests. `decode` treats its bytes as hostile: whatever they are, it returns a
preprocessed image or raises `ImageRejected` with a one-line reason, never anything else.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedclip_edge.errors import DataError, ExportError
from fedclip_edge.exporters.preprocess import PreprocessConfig, preprocess_image

# Largest image decode will touch (width x height): a 4096 x 4096 photo passes, a
# decompression bomb (a small file that claims a huge canvas) is refused before its pixels are
# decoded. PIL's own bomb check (2x its MAX_IMAGE_PIXELS) is a backstop, not relied on.
MAX_PIXELS = 4096 * 4096


class ImageRejected(DataError):
    """Bytes that are not an image this classifier can use; the message is the one-line reason
    (a service answers it with a 4xx, `classify` prints it as the file's row)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Prediction:
    """One image's answer, and which model version gave it."""

    label: str
    score: float
    topk: list[tuple[str, float]] = field(default_factory=list)
    model_version: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "score": self.score,
            "topk": [[c, s] for c, s in self.topk],
            "model_version": self.model_version,
        }


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def decode_image(data: bytes, cfg: PreprocessConfig, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Bytes -> [3, H, W] float32 preprocessed as `cfg` says, or ImageRejected."""
    try:
        from PIL import Image, UnidentifiedImageError

        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ImageRejected(f"expected image bytes, got {type(data).__name__}")
        if len(data) == 0:
            raise ImageRejected("empty body: no image bytes")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                img = Image.open(io.BytesIO(bytes(data)))
            except UnidentifiedImageError:
                raise ImageRejected("not an image (unrecognized format)") from None
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                raise ImageRejected(
                    f"image too large: its header claims more than {max_pixels} pixels "
                    "(a decompression bomb?)"
                ) from None
            w, h = img.size
            if w < 1 or h < 1:
                raise ImageRejected(f"image has no pixels ({w}x{h})")
            if w * h > max_pixels:
                raise ImageRejected(
                    f"image too large: {w}x{h} = {w * h} pixels (limit {max_pixels}); "
                    "a decompression bomb or an oversized photo: resize it first"
                )
            img.load()  # decode now: truncated or corrupt data fails here, not later
            return preprocess_image(img, cfg)
    except ImageRejected:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        raise ImageRejected(f"cannot decode image: {_reason(exc)}") from None


class Classifier:
    """Shared behaviour; subclasses set `version`, `classes`, `preprocess` and `_probs`."""

    version: str
    classes: list[str]
    preprocess: PreprocessConfig
    backend: str = ""
    max_pixels: int = MAX_PIXELS

    def __init__(self, max_batch: int = 32) -> None:
        if max_batch < 1:
            raise ExportError("max_batch must be at least 1")
        self.max_batch = int(max_batch)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        h, w = self.preprocess.size
        return (3, h, w)

    def decode(self, data: bytes) -> np.ndarray:
        """bytes -> preprocessed [3, H, W] float32; ImageRejected(reason) for anything else."""
        return decode_image(data, self.preprocess, self.max_pixels)

    def _probs(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """[N, 3, H, W] -> probabilities [N, C] (chunks of at most max_batch)."""
        x = np.asarray(batch, dtype=np.float32)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ExportError(f"expected [N, {', '.join(map(str, self.input_shape))}] images, "
                              f"got {list(x.shape)}")
        if not len(x):
            return np.zeros((0, len(self.classes)), np.float32)
        parts = [self._probs(x[i : i + self.max_batch]) for i in range(0, len(x), self.max_batch)]
        return np.concatenate(parts).astype(np.float32, copy=False)

    def top(self, probs: np.ndarray, top_k: int = 3) -> list[Prediction]:
        """Probabilities -> one Prediction per row."""
        k = max(1, min(int(top_k), len(self.classes)))
        out = []
        for row in np.asarray(probs):
            order = np.argsort(-row, kind="stable")[:k]
            topk = [(self.classes[i], float(row[i])) for i in order]
            out.append(Prediction(topk[0][0], topk[0][1], topk, self.version))
        return out

    def classify(self, images: list[bytes], top_k: int = 3) -> list[Prediction | ImageRejected]:
        """Each image's Prediction, or the ImageRejected that says why it has none."""
        decoded: list[np.ndarray | ImageRejected] = []
        for data in images:
            try:
                decoded.append(self.decode(data))
            except ImageRejected as exc:
                decoded.append(exc)
        good = [d for d in decoded if isinstance(d, np.ndarray)]
        preds = iter(self.top(self.predict(np.stack(good)), top_k) if good else [])
        return [next(preds) if isinstance(d, np.ndarray) else d for d in decoded]

    def close(self) -> None:
        """Release the backend."""


class FusedClassifier(Classifier):
    """A fused export: one session from image to probabilities."""

    def __init__(self, root: Path, backend: str = "auto", max_batch: int = 32,
                 threads: int | None = None) -> None:
        super().__init__(max_batch)
        from fedclip_edge.exporters.fused_runtime import open_fused

        self.model = open_fused(root, backend, threads=threads)
        self.root = Path(root)
        self.manifest = self.model.manifest
        self.version = self.model.version
        self.classes = list(self.model.classes)
        self.preprocess = self.model.preprocess
        self.backend = self.model.name

    def _probs(self, batch: np.ndarray) -> np.ndarray:
        return self.model.run(batch)[1]

    def close(self) -> None:
        self.model.close()


class VersionClassifier(Classifier):
    """A model version: its encoder artifact's extractor, then the adapter head in PyTorch."""

    def __init__(self, version: Any, backend: str = "auto", max_batch: int = 32,
                 threads: int | None = None) -> None:
        super().__init__(max_batch)
        import torch

        from fedclip_edge.adapter import AttentionAdapter
        from fedclip_edge.exporters.fused import FusedSource
        from fedclip_edge.exporters.fused_graph import class_matrix
        from fedclip_edge.exporters.runtimes import open_extractor

        self.source = FusedSource.from_version(version)
        root, art = self.source.artifact()  # verified; refused if it changed since training
        self.extractor = open_extractor(root, backend=backend, threads=threads)
        self.version = version.name
        self.classes = list(version.classes)
        self.manifest = dict(version.manifest)
        self.preprocess = self.extractor.preprocess
        self.backend = f"{self.extractor.name} + torch adapter"
        self._torch = torch
        self._adapter = AttentionAdapter(int(art["model"]["embed_dim"])).eval()
        self._adapter.load_state_dict(
            {k: torch.from_numpy(np.asarray(v)) for k, v in self.source.state.items()}
        )
        self._classes = torch.from_numpy(
            class_matrix(self.source.text_features, self.source.logit_scale)
        )

    def _probs(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        feats = torch.from_numpy(self.extractor.extract(batch))
        with torch.no_grad():
            logits = self._adapter(feats) @ self._classes
            return torch.softmax(logits, dim=1).numpy()

    def close(self) -> None:
        self.extractor.close()


def open_classifier(
    path: Path | str, *, backend: str = "auto", max_batch: int = 32, threads: int | None = None
) -> Classifier:
    """A store (its current version), a version folder, or a fused export -> a Classifier."""
    from fedclip_edge.serving.store import resolve_model

    resolved = resolve_model(Path(path))
    if isinstance(resolved, Path):
        return FusedClassifier(resolved, backend, max_batch, threads)
    return VersionClassifier(resolved, backend, max_batch, threads)
