"""Codec frames (version 2): an update in any of `fedclip_edge.codecs`' encodings.

The payload is safetensors with arrays named "<i>.<role>": i is the tensor's position in the
header's (sorted) list, role is v (values), s (scales) or i (flat indices), as
`codecs.CODEC_ARRAYS` lists per codec. Numbers come from the network, so everything that sizes
an allocation (shapes, k) is checked against limits and against the receiver's own model
before any payload array is read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import safetensors.numpy
import torch

from fedclip_edge import codecs
from fedclip_edge.codecs import DEFAULT_TOPK_FRACTION, ErrorFeedback
from fedclip_edge.wire.container import (
    _PREFIX,
    _TENSOR_KEYS,
    FORMAT_VERSION,
    Frame,
    FrameRejected,
    _assemble,
    _check_expected,
    _check_meta_args,
    _check_payload_len,
    _is_int,
    _name_diff,
    _typed_header,
)
from fedclip_edge.wire.payload import _CODEC_TAGS, _safetensors_views

_CODEC_HEADER_KEYS = frozenset({"job", "round", "client", "codec", "tensors", "payload_len"})
# A decoded tensor may be larger than its payload (sparse codecs): bound it by itself.
MAX_DECODED_ELEMENTS = 64 * 1024 * 1024
_SAFETENSORS_NUMPY_TAGS = {"<f4": "F32", "<f2": "F16", "|i1": "I8", "<i4": "I32"}
# The dtype a Frame reports for each codec: what its values travelled as.
CODEC_VALUE_DTYPES = {
    "fp32": "float32",
    "fp16": "float16",
    "delta-fp16": "float16",
    "int8": "int8",
    "topk": "float16",
    "topk-int8": "int8",
}


def encode_update(
    state: Mapping[str, torch.Tensor],
    global_state: Mapping[str, torch.Tensor] | None,
    *,
    codec: str,
    job: str,
    round: int,
    client: str,
    feedback: ErrorFeedback | None = None,
    topk_fraction: float = DEFAULT_TOPK_FRACTION,
) -> bytes:
    """A version-2 frame of the update `state` (the device's full adapter after local training).

    Delta codecs encode `state - global_state` (the global of `round`, which the receiver holds)
    plus `feedback`'s residual, and leave in `feedback` what the frame does not carry: save it
    (`feedback.save`) before the frame leaves the device. fp32/fp16 send `state` itself and
    neither need `global_state` nor touch `feedback`. Same inputs, same bytes.
    """
    codecs.check_codec(codec)
    codecs.check_topk_fraction(topk_fraction)
    _check_meta_args(job=job, round=round, client=client)
    if not state:
        raise ValueError("an update frame needs at least one tensor")
    names = sorted(state)
    for name in names:
        tensor = state[name]
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"invalid tensor name {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        if not tensor.is_floating_point():
            raise TypeError(f"tensor {name!r} has non-floating dtype {tensor.dtype}")
        if not np.isfinite(_np32(tensor)).all():  # numpy: see decode_frame's finiteness check
            raise FrameRejected("nonfinite", f"tensor {name!r} has NaN or Inf values")

    delta = codec in codecs.DELTA_CODECS
    if delta:
        if global_state is None:
            raise ValueError(f"codec {codec!r} encodes a delta: pass the round's global_state")
        diff = _names_shapes_diff(state, global_state)
        if diff:
            raise ValueError(f"update and global differ: {diff}")
        source = {n: torch.from_numpy(_np32(state[n]) - _np32(global_state[n])) for n in names}
        if feedback is not None:
            source = feedback.corrected(source)
    else:
        source = {n: state[n] for n in names}

    encoded = {
        n: codecs.encode_tensor(codec, source[n], topk_fraction=topk_fraction) for n in names
    }
    arrays: dict[str, np.ndarray] = {}
    entries: list[dict[str, Any]] = []
    for i, name in enumerate(names):
        enc = encoded[name]
        entry: dict[str, Any] = {"name": name, "shape": list(enc.shape)}
        if codec in codecs.SPARSE_CODECS:
            entry["k"] = enc.k
        entries.append(entry)
        for role, array in enc.arrays.items():
            arrays[f"{i}.{role}"] = array
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise FrameRejected(
                    "nonfinite", f"tensor {name!r} overflows {codec} (NaN or Inf once encoded)"
                )
    if delta and feedback is not None:
        sent = {n: codecs.decode_tensor(codec, encoded[n]) for n in names}
        feedback.update(source, sent)

    payload = safetensors.numpy.save(arrays)
    header = {
        "job": job,
        "round": round,
        "client": client,
        "codec": codec,
        "tensors": entries,
        "payload_len": len(payload),
    }
    return _assemble(FORMAT_VERSION, header, payload)



def _names_shapes_diff(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> str:
    if set(got) != set(want):
        return _name_diff(expected=want, got=got, got_label="unexpected")
    for name in sorted(want):
        if tuple(got[name].shape) != tuple(want[name].shape):
            return (
                f"tensor {name!r} has shape {list(got[name].shape)}, not {list(want[name].shape)}"
            )
    return ""


def _parse_codec_header(raw: bytes) -> dict[str, Any]:
    """Type- and bound-check a version-2 header: known codec, bounded shapes, k in its tensor."""
    header = _typed_header(raw, _CODEC_HEADER_KEYS, "codec")
    codec = header["codec"]
    if codec not in codecs.CODECS:
        raise FrameRejected(
            "codec", f"unknown update codec {codec[:40]!r} (this build reads {list(codecs.CODECS)})"
        )
    sparse = codec in codecs.SPARSE_CODECS
    entry_keys = _TENSOR_KEYS | {"k"} if sparse else _TENSOR_KEYS
    if not isinstance(header["tensors"], list) or not header["tensors"]:
        raise FrameRejected("header", "header 'tensors' must be a non-empty list")
    names: list[str] = []
    total = 0
    for i, entry in enumerate(header["tensors"]):
        if not isinstance(entry, dict) or entry.keys() != entry_keys:
            want = "{name, shape, k}" if sparse else "{name, shape}"
            raise FrameRejected("header", f"header tensor entry {i} must be {want} for {codec}")
        name, shape = entry["name"], entry["shape"]
        if not isinstance(name, str) or not name:
            raise FrameRejected("header", f"header tensor entry {i} has no valid name")
        if name in names:
            raise FrameRejected("header", f"header lists tensor {name!r} twice")
        if names and name < names[-1]:
            raise FrameRejected("header", f"header tensors are not sorted by name at {name!r}")
        names.append(name)
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise FrameRejected(
                "header", f"tensor {name!r} shape must be a list of non-negative integers"
            )
        if len(shape) > 8 or any(d > MAX_DECODED_ELEMENTS for d in shape):
            raise FrameRejected("oversize", f"tensor {name!r} declares shape {shape[:9]}")
        numel = math.prod(shape)
        total += numel
        if total > MAX_DECODED_ELEMENTS:
            raise FrameRejected(
                "oversize",
                f"header declares over {MAX_DECODED_ELEMENTS} elements in all (at {name!r})",
            )
        if sparse:
            k = entry["k"]
            if not _is_int(k) or k < 0 or k > numel:
                raise FrameRejected(
                    "k", f"tensor {name!r} declares k={str(k)[:40]}, outside 0..{numel}"
                )

    if not header["job"]:
        raise FrameRejected("meta", "frame has an empty job id")
    if not header["client"]:
        raise FrameRejected("meta", "frame has an empty client id")
    if header["round"] < 0:
        raise FrameRejected("meta", f"frame has negative round {header['round']}")
    return header


def _decode_codec_frame(
    body: memoryview,
    header_len: int,
    *,
    expected: Mapping[str, Sequence[int]] | None,
    global_state: Mapping[str, torch.Tensor] | None,
) -> Frame:
    """Validate and decode a version-2 frame whose size, prefix and hash were checked."""
    header = _parse_codec_header(body[_PREFIX.size : _PREFIX.size + header_len])
    codec: str = header["codec"]
    entries = header["tensors"]
    declared = {e["name"]: tuple(e["shape"]) for e in entries}

    # The receiver's model, before the payload: a shape we do not hold never sizes a buffer.
    if expected is not None:
        _check_expected(declared, expected)
    if codec in codecs.DELTA_CODECS and global_state is None:
        raise FrameRejected(
            "codec",
            f"frame carries a {codec} delta: decode it with decode_update and the round's global",
        )

    payload = body[_PREFIX.size + header_len :]
    _check_payload_len(header, payload)
    stored = _safetensors_views(payload, _CODEC_TAGS)  # views of the frame, no copy
    roles = codecs.CODEC_ARRAYS[codec]
    want_keys = {f"{i}.{role}" for i in range(len(entries)) for role in roles}
    if set(stored) != want_keys:
        raise FrameRejected(
            "header",
            f"payload arrays differ from what {codec} needs: "
            + _name_diff(expected=dict.fromkeys(want_keys), got=stored, got_label="extra"),
        )

    result: dict[str, torch.Tensor] = {}
    for i, entry in enumerate(entries):
        name, shape = entry["name"], tuple(entry["shape"])
        numel = math.prod(shape)
        k = entry.get("k")
        arrays: dict[str, np.ndarray] = {}
        for role, np_dtype in roles.items():
            arrays[role] = _payload_array(
                stored[f"{i}.{role}"], name, role, np_dtype, _role_count(codec, role, shape, k)
            )
        if "i" in arrays:
            idx = arrays["i"]
            if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= numel):
                raise FrameRejected(
                    "indices", f"tensor {name!r} has an index outside 0..{numel - 1}"
                )
            if idx.size > 1 and not bool((np.diff(idx.astype(np.int64)) > 0).all()):
                raise FrameRejected(
                    "indices", f"tensor {name!r} has indices not strictly increasing (repeats)"
                )
        if "s" in arrays:
            s = arrays["s"]
            if not (np.isfinite(s).all() and (s > 0).all()):
                raise FrameRejected(
                    "scales", f"tensor {name!r} has a scale that is not finite and > 0"
                )
        if arrays["v"].dtype.kind == "f" and not np.isfinite(arrays["v"]).all():
            raise FrameRejected("nonfinite", f"tensor {name!r} has NaN or Inf values")
        tensor = codecs.decode_tensor(codec, codecs.EncodedTensor(shape, arrays, k=k))
        if global_state is not None and codec in codecs.DELTA_CODECS:
            tensor = torch.from_numpy(_np32(global_state[name]) + tensor.numpy())
        if not np.isfinite(tensor.numpy()).all():
            raise FrameRejected("nonfinite", f"tensor {name!r} has NaN or Inf values once decoded")
        result[name] = tensor

    return Frame(
        job=header["job"],
        round=header["round"],
        client=header["client"],
        dtype=CODEC_VALUE_DTYPES[codec],
        tensors=result,
        codec=codec,
    )


def _np32(tensor: torch.Tensor) -> np.ndarray:
    """A float32 numpy view/copy on the CPU (numpy: torch's thread pool is slow when busy)."""
    return tensor.detach().to(device="cpu", dtype=torch.float32).numpy()


def _role_count(codec: str, role: str, shape: tuple[int, ...], k: int | None) -> int:
    """How many elements array `role` of a tensor of `shape` must hold under `codec`."""
    if role in ("i",) or (role == "v" and codec in codecs.SPARSE_CODECS):
        return int(k or 0)
    if role == "s":
        return codecs.int8_rows(shape) if codec == "int8" else 1
    return math.prod(shape)


def _payload_array(
    view: tuple[str, np.ndarray], name: str, role: str, np_dtype: np.dtype, count: int
) -> np.ndarray:
    """One payload array, checked for dtype and 1-D length (its byte count matched its
    offsets in `_safetensors_views`)."""
    role_name = {"v": "values", "s": "scales", "i": "indices"}[role]
    tag = _SAFETENSORS_NUMPY_TAGS[np_dtype.str]
    st_tag, array = view
    if st_tag != tag:
        raise FrameRejected(
            "dtype", f"tensor {name!r} {role_name} are stored as {st_tag}, expected {tag}"
        )
    shape = list(array.shape)
    if shape != [count]:
        reason = "indices" if role == "i" else ("scales" if role == "s" else "shape")
        raise FrameRejected(
            reason, f"tensor {name!r} has {role_name} of shape {shape}, expected [{count}]"
        )
    return array

