"""The update wire format: one versioned, self-checking binary frame per adapter update.

Devices and the server exchange adapter tensors as frames (over MQTT later). A frame is

    magic b"FCLP" | version u8 | header length H u32 | header (H bytes of UTF-8 JSON)
    | payload (safetensors) | sha256 of everything before it (32 bytes)

with integers little-endian. The header names the job, round, client, dtype and every tensor's
name and shape, so a receiver can check a frame against the model it expects before it trusts a
single value. Frames arrive from the network: `decode_frame` treats its input as hostile (no
pickle, no eval, bounded lengths, declared lengths checked against the bytes actually there) and
rejects anything wrong with a `FrameRejected` whose `reason` an aggregator can count.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy
import safetensors.torch
import torch

from fedclip_edge import codecs
from fedclip_edge.codecs import DEFAULT_TOPK_FRACTION, ErrorFeedback
from fedclip_edge.errors import FrameError

# Version 2 frames name their update codec (fedclip_edge.codecs); version 1 frames are the dense
# fp32/fp16 frames `encode_frame` still writes (so older receivers keep reading them).
FORMAT_VERSION = 2
DENSE_FORMAT_VERSION = 1
READ_VERSIONS: tuple[int, ...] = (DENSE_FORMAT_VERSION, FORMAT_VERSION)
MAGIC = b"FCLP"
DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024
# A header lists names and shapes only: 1 MiB is far beyond any adapter and bounds JSON parsing.
MAX_HEADER_BYTES = 1024 * 1024

_PREFIX = struct.Struct("<4sBI")  # magic, version, header length
_DIGEST_BYTES = 32
# Bytes every frame has besides its header and payload.
FIXED_OVERHEAD = _PREFIX.size + _DIGEST_BYTES

SUPPORTED_DTYPES: tuple[str, ...] = ("float32", "float16")
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}
# safetensors' dtype tag and the little-endian numpy dtype for each frame dtype.
_SAFETENSORS_TAGS = {"float32": "F32", "float16": "F16"}
_NUMPY_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}

_HEADER_KEYS = frozenset({"job", "round", "client", "dtype", "tensors", "payload_len"})
_TENSOR_KEYS = frozenset({"name", "shape"})

# Every reason a frame can be rejected for, so a caller can set up one counter per reason.
REASONS: frozenset[str] = frozenset(
    {
        "truncated",
        "magic",
        "version",
        "oversize",
        "header",
        "hash",
        "names",
        "shape",
        "dtype",
        "nonfinite",
        "meta",
        # codec frames (version 2)
        "codec",
        "k",
        "indices",
        "scales",
    }
)


class FrameRejected(FrameError):
    """A frame refused for one specific `reason` (one of `REASONS`), with a one-line message.

    Subclasses `FrameError` so the CLI reports it like every other user-facing error, while an
    aggregator can count rejections by `reason` without parsing messages.
    """

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown frame rejection reason {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Frame:
    """A decoded, validated update. Tensors are always float32, whatever dtype travelled.

    Read-only: a float32 frame's tensors are views of the frame's bytes (no copy); writing
    into them is undefined behaviour. Aggregators read them; clone() one to change it.
    """

    job: str
    round: int
    client: str
    dtype: str
    tensors: dict[str, torch.Tensor]
    codec: str = "fp32"


def expected_shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a template state dict, to pass as `decode_frame(expected=...)`.

    Lets a receiver check updates against the model it holds instead of against whatever the
    sender claims.
    """
    return {name: tuple(int(d) for d in tensor.shape) for name, tensor in state.items()}


def encode_frame(
    tensors: Mapping[str, torch.Tensor],
    *,
    job: str,
    round: int,
    client: str,
    dtype: str = "float32",
) -> bytes:
    """Serialize an update into one frame; the same inputs always give the same bytes.

    Names are sorted and tensors copied to contiguous CPU memory in `dtype` ("float16" halves
    the payload). Refuses what a receiver would refuse, so a bad update fails at its source:
    non-floating or non-finite tensors (also values that overflow float16), an empty update,
    an empty job or client, a negative round.
    """
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported frame dtype {dtype!r}: use one of {list(SUPPORTED_DTYPES)}")
    _check_meta_args(job=job, round=round, client=client)
    if not tensors:
        raise ValueError("an update frame needs at least one tensor")

    torch_dtype = _TORCH_DTYPES[dtype]
    prepared: dict[str, torch.Tensor] = {}
    for name in sorted(tensors):
        tensor = tensors[name]
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"invalid tensor name {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        if not tensor.is_floating_point():
            raise TypeError(f"tensor {name!r} has non-floating dtype {tensor.dtype}")
        # clone(): an owned buffer per tensor, so tied/shared weights serialize too.
        cast = tensor.detach().to(device="cpu", dtype=torch_dtype).contiguous().clone()
        if not bool(torch.isfinite(cast).all()):
            extra = " (or overflows float16)" if dtype == "float16" else ""
            raise FrameRejected("nonfinite", f"tensor {name!r} has NaN or Inf values{extra}")
        prepared[name] = cast

    payload = safetensors.torch.save(prepared)
    header = {
        "job": job,
        "round": round,
        "client": client,
        "dtype": dtype,
        "tensors": [{"name": n, "shape": list(t.shape)} for n, t in prepared.items()],
        "payload_len": len(payload),
    }
    return _assemble(DENSE_FORMAT_VERSION, header, payload)


def decode_frame(
    data: bytes,
    *,
    expected: Mapping[str, Sequence[int]] | None = None,
    max_bytes: int = DEFAULT_MAX_FRAME_BYTES,
) -> Frame:
    """Parse and validate a frame from an untrusted source; `FrameRejected` if anything is off.

    Checks run cheapest first: size before hashing, structure and hash before parsing JSON, the
    header before the payload, the payload against the header, then against `expected` (names
    and shapes of the model the receiver holds), and values last.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"frame data must be bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise FrameRejected(
            "oversize", f"frame is {len(data)} bytes, above the {max_bytes}-byte limit"
        )
    # a view, not a copy: the hash and the slices below read the caller's bytes in place, and
    # float32 tensors are views of them. Only immutable bytes are viewed: any other buffer
    # (bytearray, a read-only view of one) is copied once, so later writes to it cannot change
    # the tensors handed out.
    data = _readonly_view(data)
    if len(data) < FIXED_OVERHEAD:
        raise FrameRejected(
            "truncated",
            f"frame is {len(data)} bytes, shorter than the {FIXED_OVERHEAD} fixed bytes of a frame",
        )
    magic, version, header_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise FrameRejected("magic", f"bad magic {magic!r}: not an update frame")
    if version not in READ_VERSIONS:
        raise FrameRejected(
            "version",
            f"unknown frame format version {version} (this build reads {list(READ_VERSIONS)})",
        )
    if header_len > MAX_HEADER_BYTES:
        raise FrameRejected(
            "header", f"header length {header_len} is above the {MAX_HEADER_BYTES}-byte limit"
        )
    if _PREFIX.size + header_len + _DIGEST_BYTES > len(data):
        raise FrameRejected(
            "header",
            f"header length {header_len} runs past the end of a {len(data)}-byte frame",
        )
    body, digest = data[:-_DIGEST_BYTES], data[-_DIGEST_BYTES:]
    if hashlib.sha256(body).digest() != digest:
        raise FrameRejected("hash", "frame hash mismatch: payload corrupted or tampered")
    if version == FORMAT_VERSION:
        return _decode_codec_frame(body, header_len, expected=expected, global_state=None)

    header = _parse_header(bytes(body[_PREFIX.size : _PREFIX.size + header_len]))
    dtype: str = header["dtype"]
    declared: dict[str, tuple[int, ...]] = {t["name"]: tuple(t["shape"]) for t in header["tensors"]}

    payload = body[_PREFIX.size + header_len :]
    if header["payload_len"] != len(payload):
        reason = "truncated" if len(payload) < header["payload_len"] else "header"
        raise FrameRejected(
            reason,
            f"header declares a {header['payload_len']}-byte payload, frame carries {len(payload)}",
        )

    stored = _safetensors_views(payload, _DENSE_TAGS)  # views of `data`, no copy
    if set(stored) != set(declared):
        raise FrameRejected(
            "header",
            "payload tensors differ from the header's: "
            + _name_diff(expected=declared, got=stored, got_label="in payload only"),
        )

    tag = _SAFETENSORS_TAGS[dtype]
    result: dict[str, torch.Tensor] = {}
    for name in sorted(declared):
        st_tag, array = stored[name]
        if st_tag != tag:
            raise FrameRejected(
                "dtype",
                f"tensor {name!r} is stored as {st_tag}, header says {dtype} ({tag})",
            )
        if array.shape != declared[name]:
            raise FrameRejected(
                "shape",
                f"tensor {name!r} has shape {list(array.shape)} in the payload, "
                f"{list(declared[name])} in the header",
            )
        if array.dtype != np.float32:
            # float16 on the wire: the one copy it needs, through torch in single-threaded
            # chunks (2x numpy's astype; the same values)
            array = codecs.to_fp32(array)
        result[name] = torch.from_numpy(array)

    if expected is not None:
        want = {name: tuple(int(d) for d in shape) for name, shape in expected.items()}
        if set(want) != set(result):
            raise FrameRejected(
                "names",
                "frame tensors differ from the model's: "
                + _name_diff(expected=want, got=result, got_label="unexpected"),
            )
        for name in sorted(want):
            got = tuple(result[name].shape)
            if got != want[name]:
                raise FrameRejected(
                    "shape",
                    f"tensor {name!r} has shape {list(got)}, the model expects {list(want[name])}",
                )

    for name, tensor in result.items():
        # numpy, not torch: on a busy aggregator torch's thread pool made this check ~100x
        # slower (127 ms vs 0.04 ms per adapter, measured by `bench aggregator`)
        if not np.isfinite(tensor.numpy()).all():
            raise FrameRejected("nonfinite", f"tensor {name!r} has NaN or Inf values")

    return Frame(
        job=header["job"],
        round=header["round"],
        client=header["client"],
        dtype=dtype,
        tensors=result,
        codec="fp16" if dtype == "float16" else "fp32",
    )


def _assemble(version: int, header: dict[str, Any], payload: bytes) -> bytes:
    """prefix + canonical JSON header + payload + sha256 of all three: both frame versions."""
    header_bytes = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    if len(header_bytes) > MAX_HEADER_BYTES:
        raise ValueError(
            f"frame header is {len(header_bytes)} bytes, above the {MAX_HEADER_BYTES} limit"
        )
    body = _PREFIX.pack(MAGIC, version, len(header_bytes)) + header_bytes + payload
    return body + hashlib.sha256(body).digest()


def _check_meta_args(*, job: Any, round: Any, client: Any) -> None:
    """Sender-side version of the header's meta checks, raised as plain argument errors."""
    if not isinstance(job, str) or not job:
        raise ValueError(f"job must be a non-empty string, got {job!r}")
    if not isinstance(client, str) or not client:
        raise ValueError(f"client must be a non-empty string, got {client!r}")
    if isinstance(round, bool) or not isinstance(round, int) or round < 0:
        raise ValueError(f"round must be a non-negative integer, got {round!r}")


def _is_int(value: Any) -> bool:
    # JSON true/false decode to bool, which is an int subclass: never accept them as numbers.
    return isinstance(value, int) and not isinstance(value, bool)


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    counts = Counter(k for k, _ in pairs)
    if len(counts) != len(pairs):
        raise ValueError(f"duplicate keys {sorted(k for k, n in counts.items() if n > 1)}")
    return dict(pairs)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _load_header_json(raw: bytes) -> Any:
    """Strict JSON: no duplicate keys, no NaN/Infinity constants, one-line errors."""
    try:
        header = json.loads(
            bytes(raw).decode("utf-8"),
            object_pairs_hook=_reject_duplicate_keys,
            parse_constant=_reject_constant,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FrameRejected(
            "header", f"header is not valid UTF-8 JSON: {_first_line(exc)}"
        ) from None
    return header


def _typed_header(raw: bytes, keys: frozenset[str], text_key: str) -> dict[str, Any]:
    """What both frame versions check first: a JSON object with exactly `keys`, string ids,
    integer round and payload length."""
    header = _load_header_json(raw)
    if not isinstance(header, dict):
        raise FrameRejected("header", f"header is a JSON {type(header).__name__}, not an object")
    missing = sorted(keys - header.keys())
    unknown = sorted(header.keys() - keys)
    if missing or unknown:
        raise FrameRejected("header", f"header keys wrong: missing {missing}, unknown {unknown}")
    for key in ("job", "client", text_key):
        if not isinstance(header[key], str):
            raise FrameRejected("header", f"header {key!r} must be a string")
    for key in ("round", "payload_len"):
        if not _is_int(header[key]):
            raise FrameRejected("header", f"header {key!r} must be an integer")
    if header["payload_len"] < 0:
        raise FrameRejected("header", "header 'payload_len' is negative")
    return header


def _parse_header(raw: bytes) -> dict[str, Any]:
    """Decode and type-check the JSON header; semantic checks (meta, dtype) follow the types."""
    header = _typed_header(raw, _HEADER_KEYS, "dtype")
    if not isinstance(header["tensors"], list) or not header["tensors"]:
        raise FrameRejected("header", "header 'tensors' must be a non-empty list")
    names: set[str] = set()
    for i, entry in enumerate(header["tensors"]):
        if not isinstance(entry, dict) or entry.keys() != _TENSOR_KEYS:
            raise FrameRejected("header", f"header tensor entry {i} must be {{name, shape}}")
        name, shape = entry["name"], entry["shape"]
        if not isinstance(name, str) or not name:
            raise FrameRejected("header", f"header tensor entry {i} has no valid name")
        if name in names:
            raise FrameRejected("header", f"header lists tensor {name!r} twice")
        names.add(name)
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise FrameRejected(
                "header", f"tensor {name!r} shape must be a list of non-negative integers"
            )

    if not header["job"]:
        raise FrameRejected("meta", "frame has an empty job id")
    if not header["client"]:
        raise FrameRejected("meta", "frame has an empty client id")
    if header["round"] < 0:
        raise FrameRejected("meta", f"frame has negative round {header['round']}")
    if header["dtype"] not in SUPPORTED_DTYPES:
        raise FrameRejected(
            "dtype",
            f"frame dtype {header['dtype']!r} is not one of {list(SUPPORTED_DTYPES)}",
        )
    return header


def _name_diff(*, expected: Mapping[str, Any], got: Mapping[str, Any], got_label: str) -> str:
    """'missing [...]; unexpected [...]' for the two name sets, both sorted for stable messages."""
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    parts = []
    if missing:
        parts.append(f"missing {missing}")
    if extra:
        parts.append(f"{got_label} {extra}")
    return "; ".join(parts)


def _first_line(exc: BaseException) -> str:
    """A parser's error text, cut to one line so rejection messages stay one line each."""
    lines = str(exc).splitlines()
    return lines[0] if lines else type(exc).__name__


# --- codec frames (version 2) ----------------------------------------------------------------
#
# The header has `codec` instead of `dtype`, and each tensor entry of a sparse codec a `k`.
# The payload is safetensors with arrays named "<i>.<role>": i is the tensor's position in the
# header's (sorted) list, role is v (values), s (scales) or i (flat indices), as
# `codecs.CODEC_ARRAYS` lists per codec. Numbers come from the network, so everything that sizes
# an allocation (shapes, k) is checked against limits and against the receiver's own model
# before any payload array is read.

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


def decode_update(
    data: bytes,
    global_state: Mapping[str, torch.Tensor],
    *,
    max_bytes: int = DEFAULT_MAX_FRAME_BYTES,
) -> Frame:
    """Decode any update frame (version 1, or 2 with any codec) into the FULL adapter state.

    `global_state` is the global of the round the frame names: delta codecs are added to it,
    and every frame's names and shapes must match it (checked before any payload array is
    read, so a hostile header cannot size an allocation). The result aggregates like a
    dense fp32 update.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"frame data must be bytes, got {type(data).__name__}")
    want = expected_shapes(global_state)
    if len(data) >= _PREFIX.size:
        magic, version, _ = _PREFIX.unpack_from(bytes(data[: _PREFIX.size]))
        if magic == MAGIC and version == FORMAT_VERSION:
            body, header_len = _checked_body(data, max_bytes)
            return _decode_codec_frame(body, header_len, expected=want, global_state=global_state)
    return decode_frame(data, expected=want, max_bytes=max_bytes)


def frame_codec(frame: Frame) -> str:
    """The codec name of a decoded frame (version-1 frames are fp32 or fp16)."""
    return frame.codec


def _checked_body(data: bytes, max_bytes: int) -> tuple[memoryview, int]:
    """Size, prefix and hash checks shared by both versions; returns (body, header length)."""
    if len(data) > max_bytes:
        raise FrameRejected(
            "oversize", f"frame is {len(data)} bytes, above the {max_bytes}-byte limit"
        )
    data = _readonly_view(data)
    if len(data) < FIXED_OVERHEAD:
        raise FrameRejected(
            "truncated",
            f"frame is {len(data)} bytes, shorter than the {FIXED_OVERHEAD} fixed bytes of a frame",
        )
    _, _, header_len = _PREFIX.unpack_from(data)
    if header_len > MAX_HEADER_BYTES:
        raise FrameRejected(
            "header", f"header length {header_len} is above the {MAX_HEADER_BYTES}-byte limit"
        )
    if _PREFIX.size + header_len + _DIGEST_BYTES > len(data):
        raise FrameRejected(
            "header",
            f"header length {header_len} runs past the end of a {len(data)}-byte frame",
        )
    body, digest = data[:-_DIGEST_BYTES], data[-_DIGEST_BYTES:]
    if hashlib.sha256(body).digest() != digest:
        raise FrameRejected("hash", "frame hash mismatch: payload corrupted or tampered")
    return body, header_len


def _readonly_view(data: bytes | bytearray | memoryview) -> memoryview:
    """A byte view of `data` that nobody can write through: immutable `bytes` (or a view of
    them) in place; anything else (bytearray, a read-only view of writable memory, mmap)
    copied once. Tensors may be views of what this returns."""
    view = memoryview(data).cast("B")
    return view if isinstance(view.obj, bytes) else memoryview(bytes(view))


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
        want = {name: tuple(int(d) for d in shape) for name, shape in expected.items()}
        if set(want) != set(declared):
            raise FrameRejected(
                "names",
                "frame tensors differ from the model's: "
                + _name_diff(expected=want, got=declared, got_label="unexpected"),
            )
        for name in sorted(want):
            if declared[name] != want[name]:
                raise FrameRejected(
                    "shape",
                    f"tensor {name!r} has shape {list(declared[name])}, "
                    f"the model expects {list(want[name])}",
                )
    if codec in codecs.DELTA_CODECS and global_state is None:
        raise FrameRejected(
            "codec",
            f"frame carries a {codec} delta: decode it with decode_update and the round's global",
        )

    payload = body[_PREFIX.size + header_len :]
    if header["payload_len"] != len(payload):
        reason = "truncated" if len(payload) < header["payload_len"] else "header"
        raise FrameRejected(
            reason,
            f"header declares a {header['payload_len']}-byte payload, frame carries {len(payload)}",
        )
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


# --- the payload: a strict safetensors reader over a memoryview ------------------------------
#
# safetensors.deserialize takes bytes (a copy of the payload) and returns each tensor's data as
# bytes again (a second copy). The layout is simple enough to read in place, with every check
# a hostile payload needs:
#
#     header length n (u64 LE) | n bytes of JSON {name: {dtype, shape, data_offsets}, ...,
#     optional "__metadata__": {str: str}} | data
#
# n bounded and inside the payload; strict JSON (no duplicate keys, no NaN); exactly the three
# keys per tensor; dtype from an allow-list; shape non-negative integers; offsets integers
# within the data, each tensor's byte count equal to its shape's; the tensors' spans contiguous
# and non-overlapping, covering the data exactly (as safetensors itself requires). Arrays are
# np.frombuffer views: read-only when the frame is immutable bytes.

_ST_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "I8": np.dtype("i1"),
              "I32": np.dtype("<i4")}
_DENSE_TAGS = frozenset({"F32", "F16"})
_CODEC_TAGS = frozenset(_ST_DTYPES)
_ST_LEN = struct.Struct("<Q")
_ST_KEYS = frozenset({"dtype", "shape", "data_offsets"})
_ST_MAX_RANK = 8  # as the codec header's bound; an adapter's tensors have 1 or 2


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


def _quiet_readonly_warning() -> None:
    """Spend torch's once-per-process "NumPy array is not writable" warning here, at import.

    Decoded tensors (and the codecs' arrays) are views of the immutable frame bytes by design
    (`Frame` says they are read-only); the warning would otherwise print once, at a random
    first update, in every aggregator and agent process.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.from_numpy(np.frombuffer(bytes(4), dtype=np.float32))


_quiet_readonly_warning()
