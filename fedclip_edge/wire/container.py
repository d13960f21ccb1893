"""The frame container: what every update frame shares, whatever it carries.

    magic b"FCLP" | version u8 | header length H u32 | header (H bytes of UTF-8 JSON)
    | payload (safetensors) | sha256 of everything before it (32 bytes)

with integers little-endian. This module holds the layout's constants, the rejection type
(`FrameRejected`, with the reasons an aggregator counts), the decoded `Frame`, the size, prefix
and hash checks both versions run first, and the strict JSON header helpers. The dense frames
(version 1, `dense.py`), the codec frames (version 2, `codec_frames.py`) and the payload reader
(`payload.py`) build on it; nothing here imports them.
"""

from __future__ import annotations

import hashlib
import json
import struct
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

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


def frame_codec(frame: Frame) -> str:
    """The codec name of a decoded frame (version-1 frames are fp32 or fp16)."""
    return frame.codec


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


def _checked_frame(data: bytes, max_bytes: int) -> tuple[int, memoryview, int]:
    """Size, prefix and hash checks both versions share, cheapest first (size before hashing,
    structure before the hash); returns (version, body, header length). The body is a
    read-only view: see `_readonly_view`."""
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
    return version, body, header_len


def _check_payload_len(header: Mapping[str, Any], payload: memoryview) -> None:
    """The header's declared payload length against the bytes the frame carries."""
    if header["payload_len"] != len(payload):
        reason = "truncated" if len(payload) < header["payload_len"] else "header"
        raise FrameRejected(
            reason,
            f"header declares a {header['payload_len']}-byte payload, frame carries {len(payload)}",
        )


def _check_expected(
    declared: Mapping[str, tuple[int, ...]], expected: Mapping[str, Any]
) -> None:
    """Names and shapes a frame carries against the receiver's model."""
    want = {name: tuple(int(d) for d in shape) for name, shape in expected.items()}
    if set(want) != set(declared):
        raise FrameRejected(
            "names",
            "frame tensors differ from the model's: "
            + _name_diff(expected=want, got=declared, got_label="unexpected"),
        )
    for name in sorted(want):
        if tuple(declared[name]) != want[name]:
            raise FrameRejected(
                "shape",
                f"tensor {name!r} has shape {list(declared[name])}, "
                f"the model expects {list(want[name])}",
            )


def _readonly_view(data: bytes | bytearray | memoryview) -> memoryview:
    """A byte view of `data` that nobody can write through: immutable `bytes` (or a view of
    them) in place; anything else (bytearray, a read-only view of writable memory, mmap)
    copied once. Tensors may be views of what this returns."""
    view = memoryview(data).cast("B")
    return view if isinstance(view.obj, bytes) else memoryview(bytes(view))



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
