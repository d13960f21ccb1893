"""Fuzzing the update frame decoder (`wire.decode_frame`) with hypothesis.

Every case must end in `FrameRejected` or a valid frame equal to the input (re-encoding the
decoded frame gives the same bytes): never another exception. Random bytes, bit flips,
truncations and extensions of valid frames, and mutated header fields with the frame's hash
recomputed (so the mutation reaches the parser behind the hash).
Profiles: tests/support/fuzz_profiles.py.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import safetensors.torch
import torch
from hypothesis import given
from hypothesis import strategies as st
from support import fuzz_profiles

from fedclip_edge import wire
from fedclip_edge.wire import FrameRejected, decode_frame, encode_frame

_PREFIX = struct.Struct("<4sBI")

# Values a hostile header might carry in any field.
WEIRD = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([10**400, -(10**400), 2**63, 2**64, -1, 0, 2**31, 1 << 40]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from(["", "float64", "F32", "float16", "int8", "__metadata__", "x" * 300]),
    st.lists(st.integers(min_value=-3, max_value=2**40), max_size=4),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)
# Raw JSON tokens json.dumps will not write: non-finite floats, huge literals, deep nesting.
RAW_TOKENS = st.sampled_from(
    ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" + "0" * 400, "[" * 2000 + "]" * 2000]
)


@st.composite
def tensors(draw) -> dict[str, torch.Tensor]:
    names = draw(
        st.lists(
            st.text(alphabet="abcdefghij._0123", min_size=1, max_size=8),
            min_size=1,
            max_size=3,
            unique=True,
        )
    )
    out = {}
    for name in names:
        shape = draw(st.lists(st.integers(min_value=0, max_value=4), max_size=3))
        n = 1
        for d in shape:
            n *= d
        values = draw(
            st.lists(
                st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32),
                min_size=n,
                max_size=n,
            )
        )
        out[name] = torch.tensor(values, dtype=torch.float32).reshape(shape)
    return out


@st.composite
def frames(draw) -> tuple[bytes, dict[str, Any]]:
    ts = draw(tensors())
    meta = {
        "job": draw(st.text(min_size=1, max_size=10)),
        "round": draw(st.integers(min_value=0, max_value=2**40)),
        "client": draw(st.text(min_size=1, max_size=10)),
        "dtype": draw(st.sampled_from(wire.SUPPORTED_DTYPES)),
    }
    return encode_frame(ts, **meta), {"tensors": ts, **meta}


def _check(test: str, data: bytes, expected=None, canonical: bool = True) -> wire.Frame | None:
    """The property: FrameRejected (counted) or a frame that re-encodes to exactly `data`.

    `canonical=False` for mutations of the payload's own safetensors header, whose layout
    (spacing, key order) the decoder does not pin: there the accepted frame must equal what
    safetensors itself reads from the payload, and the outer header's fields."""
    try:
        frame = decode_frame(data, expected=expected)
    except FrameRejected as exc:
        assert exc.reason in wire.REASONS
        assert "\n" not in str(exc)
        fuzz_profiles.record(test, "rejected")
        return None
    if canonical:
        again = encode_frame(
            frame.tensors, job=frame.job, round=frame.round, client=frame.client, dtype=frame.dtype
        )
        assert again == bytes(data), "accepted a frame that is not what it decodes to"
    else:
        header, payload = _split(bytes(data))
        assert (frame.job, frame.round, frame.client, frame.dtype) == tuple(
            header[k] for k in ("job", "round", "client", "dtype")
        )
        reference = safetensors.torch.load(payload)
        assert set(reference) == set(frame.tensors)
        for name, t in reference.items():
            assert torch.equal(frame.tensors[name], t.float())
    fuzz_profiles.record(test, "accepted")
    return frame


def _split(frame: bytes) -> tuple[dict[str, Any], bytes]:
    _, _, hlen = _PREFIX.unpack_from(frame)
    header = json.loads(frame[_PREFIX.size : _PREFIX.size + hlen])
    return header, frame[_PREFIX.size + hlen : -32]


# The frames mutated here are encode_frame's, version 1 (dense): assembled as version 2 their
# (version-1) header would be refused at its keys and no mutation would reach the payload.
def _assemble(
    header_text: bytes, payload: bytes, version: int = wire.DENSE_FORMAT_VERSION
) -> bytes:
    body = _PREFIX.pack(wire.MAGIC, version, len(header_text)) + header_text + payload
    return body + hashlib.sha256(body).digest()


@given(st.binary(max_size=512))
def test_random_bytes(data: bytes) -> None:
    _check("wire/random_bytes", data)


@given(st.binary(max_size=256))
def test_random_bytes_behind_a_valid_prefix_and_hash(tail: bytes) -> None:
    """Random header and payload bytes, framed and hashed correctly: the parser must cope."""
    _check("wire/random_behind_prefix", _assemble(tail[: len(tail) // 2], tail[len(tail) // 2 :]))


@given(frames())
def test_valid_frames_round_trip(made) -> None:
    data, meta = made
    frame = _check("wire/valid", data, expected=wire.expected_shapes(meta["tensors"]))
    assert frame is not None
    assert (frame.job, frame.round, frame.client, frame.dtype) == (
        meta["job"],
        meta["round"],
        meta["client"],
        meta["dtype"],
    )
    for name, t in meta["tensors"].items():
        assert torch.equal(frame.tensors[name], t.to(getattr(torch, meta["dtype"])).float())


@given(frames(), st.lists(st.integers(min_value=0), min_size=1, max_size=8))
def test_bit_flips(made, positions) -> None:
    data, _ = made
    flipped = bytearray(data)
    for p in positions:
        bit = p % (len(flipped) * 8)
        flipped[bit // 8] ^= 1 << (bit % 8)
    _check("wire/bit_flips", bytes(flipped))


@given(frames(), st.integers(min_value=0), st.binary(max_size=64))
def test_truncations_and_extensions(made, cut, extra) -> None:
    data, _ = made
    _check("wire/truncated", data[: cut % len(data)])
    _check("wire/extended", data + extra)


HEADER_KEYS = ["job", "round", "client", "dtype", "tensors", "payload_len"]


@given(
    frames(),
    st.sampled_from(HEADER_KEYS + ["tensors.name", "tensors.shape", "tensors.extra", "extra"]),
    st.one_of(WEIRD, st.just("<delete>")),
    st.booleans(),
)
def test_mutated_header_fields_with_hash_recomputed(made, field, value, keep_len) -> None:
    data, _ = made
    header, payload = _split(data)
    if field.startswith("tensors."):
        entry = header["tensors"][0]
        key = field.split(".", 1)[1]
        if value == "<delete>":
            entry.pop(key, None)
        else:
            entry[key] = value
    elif value == "<delete>":
        header.pop(field, None)
    else:
        header[field] = value
    if keep_len and field != "payload_len":
        header["payload_len"] = len(payload)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    _check("wire/mutated_header", _assemble(text, payload))


@given(frames(), st.sampled_from(HEADER_KEYS), RAW_TOKENS)
def test_raw_json_tokens_in_header(made, field, token) -> None:
    data, _ = made
    header, payload = _split(data)
    header[field] = "__RAW__"
    text = json.dumps(header, sort_keys=True, separators=(",", ":"))
    _check("wire/raw_tokens", _assemble(text.replace('"__RAW__"', token).encode(), payload))


@given(
    frames(), st.integers(min_value=0, max_value=255), st.integers(min_value=0, max_value=2**32 - 1)
)
def test_versions_and_declared_lengths(made, version, hlen) -> None:
    data, _ = made
    body = bytearray(data[:-32])
    struct.pack_into("<4sBI", body, 0, wire.MAGIC, version, hlen)
    _check("wire/version_length", bytes(body) + hashlib.sha256(body).digest())


@given(
    frames(),
    st.sampled_from(["dtype", "shape", "data_offsets", "__metadata__", "<extra tensor>"]),
    WEIRD,
)
def test_mutated_safetensors_payload_with_hash_recomputed(made, field, value) -> None:
    """The payload's own (safetensors) header: dtypes, shapes, offsets that lie."""
    data, _ = made
    header, payload = _split(data)
    (n,) = struct.unpack_from("<Q", payload)
    st_header = json.loads(payload[8 : 8 + n])
    name = next(k for k in st_header if k != "__metadata__")
    if field == "__metadata__":
        st_header["__metadata__"] = value
    elif field == "<extra tensor>":
        st_header["zz"] = {"dtype": "F32", "shape": value, "data_offsets": [0, 0]}
    else:
        st_header[name][field] = value
    st_text = json.dumps(st_header).encode()
    new_payload = struct.pack("<Q", len(st_text)) + st_text + payload[8 + n :]
    header["payload_len"] = len(new_payload)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    _check("wire/mutated_payload", _assemble(text, new_payload), canonical=False)


@given(frames(), st.data())
def test_payload_data_offsets_out_of_range_or_overlapping(made, data) -> None:
    """Offsets of one or two tensors redrawn anywhere around the data (overlapping, reversed,
    past the end, negative, leaving gaps): rejected, or read exactly as safetensors reads them
    when they still tile the data."""
    frame, _ = made
    header, payload = _split(frame)
    (n,) = struct.unpack_from("<Q", payload)
    st_header = json.loads(payload[8 : 8 + n])
    size = len(payload) - 8 - n
    names = sorted(k for k in st_header if k != "__metadata__")
    for name in data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=2)):
        offset = st.integers(min_value=-4, max_value=size + 8)
        st_header[name]["data_offsets"] = [data.draw(offset), data.draw(offset)]
    if data.draw(st.booleans()) and len(names) > 1:  # or swap two tensors' spans
        a, b = names[:2]
        st_header[a]["data_offsets"], st_header[b]["data_offsets"] = (
            st_header[b]["data_offsets"], st_header[a]["data_offsets"])
    st_text = json.dumps(st_header).encode()
    new_payload = struct.pack("<Q", len(st_text)) + st_text + payload[8 + n :]
    header["payload_len"] = len(new_payload)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    _check("wire/payload_offsets", _assemble(text, new_payload), canonical=False)


@given(st.integers(min_value=0, max_value=2**40))
def test_huge_declared_payload_is_not_allocated(declared) -> None:
    """A header that declares a huge payload (or huge shapes) is refused before allocation."""
    header = {
        "job": "j",
        "round": 0,
        "client": "c",
        "dtype": "float32",
        "tensors": [{"name": "w", "shape": [declared, declared]}],
        "payload_len": declared,
    }
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    _check("wire/huge_declared", _assemble(text, b"\0" * 16))
