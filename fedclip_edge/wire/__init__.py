"""The update wire format: one versioned, self-checking binary frame per adapter update.

Devices and the server exchange adapter tensors as frames (over MQTT later). A frame is

    magic b"FCLP" | version u8 | header length H u32 | header (H bytes of UTF-8 JSON)
    | payload (safetensors) | sha256 of everything before it (32 bytes)

with integers little-endian. The header names the job, round, client, dtype and every tensor's
name and shape, so a receiver can check a frame against the model it expects before it trusts a
single value. Frames arrive from the network: `decode_frame` treats its input as hostile (no
pickle, no eval, bounded lengths, declared lengths checked against the bytes actually there) and
rejects anything wrong with a `FrameRejected` whose `reason` an aggregator can count.

The package, by layer (each imports only those above it):

- `container`: the layout, `FrameRejected` and its reasons, `Frame`, the size/prefix/hash
  checks and the strict JSON header helpers;
- `payload`: a strict, zero-copy safetensors reader for the payload;
- `dense`: version-1 frames (`encode_frame`), fp32 or fp16 tensors as they are;
- `codec_frames`: version-2 frames (`encode_update`), any `fedclip_edge.codecs` encoding;
- `decode`: `decode_frame` and `decode_update`, which dispatch on the version.

Import from `fedclip_edge.wire`: the names below are the public API.
"""

from __future__ import annotations

from fedclip_edge.wire.codec_frames import (
    CODEC_VALUE_DTYPES,
    MAX_DECODED_ELEMENTS,
    encode_update,
)
from fedclip_edge.wire.container import (
    DEFAULT_MAX_FRAME_BYTES,
    DENSE_FORMAT_VERSION,
    FIXED_OVERHEAD,
    FORMAT_VERSION,
    MAGIC,
    MAX_HEADER_BYTES,
    READ_VERSIONS,
    REASONS,
    Frame,
    FrameRejected,
    expected_shapes,
    frame_codec,
)
from fedclip_edge.wire.decode import decode_frame, decode_update
from fedclip_edge.wire.dense import SUPPORTED_DTYPES, encode_frame

__all__ = [
    "CODEC_VALUE_DTYPES",
    "DEFAULT_MAX_FRAME_BYTES",
    "DENSE_FORMAT_VERSION",
    "FIXED_OVERHEAD",
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_DECODED_ELEMENTS",
    "MAX_HEADER_BYTES",
    "READ_VERSIONS",
    "REASONS",
    "SUPPORTED_DTYPES",
    "Frame",
    "FrameRejected",
    "decode_frame",
    "decode_update",
    "encode_frame",
    "encode_update",
    "expected_shapes",
    "frame_codec",
]
