"""Reading any frame: the container's checks, then the dense or the codec decoder by version.

Frames arrive from the network: both entry points treat their input as hostile (no pickle, no
eval, bounded lengths, declared lengths checked against the bytes actually there) and reject
anything wrong with a `FrameRejected` whose `reason` an aggregator can count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedclip_edge.wire.codec_frames import _decode_codec_frame
from fedclip_edge.wire.container import (
    DEFAULT_MAX_FRAME_BYTES,
    FORMAT_VERSION,
    Frame,
    _checked_frame,
    expected_shapes,
)
from fedclip_edge.wire.dense import _decode_dense


def decode_frame(
    data: bytes,
    *,
    expected: Mapping[str, Sequence[int]] | None = None,
    max_bytes: int = DEFAULT_MAX_FRAME_BYTES,
) -> Frame:
    """Parse and validate a frame from an untrusted source; `FrameRejected` if anything is off.

    Checks run cheapest first: size before hashing, structure and hash before parsing JSON, the
    header before the payload, the payload against the header, then against `expected` (names
    and shapes of the model the receiver holds), and values last. A delta-codec frame needs
    `decode_update` (the round's global).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"frame data must be bytes, got {type(data).__name__}")
    version, body, header_len = _checked_frame(data, max_bytes)
    if version == FORMAT_VERSION:
        return _decode_codec_frame(body, header_len, expected=expected, global_state=None)
    return _decode_dense(body, header_len, expected=expected)


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
    version, body, header_len = _checked_frame(data, max_bytes)
    if version == FORMAT_VERSION:
        return _decode_codec_frame(body, header_len, expected=want, global_state=global_state)
    return _decode_dense(body, header_len, expected=want)
