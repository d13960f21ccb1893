"""Envelopes: the one framing every fedclip MQTT payload has, and the rejection type.

    b"FCMQ" | version u8 | header length u32 (little-endian) | JSON header | binary body

The JSON header carries the message type and metadata; the body carries a wire frame
(`fedclip_edge.wire`) for global models and updates. Never pickle, never JSON lists of floats.
Decoding treats input as hostile and raises `MessageRejected` with a `reason` a receiver can
count.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

from fedclip_edge.errors import FrameError

PROTOCOL_VERSION = 1
MAGIC = b"FCMQ"
_PREFIX = struct.Struct("<4sBI")
MAX_HEADER_BYTES = 256 * 1024
# MQTT's protocol maximum payload is 268,435,455 bytes; stay well below it by default.
DEFAULT_MAX_PAYLOAD = 64 * 1024 * 1024
MAX_MESSAGE_BYTES = 1024 * 1024 * 1024  # what a receiver reassembles at most (1 GiB)

MESSAGE_TYPES = ("hello", "status", "global", "update", "control", "chunk", "secagg")

# Reasons a message can be refused for (frame reasons from the wire format are `frame_<r>`).
REASONS: frozenset[str] = frozenset(
    {
        "envelope",
        "type",
        "fields",
        "topic",
        "job",
        "client_mismatch",
        "unknown_client",
        "stale",
        "future",
        "duplicate",
        "chunk",
        "chunk_hash",
        "chunk_oversize",
        "chunk_expired",
        "dim",
        "unsigned",
        "bad_signature",
        "unknown_key",
        "malformed_signature",
        "site_claim",
        "run",
        "secagg",  # a secure-aggregation message out of step (broker/secagg_round.py)
    }
)


class MessageRejected(FrameError):
    """A message refused for one `reason`; one-line message, countable without parsing."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS and not reason.startswith("frame_"):
            raise ValueError(f"unknown rejection reason {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message

def encode_envelope(header: Mapping[str, Any], body: bytes = b"") -> bytes:
    """One envelope; the header is sorted compact JSON (same input, same bytes)."""
    raw = json.dumps(dict(header), sort_keys=True, separators=(",", ":"), allow_nan=False)
    hb = raw.encode("utf-8")
    if len(hb) > MAX_HEADER_BYTES:
        raise ValueError(f"envelope header is {len(hb)} bytes, above {MAX_HEADER_BYTES}")
    return _PREFIX.pack(MAGIC, PROTOCOL_VERSION, len(hb)) + hb + bytes(body)


def _no_constants(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def decode_envelope(
    data: bytes, max_bytes: int = MAX_MESSAGE_BYTES
) -> tuple[dict, bytes | memoryview]:
    """(header, body) of an untrusted envelope; `MessageRejected('envelope')` if malformed."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageRejected("envelope", f"payload is a {type(data).__name__}, not bytes")
    if len(data) > max_bytes:
        raise MessageRejected("envelope", f"payload of {len(data)} bytes is above {max_bytes}")
    if len(data) < _PREFIX.size:
        raise MessageRejected("envelope", f"payload of {len(data)} bytes is too short")
    magic, version, hlen = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise MessageRejected("envelope", f"bad magic {bytes(magic)!r}: not a fedclip message")
    if version != PROTOCOL_VERSION:
        raise MessageRejected("envelope", f"unknown protocol version {version}")
    if hlen > MAX_HEADER_BYTES or _PREFIX.size + hlen > len(data):
        raise MessageRejected("envelope", f"header length {hlen} does not fit the payload")
    try:
        header = json.loads(
            bytes(data[_PREFIX.size : _PREFIX.size + hlen]).decode("utf-8"),
            parse_constant=_no_constants,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MessageRejected("envelope", f"header is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise MessageRejected("envelope", "header is not a JSON object")
    if header.get("type") not in MESSAGE_TYPES:
        raise MessageRejected("type", f"unknown message type {header.get('type')!r}")
    # the body as a view of the payload, not a 2 MB copy per update (the frame decoder reads it)
    return header, memoryview(data)[_PREFIX.size + hlen :]


def peek_type(payload: bytes) -> str | None:
    """The envelope's message type without copying the body; None if not an envelope."""
    if len(payload) < _PREFIX.size:
        return None
    magic, version, hlen = _PREFIX.unpack_from(payload)
    if magic != MAGIC or version != PROTOCOL_VERSION or hlen > MAX_HEADER_BYTES:
        return None
    try:
        header = json.loads(bytes(payload[_PREFIX.size : _PREFIX.size + hlen]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    kind = header.get("type") if isinstance(header, dict) else None
    return kind if isinstance(kind, str) else None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)

