"""The payload's safetensors header is hostile input too: whatever it declares, `decode_frame`
and `decode_update` end in `FrameRejected` (or a valid frame), never another exception.

Found by a red-team fuzz run (issue 22): a tensor of shape [0, 2**64], [0, 2**63] or
[0, 2**62, 2**62] with offsets [0, 0] holds zero bytes, so every byte check passed, and numpy
then refused to build the array with a ValueError that escaped the decoder (live, the aggregator
counted it as `internal`). The reported shapes are pinned below in both frame versions; the
hypothesis test draws whole safetensors headers (dtype, shape, offsets, extra keys, metadata,
huge numbers) behind a valid outer header, so each case reaches the payload reader.
Profiles: tests/support/fuzz_profiles.py.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import pytest
import safetensors.numpy
import torch
from hypothesis import given
from hypothesis import strategies as st
from support import fuzz_profiles

from fedclip_edge import wire
from fedclip_edge.wire import FrameRejected, decode_frame, decode_update

_PREFIX = struct.Struct("<4sBI")
GLOBAL = {"w": torch.zeros(2)}  # the receiver's model: one tensor "w" of shape [2]


def _frame(version: int, st_header: dict[str, Any], data: bytes) -> bytes:
    """A frame whose outer header matches GLOBAL (so decoding reaches the payload), carrying a
    safetensors payload with `st_header` and `data`; the hash is correct."""
    st_text = json.dumps(st_header).encode()
    payload = struct.pack("<Q", len(st_text)) + st_text + data
    header: dict[str, Any] = {
        "job": "j",
        "round": 0,
        "client": "c",
        "tensors": [{"name": "w", "shape": [2]}],
        "payload_len": len(payload),
    }
    if version == wire.DENSE_FORMAT_VERSION:
        header["dtype"] = "float32"
    else:
        header["codec"] = "fp32"
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    body = _PREFIX.pack(wire.MAGIC, version, len(text)) + text + payload
    return body + hashlib.sha256(body).digest()


def _valid_entry(version: int) -> tuple[str, dict[str, Any]]:
    """The payload entry a valid frame of `version` carries for GLOBAL's "w"."""
    name = "w" if version == wire.DENSE_FORMAT_VERSION else "0.v"
    return name, {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def _decode_both(data: bytes) -> list[str]:
    """decode_frame and decode_update on `data`: 'ok' or the rejection reason of each. Any
    other exception fails the test."""
    out = []
    for decode in (lambda: decode_frame(data), lambda: decode_update(data, GLOBAL)):
        try:
            decode()
        except FrameRejected as exc:
            assert exc.reason in wire.REASONS
            assert "\n" not in str(exc)
            out.append(exc.reason)
        else:
            out.append("ok")
    return out


def test_the_helpers_build_a_frame_both_decoders_accept() -> None:
    """Guards the tests below: without the hostile entry, the frames they build are valid."""
    for version in wire.READ_VERSIONS:
        name, entry = _valid_entry(version)
        data = _frame(version, {name: entry}, bytes(8))
        assert _decode_both(data) == ["ok", "ok"]
        assert torch.equal(decode_update(data, GLOBAL).tensors["w"], torch.zeros(2))


@pytest.mark.parametrize("version", wire.READ_VERSIONS)
@pytest.mark.parametrize("shape", [[0, 2**64], [0, 2**63], [0, 2**62, 2**62]])
def test_an_empty_tensor_with_huge_dimensions_is_rejected(version: int, shape: list[int]) -> None:
    name, entry = _valid_entry(version)
    st_header = {name: entry, "zz": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}
    assert _decode_both(_frame(version, st_header, bytes(8))) == ["header", "header"]


# Numbers a hostile header might carry: small, at the edges of C integer types, huge; and what
# is not an integer at all.
NUMBERS = st.one_of(
    st.integers(min_value=-3, max_value=16),
    st.sampled_from(
        [2**31 - 1, 2**31, 2**32, 2**53, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**64 + 1,
         10**20, 10**300, -(2**63), -(2**64)]
    ),
    st.integers(min_value=-(2**70), max_value=2**70),
)
NOT_INTEGERS = st.one_of(
    st.none(), st.booleans(), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=5), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
ALLOWED_DTYPES = st.sampled_from(["F32", "F16", "I8", "I32"])  # the codec frames' tags
HOSTILE_DTYPES = st.one_of(
    st.sampled_from(["F64", "BF16", "U8", "BOOL", "", "f32"]), NOT_INTEGERS, NUMBERS
)
SHAPES = st.one_of(
    st.lists(NUMBERS, max_size=10),
    st.lists(NUMBERS, min_size=1, max_size=4).map(lambda s: [0, *s]),  # empty, any other dims
    st.lists(st.one_of(NUMBERS, NOT_INTEGERS), max_size=4),
    NOT_INTEGERS,
    NUMBERS,
)
OFFSETS = st.one_of(
    st.lists(NUMBERS, min_size=2, max_size=2),
    st.integers(min_value=0, max_value=8).map(lambda a: [a, a]),  # an empty span
    st.lists(st.one_of(NUMBERS, NOT_INTEGERS), max_size=3),
    NOT_INTEGERS,
)


@st.composite
def entries(draw) -> Any:
    """One tensor entry, mostly well-formed around hostile values so that it gets past the
    reader's first checks: an allowed dtype three times in four, the three keys (one missing
    or one extra one time in five), not an object at all one time in ten, and one time in
    five an empty tensor (a zero dimension, zero bytes) whose other dimensions are anything."""
    mode = draw(st.integers(min_value=0, max_value=9))
    if mode == 0:
        return draw(st.one_of(NOT_INTEGERS, NUMBERS, st.lists(NUMBERS, max_size=3)))
    if mode in (3, 4):
        dims = draw(st.lists(NUMBERS, min_size=1, max_size=4))
        at = draw(st.integers(min_value=0, max_value=len(dims)))
        begin = draw(st.integers(min_value=0, max_value=8))
        return {
            "dtype": draw(ALLOWED_DTYPES),
            "shape": [*dims[:at], 0, *dims[at:]],
            "data_offsets": [begin, begin],
        }
    hostile_dtype = draw(st.integers(min_value=0, max_value=3)) == 0
    entry = {
        "dtype": draw(HOSTILE_DTYPES if hostile_dtype else ALLOWED_DTYPES),
        "shape": draw(SHAPES),
        "data_offsets": draw(OFFSETS),
    }
    if mode == 1:
        entry.pop(draw(st.sampled_from(sorted(entry))))
    elif mode == 2:
        entry[draw(st.sampled_from(["extra", "offsets", "dtype2", ""]))] = draw(NUMBERS)
    return entry


@given(
    st.sampled_from(wire.READ_VERSIONS),
    st.booleans(),
    st.dictionaries(st.sampled_from(["w", "0.v", "0.s", "zz", ""]), entries(), max_size=3),
    st.one_of(st.none(), NOT_INTEGERS, st.dictionaries(st.text(max_size=3), NOT_INTEGERS)),
    st.binary(max_size=24),
)
def test_hostile_safetensors_headers(version, keep_valid, hostile, metadata, data) -> None:
    """Drawn headers behind a valid outer header, with (`keep_valid`) or without the entry a
    valid frame has: rejected, or accepted only as a valid frame."""
    st_header: dict[str, Any] = {}
    if keep_valid:
        name, entry = _valid_entry(version)
        st_header[name] = entry
        data = bytes(8) + data
    st_header.update(hostile)
    if metadata is not None:
        st_header["__metadata__"] = metadata
    frame = _frame(version, st_header, data)
    outcome = _decode_both(frame)
    if "ok" in outcome:
        # accepted: safetensors itself reads the same single array from the payload
        _, _, hlen = _PREFIX.unpack_from(frame)
        reference = safetensors.numpy.load(frame[_PREFIX.size + hlen : -32])
        assert len(reference) == 1
        (array,) = reference.values()
        assert torch.equal(decode_update(frame, GLOBAL).tensors["w"], torch.from_numpy(array))
    fuzz_profiles.record("wire/safetensors_header", "accepted" if "ok" in outcome else "rejected")
