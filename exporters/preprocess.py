"""open_clip's eval image transform in numpy + PIL, driven by the manifest.

A device runs this instead of torchvision: it needs no torch, and the manifest (not the code on
the device) decides size, resize mode, interpolation, mean and std. The steps follow open_clip's
`image_transform(is_train=False)` exactly, in the same order, so the numbers match to float32
rounding:

- `shortest` (default): resize the short side to the target (torchvision `Resize(int)`, which
  truncates the long side), then center crop; for a non-square target, resize keeping the ratio
  (rounded) so the image covers the target, then center crop.
- `longest`: resize keeping the ratio so the image fits inside (rounded), center pad with
  `fill_color`, crop.
- `squash`: resize to exactly H x W.
Resizing happens in the image's own mode (as torchvision does on a PIL image); the conversion to
RGB comes after, then `/255`, then `(x - mean) / std` in float32.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from fedclip_edge.errors import ExportError

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class PreprocessConfig:
    """What the manifest records about preprocessing (open_clip's PreprocessCfg fields)."""

    size: tuple[int, int] = (224, 224)  # (H, W)
    mode: str = "RGB"
    mean: tuple[float, ...] = field(default=_OPENAI_MEAN)
    std: tuple[float, ...] = field(default=_OPENAI_STD)
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PreprocessConfig:
        """Build from a manifest/open_clip dict, rejecting what this implementation cannot do."""
        size = d.get("size", 224)
        if isinstance(size, int):
            size = (size, size)
        if len(size) != 2:
            raise ExportError(f"preprocess size must be [H, W], got {size!r}")
        interpolation = d.get("interpolation") or "bicubic"
        if interpolation == "random":  # open_clip treats 'random' as bicubic at eval time
            interpolation = "bicubic"
        if interpolation not in _RESAMPLE:
            raise ExportError(f"unsupported interpolation {interpolation!r} (bicubic, bilinear)")
        resize_mode = d.get("resize_mode") or "shortest"
        if resize_mode not in ("shortest", "longest", "squash"):
            raise ExportError(f"unsupported resize_mode {resize_mode!r}")
        mode = d.get("mode", "RGB")
        if mode != "RGB":
            raise ExportError(f"unsupported image mode {mode!r} (only RGB)")
        mean = d.get("mean") or _OPENAI_MEAN
        std = d.get("std") or _OPENAI_STD
        if isinstance(mean, (int, float)):
            mean = (mean,) * 3
        if isinstance(std, (int, float)):
            std = (std,) * 3
        return cls(
            size=(int(size[0]), int(size[1])),
            mode=mode,
            mean=tuple(float(m) for m in mean),
            std=tuple(float(s) for s in std),
            interpolation=interpolation,
            resize_mode=resize_mode,
            fill_color=int(d.get("fill_color", 0) or 0),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the manifest (lists, not tuples)."""
        d = asdict(self)
        d["size"] = list(self.size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d


def _resize_shortest_square(w: int, h: int, target: int) -> tuple[int, int]:
    """torchvision `Resize(int)`: short side to `target`, long side truncated (int())."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = target, int(target * long / short)
    return (new_short, new_long) if w <= h else (new_long, new_short)


def _resize_keep_ratio(
    w: int, h: int, target_hw: tuple[int, int], longest: float
) -> tuple[int, int]:
    """open_clip/timm `ResizeKeepRatio.get_params` (no random scale): sizes rounded."""
    th, tw = target_hw
    ratio_h, ratio_w = h / th, w / tw
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    return round(w / ratio), round(h / ratio)


def _resize(img: Image.Image, size_wh: tuple[int, int], resample: int) -> Image.Image:
    if img.size == size_wh:  # torchvision returns the image untouched in this case
        return img
    return img.resize(size_wh, resample)


def _center_crop_or_pad(arr: np.ndarray, out_hw: tuple[int, int], fill: int) -> np.ndarray:
    """open_clip `center_crop_or_pad` on an [H, W, C] uint8 array."""
    h, w = arr.shape[:2]
    ch, cw = out_hw
    if cw > w or ch > h:
        left = (cw - w) // 2 if cw > w else 0
        top = (ch - h) // 2 if ch > h else 0
        right = (cw - w + 1) // 2 if cw > w else 0
        bottom = (ch - h + 1) // 2 if ch > h else 0
        arr = np.pad(
            arr, ((top, bottom), (left, right), (0, 0)), mode="constant", constant_values=fill
        )
        h, w = arr.shape[:2]
        if (h, w) == (ch, cw):
            return arr
    top = int(round((h - ch) / 2.0))
    left = int(round((w - cw) / 2.0))
    return arr[top : top + ch, left : left + cw]


def preprocess_image(image: Image.Image, cfg: PreprocessConfig | Mapping[str, Any]) -> np.ndarray:
    """One PIL image -> [3, H, W] float32, matching open_clip's eval transform."""
    if not isinstance(cfg, PreprocessConfig):
        cfg = PreprocessConfig.from_dict(cfg)
    if not isinstance(image, Image.Image):
        raise ExportError(f"preprocess_image expects a PIL image, got {type(image).__name__}")
    th, tw = cfg.size
    resample = _RESAMPLE[cfg.interpolation]
    w, h = image.size
    if cfg.resize_mode == "squash":
        img = _resize(image, (tw, th), resample)
    elif cfg.resize_mode == "longest":
        img = _resize(image, _resize_keep_ratio(w, h, (th, tw), longest=1.0), resample)
    elif th == tw:  # shortest, square target: torchvision Resize(int) (note: its own rounding)
        img = _resize(image, _resize_shortest_square(w, h, th), resample)
    else:  # shortest, non-square target: open_clip uses ResizeKeepRatio (default bicubic)
        img = _resize(image, _resize_keep_ratio(w, h, (th, tw), longest=0.0), _RESAMPLE["bicubic"])
    # open_clip converts the mode after resizing (MaybeConvertMode comes after Resize).
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    arr = _center_crop_or_pad(arr, (th, tw), cfg.fill_color if cfg.resize_mode == "longest" else 0)
    x = arr.astype(np.float32).transpose(2, 0, 1) / np.float32(255.0)
    mean = np.asarray(cfg.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(cfg.std, dtype=np.float32).reshape(3, 1, 1)
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


def preprocess_images(
    images: Iterable[Image.Image], cfg: PreprocessConfig | Mapping[str, Any]
) -> np.ndarray:
    """Several PIL images -> one [N, 3, H, W] float32 batch."""
    if not isinstance(cfg, PreprocessConfig):
        cfg = PreprocessConfig.from_dict(cfg)
    arrays = [preprocess_image(im, cfg) for im in images]
    if not arrays:
        return np.zeros((0, 3, *cfg.size), dtype=np.float32)
    return np.stack(arrays)
