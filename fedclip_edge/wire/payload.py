"""The payload reader: a strict safetensors reader over a memoryview.

safetensors.deserialize takes bytes (a copy of the payload) and returns each tensor's data as
bytes again (a second copy). The layout is simple enough to read in place, with every check
a hostile payload needs:

    header length n (u64 LE) | n bytes of JSON {name: {dtype, shape, data_offsets}, ...,
    optional "__metadata__": {str: str}} | data

n bounded and inside the payload; strict JSON (no duplicate keys, no NaN); exactly the three
keys per tensor; dtype from an allow-list; shape non-negative integers; offsets integers
within the data, each tensor's byte count equal to its shape's; the tensors' spans contiguous
and non-overlapping, covering the data exactly (as safetensors itself requires). Arrays are
np.frombuffer views: read-only when the frame is immutable bytes.
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np

from fedclip_edge.wire.container import (
    MAX_HEADER_BYTES,
    FrameRejected,
    _first_line,
    _is_int,
    _reject_constant,
    _reject_duplicate_keys,
)

_ST_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "I8": np.dtype("i1"),
              "I32": np.dtype("<i4")}
_DENSE_TAGS = frozenset({"F32", "F16"})
_CODEC_TAGS = frozenset(_ST_DTYPES)
_ST_LEN = struct.Struct("<Q")
_ST_KEYS = frozenset({"dtype", "shape", "data_offsets"})
_ST_MAX_RANK = 8  # as the codec header's bound; an adapter's tensors have 1 or 2
# An empty tensor's non-zero dimensions multiply to at most this (the codec header's bound on
# elements); a tensor with data is bounded by its bytes already.
_ST_MAX_EMPTY_DIMS = 64 * 1024 * 1024


def _bad_payload(why: str) -> FrameRejected:
    return FrameRejected("header", f"payload is not valid safetensors: {why}")


def _safetensors_views(
    payload: memoryview, allowed: frozenset[str]
) -> dict[str, tuple[str, np.ndarray]]:
    """{name: (dtype tag, array view)} of a safetensors payload, validated; FrameRejected
    ("header", or "dtype" for a dtype outside `allowed`) otherwise."""
    if len(payload) < _ST_LEN.size:
        raise _bad_payload(f"{len(payload)} bytes, shorter than its 8-byte header length")
    (n,) = _ST_LEN.unpack_from(payload)
    if n > MAX_HEADER_BYTES:
        raise _bad_payload(f"header length {n} is above the {MAX_HEADER_BYTES}-byte limit")
    if _ST_LEN.size + n > len(payload):
        raise _bad_payload(f"header length {n} runs past the end of a {len(payload)}-byte payload")
    try:
        header = json.loads(
            bytes(payload[_ST_LEN.size : _ST_LEN.size + n]).decode("utf-8"),
            object_pairs_hook=_reject_duplicate_keys,
            parse_constant=_reject_constant,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _bad_payload(f"header is not UTF-8 JSON: {_first_line(exc)}") from None
    if not isinstance(header, dict):
        raise _bad_payload(f"header is a JSON {type(header).__name__}, not an object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())
    ):
        raise _bad_payload("__metadata__ must map strings to strings")
    data = payload[_ST_LEN.size + n :]
    size = len(data)
    spans: list[tuple[int, int, str]] = []
    out: dict[str, tuple[str, np.ndarray]] = {}
    for name, entry in header.items():
        label = repr(name[:40])
        if not isinstance(entry, dict) or entry.keys() != _ST_KEYS:
            raise _bad_payload(f"tensor {label} must be {{dtype, shape, data_offsets}}")
        tag, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(tag, str):
            raise _bad_payload(f"tensor {label} dtype must be a string")
        if tag not in allowed:
            raise FrameRejected(
                "dtype", f"tensor {label} is stored as {tag[:20]!r}, not one of {sorted(allowed)}"
            )
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise _bad_payload(f"tensor {label} shape must be a list of non-negative integers")
        if len(shape) > _ST_MAX_RANK:  # numpy refuses more than 64 (a ValueError, not ours)
            raise _bad_payload(f"tensor {label} has {len(shape)} dimensions, over {_ST_MAX_RANK}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= size
        ):
            raise _bad_payload(f"tensor {label} data_offsets {str(offsets)[:60]} are not "
                               f"[begin, end] within the {size}-byte data")
        begin, end = offsets
        np_dtype = _ST_DTYPES[tag]
        numel = math.prod(shape)
        if numel * np_dtype.itemsize != end - begin:
            raise _bad_payload(f"tensor {label} spans {end - begin} bytes, its shape "
                               f"{shape[:9]} needs {numel * np_dtype.itemsize}")
        if numel == 0 and math.prod(d for d in shape if d) > _ST_MAX_EMPTY_DIMS:
            # an empty tensor passes the byte count whatever its other dimensions: numpy would
            # refuse [0, 2**64] or [0, 2**62, 2**62] with a ValueError of its own
            raise _bad_payload(f"tensor {label} declares shape {str(shape[:9])[:80]}, over "
                               f"{_ST_MAX_EMPTY_DIMS} elements beside its zero")
        spans.append((begin, end, name))
        array = (np.frombuffer(data, dtype=np_dtype, count=numel, offset=begin) if numel
                 else np.empty(0, dtype=np_dtype))
        out[name] = (tag, array.reshape(shape))
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at:
            what = "overlaps another" if begin < at else f"leaves bytes {at}..{begin} unused"
            raise _bad_payload(f"tensor {name[:40]!r} at {begin}..{end} {what}")
        at = end
    if at != size:
        raise _bad_payload(f"{size - at} data bytes after the last tensor")
    return out

