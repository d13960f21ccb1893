"""Update codecs: how an adapter update is shrunk before it travels, and error feedback.

Pure (numpy/torch, no I/O except ErrorFeedback's own file): the wire format (`wire/`) packs
what these functions return into frames and checks untrusted input before calling `decode_tensor`.

A codec turns one float tensor into a few small arrays:

- `fp32`, `fp16`: the adapter itself, dense (today's frames).
- `delta-fp16`: the difference to the round's global, dense fp16. Deltas are small, so fp16
  keeps more relative precision on them than on the weights.
- `int8`: the delta, symmetric int8 with one float32 scale per row (a row of a 2-D weight,
  the whole of a bias): 4x smaller than fp32.
- `topk`: the delta's k largest-magnitude entries (int32 flat indices + fp16 values).
- `topk-int8`: the same entries with int8 values and one float32 scale per tensor.

Everything but fp32/fp16 is a delta and loses information; the device keeps what it did not
send in an `ErrorFeedback` and adds it to the next round's delta, so over rounds nothing is
lost, only late. The receiver always rebuilds the full adapter (global + decoded delta), so
aggregation does not change.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from fedclip_edge.errors import CacheError

# Command-line names, in the order --help lists them.
CODECS: tuple[str, ...] = ("fp32", "fp16", "delta-fp16", "int8", "topk", "topk-int8")
DELTA_CODECS: frozenset[str] = frozenset({"delta-fp16", "int8", "topk", "topk-int8"})
SPARSE_CODECS: frozenset[str] = frozenset({"topk", "topk-int8"})
# 1% of the entries: measured within seed noise of fp32 with error feedback (docs/codecs.md).
DEFAULT_TOPK_FRACTION = 0.01
INT8_MAX = 127

# Array roles inside an encoded tensor, and the numpy dtype each codec stores them in.
# "v": values, "s": scales, "i": flat indices (sorted, unique).
CODEC_ARRAYS: dict[str, dict[str, np.dtype]] = {
    "fp32": {"v": np.dtype("<f4")},
    "fp16": {"v": np.dtype("<f2")},
    "delta-fp16": {"v": np.dtype("<f2")},
    "int8": {"v": np.dtype("i1"), "s": np.dtype("<f4")},
    "topk": {"i": np.dtype("<i4"), "v": np.dtype("<f2")},
    "topk-int8": {"i": np.dtype("<i4"), "v": np.dtype("i1"), "s": np.dtype("<f4")},
}


@dataclass(frozen=True)
class EncodedTensor:
    """One tensor as a codec stores it: its dense `shape`, `k` (sparse codecs) and arrays."""

    shape: tuple[int, ...]
    arrays: dict[str, np.ndarray]
    k: int | None = None


def check_codec(codec: str) -> None:
    """ValueError naming the choices for an unknown codec name."""
    if codec not in CODECS:
        raise ValueError(f"unknown update codec {codec!r}: use one of {', '.join(CODECS)}")


def check_topk_fraction(fraction: float) -> None:
    """ValueError unless 0 < fraction <= 1 (a fraction of each tensor's entries)."""
    if not isinstance(fraction, (int, float)) or not (0.0 < float(fraction) <= 1.0):
        raise ValueError(f"top-k fraction must be in (0, 1], got {fraction!r}")


def topk_count(numel: int, fraction: float) -> int:
    """Entries a top-k codec keeps of a tensor: at least one of a non-empty tensor."""
    check_topk_fraction(fraction)
    if numel == 0:
        return 0
    return min(numel, max(1, math.ceil(fraction * numel - 1e-9)))


def int8_rows(shape: tuple[int, ...]) -> int:
    """Rows that get their own int8 scale: the first dimension of a matrix, else one."""
    return int(shape[0]) if len(shape) >= 2 else 1


def encode_tensor(
    codec: str, tensor: torch.Tensor, *, topk_fraction: float = DEFAULT_TOPK_FRACTION
) -> EncodedTensor:
    """Encode one float tensor (the weights for fp32/fp16, a delta otherwise).

    Deterministic: the same tensor gives the same arrays (top-k breaks ties by lower index).
    """
    check_codec(codec)
    x = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()
    shape = tuple(int(d) for d in x.shape)
    flat = x.reshape(-1).numpy()
    if codec == "fp32":
        return EncodedTensor(shape, {"v": flat.astype("<f4").copy()})
    if codec in ("fp16", "delta-fp16"):
        return EncodedTensor(shape, {"v": to_fp16(flat)})
    if codec == "int8":
        rows = int8_rows(shape)
        q, scales = _quantize_rows(flat.reshape(rows, flat.size // rows if rows else 0))
        return EncodedTensor(shape, {"v": q.reshape(-1), "s": scales})
    k = topk_count(flat.size, topk_fraction)
    idx = _topk_indices(flat, k)
    values = flat[idx]
    if codec == "topk":
        return EncodedTensor(shape, {"i": idx.astype("<i4"), "v": to_fp16(values)}, k=k)
    q, scales = _quantize_rows(values.reshape(1, -1))
    return EncodedTensor(shape, {"i": idx.astype("<i4"), "v": q.reshape(-1), "s": scales}, k=k)


def decode_tensor(codec: str, enc: EncodedTensor) -> torch.Tensor:
    """The float32 tensor an encoded one stands for (dense, of `enc.shape`).

    Trusts its input: the wire decoder validates untrusted arrays before calling this.
    """
    check_codec(codec)
    numel = math.prod(enc.shape)
    with np.errstate(over="ignore"):  # an overflow becomes inf, which the wire decoder rejects
        dense = _dense(codec, enc, numel)
    return torch.from_numpy(np.ascontiguousarray(dense).reshape(enc.shape))


def _dense(codec: str, enc: EncodedTensor, numel: int) -> np.ndarray:
    if codec in ("fp32", "fp16", "delta-fp16"):
        dense = to_fp32(enc.arrays["v"])
    elif codec == "int8":
        rows = int8_rows(enc.shape)
        q = enc.arrays["v"].reshape(rows, numel // rows if rows else 0).astype(np.float32)
        dense = (q * enc.arrays["s"].astype(np.float32)[:, None]).reshape(-1)
    else:
        dense = np.zeros(numel, dtype=np.float32)
        values = to_fp32(enc.arrays["v"])
        if codec == "topk-int8":
            values = values * np.float32(enc.arrays["s"][0])
        dense[enc.arrays["i"].astype(np.int64)] = values
    return dense


def encoded_nbytes(enc: EncodedTensor) -> int:
    """Bytes of the arrays alone (what the payload carries, before framing)."""
    return sum(int(a.nbytes) for a in enc.arrays.values())


# Below torch's parallel grain (32768 elements) a conversion runs in the calling thread.
_CHUNK = 16384


def to_fp16(array: np.ndarray) -> np.ndarray:
    """float32 -> float16 (round to nearest even, as numpy), chunked through torch.

    numpy converts subnormal halves in software: a 512x512 delta (mostly below fp16's 6e-5
    normal range) took ~210 ms with `astype`, ~7 ms this way; chunks keep torch single-threaded,
    whose thread pool is slow on a busy machine.
    """
    src = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32).reshape(-1))
    out = torch.empty(src.shape, dtype=torch.float16)
    for i in range(0, src.numel(), _CHUNK):
        out[i : i + _CHUNK] = src[i : i + _CHUNK]
    return out.numpy().reshape(array.shape)


def to_fp32(array: np.ndarray) -> np.ndarray:
    """Any float array -> float32; float16 chunked through torch (see `to_fp16`)."""
    if array.dtype != np.float16:
        return array.astype(np.float32)
    src = torch.from_numpy(np.ascontiguousarray(array).reshape(-1))
    out = torch.empty(src.shape, dtype=torch.float32)
    for i in range(0, src.numel(), _CHUNK):
        out[i : i + _CHUNK] = src[i : i + _CHUNK]
    return out.numpy().reshape(array.shape)


def _quantize_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row: q = round(x / s), s = max|x| / 127 (1.0 for an all-zero row,
    so every scale is finite and > 0, which the decoder demands)."""
    peak = np.abs(rows).max(axis=1) if rows.shape[1] else np.zeros(rows.shape[0], np.float32)
    # peak / 127 of a subnormal peak underflows to 0: the smallest normal float is the floor
    tiny = np.finfo(np.float32).tiny
    scales = np.where(peak > 0, np.maximum(peak / INT8_MAX, tiny), 1.0).astype("<f4")
    q = np.clip(np.rint(rows / scales[:, None]), -INT8_MAX, INT8_MAX).astype("i1")
    return q, scales


def _topk_indices(flat: np.ndarray, k: int) -> np.ndarray:
    """Sorted flat indices of the k largest |x|; ties at the threshold go to the lower index.

    A partition finds the k-th magnitude in linear time: a full sort of a 512x512 delta took
    ~150 ms on a busy 2-core machine, the partition a few ms.
    """
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    if k >= flat.size:
        return np.arange(flat.size, dtype=np.int64)
    mag = np.abs(flat)
    threshold = np.partition(mag, flat.size - k)[flat.size - k]
    above = np.flatnonzero(mag > threshold)
    ties = np.flatnonzero(mag == threshold)[: k - above.size]
    return np.union1d(above, ties).astype(np.int64)


def _f32(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(device="cpu", dtype=torch.float32).numpy()


# --- error feedback ------------------------------------------------------------------------


class ErrorFeedback:
    """What a device computed but did not send yet: one float32 residual per tensor.

    Before encoding a delta the device adds the residual (`corrected = delta + residual`);
    after encoding it keeps `corrected - decoded` as the new residual. `save`/`load` keep it
    across an agent restart: losing it silently drops what earlier rounds held back.
    """

    def __init__(self, residual: Mapping[str, torch.Tensor] | None = None) -> None:
        self.residual: dict[str, torch.Tensor] = {
            name: t.detach().to(dtype=torch.float32, device="cpu").clone()
            for name, t in (residual or {}).items()
        }

    def corrected(self, delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """delta + residual, tensor by tensor (a tensor without a residual yet gets none)."""
        extra = sorted(set(self.residual) - set(delta))
        if extra:
            raise CacheError(
                f"error-feedback residual has tensors the update lacks: {extra} (a residual of "
                "another model: delete its file)"
            )
        out = {}
        for name, d in delta.items():
            d = d.detach().to(dtype=torch.float32, device="cpu")
            r = self.residual.get(name)
            if r is None:
                out[name] = torch.from_numpy(d.numpy().copy())
                continue
            if r.shape != d.shape:
                raise CacheError(
                    f"error-feedback residual of {name!r} has shape {list(r.shape)}, "
                    f"the update {list(d.shape)} (a residual of another model: delete its file)"
                )
            # numpy, not torch: torch's thread pool is ~100x slower on a busy 2-core machine
            out[name] = torch.from_numpy(d.numpy() + r.numpy())
        return out

    def update(
        self, corrected: Mapping[str, torch.Tensor], sent: Mapping[str, torch.Tensor]
    ) -> None:
        """Keep what was meant (`corrected`) minus what the receiver will decode (`sent`)."""
        self.residual = {
            name: torch.from_numpy(np.ascontiguousarray(_f32(corrected[name]) - _f32(sent[name])))
            for name in corrected
        }

    def norm(self) -> float:
        """L2 norm over all residuals (how much is held back), for logs and tests."""
        total = sum(float(r.double().pow(2).sum()) for r in self.residual.values())
        return math.sqrt(total)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the residuals as safetensors atomically (tmp + os.replace): a crash leaves
        the old file or the new one, never half of one."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tensors = {name: t.contiguous() for name, t in self.residual.items()}
        safetensors.torch.save_file(tensors, str(tmp), metadata={"kind": "error-feedback"})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ErrorFeedback:
        """Read a saved residual; a missing file is an empty residual (first round)."""
        path = Path(path)
        if not path.exists():
            return cls()
        try:
            tensors = safetensors.torch.load_file(str(path))
        except Exception as exc:  # any parser failure: the file is not ours or is corrupt
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise CacheError(f"error-feedback file {path} is unreadable: {first}") from None
        for name, t in tensors.items():
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise CacheError(f"error-feedback file {path}: tensor {name!r} is not finite float")
        return cls(tensors)
