"""The update wire format: round trips, exact sizes, and one rejection test per reason.

Bad frames are built by hand with `assemble`, which recomputes the trailing sha256, so each test
reaches the one check it is about instead of tripping over the hash.
"""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import save as st_save

from fedclip_edge.errors import FedClipError, FrameError
from fedclip_edge.wire import (
    DEFAULT_MAX_FRAME_BYTES,
    FIXED_OVERHEAD,
    MAGIC,
    MAX_HEADER_BYTES,
    REASONS,
    Frame,
    FrameRejected,
    decode_frame,
    encode_frame,
    expected_shapes,
)
from fedclip_edge.wire import DENSE_FORMAT_VERSION as FORMAT_VERSION

META = {"job": "job-1", "round": 3, "client": "dev-a"}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}

# 4 + 512*512 + 512 + 512*512 + 512 = 525,312 parameters: the ViT-B/32 adapter (dim 512).
ADAPTER_SHAPES = {
    "fea_attn.0.weight": (512, 512),
    "fea_attn.0.bias": (512,),
    "fea_attn.2.weight": (512, 512),
    "fea_attn.2.bias": (512,),
}
ADAPTER_PARAMS = 525_312


def small() -> dict[str, torch.Tensor]:
    """Two tiny tensors whose values are exact in float16 too."""
    return {
        "w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        "b": torch.tensor([0.5, -0.25]),
    }


def parts(
    tensors: dict[str, torch.Tensor] | None = None, dtype: str = "float32"
) -> tuple[dict, bytes]:
    """A valid header dict and safetensors payload, written independently of `encode_frame`."""
    tensors = small() if tensors is None else tensors
    ordered = {name: tensors[name].to(TORCH_DTYPES[dtype]) for name in sorted(tensors)}
    payload = st_save(ordered)
    header = {
        **META,
        "dtype": dtype,
        "tensors": [{"name": n, "shape": list(t.shape)} for n, t in ordered.items()],
        "payload_len": len(payload),
    }
    return header, payload


def assemble(
    header: dict | bytes,
    payload: bytes,
    *,
    magic: bytes = MAGIC,
    version: int = FORMAT_VERSION,
    header_len: int | None = None,
) -> bytes:
    """magic | version | H | header | payload | sha256(all before): the layout, by hand."""
    if isinstance(header, dict):
        raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    else:
        raw = header
    length = len(raw) if header_len is None else header_len
    body = magic + bytes([version]) + struct.pack("<I", length) + raw + payload
    return body + hashlib.sha256(body).digest()


def rejected(data: bytes, reason: str, **kwargs) -> str:
    """Decode `data`, assert it is rejected for `reason`, and return the message."""
    with pytest.raises(FrameRejected) as info:
        decode_frame(data, **kwargs)
    assert info.value.reason == reason, str(info.value)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- round trips and layout ------------------------------------------------------------------


def test_round_trip_float32_is_exact() -> None:
    frame = decode_frame(encode_frame(small(), **META))
    assert isinstance(frame, Frame)
    assert (frame.job, frame.round, frame.client, frame.dtype) == ("job-1", 3, "dev-a", "float32")
    assert list(frame.tensors) == ["b", "w"]
    for name, tensor in small().items():
        assert frame.tensors[name].dtype == torch.float32
        assert torch.equal(frame.tensors[name], tensor)


def test_hand_built_frame_matches_encoder_byte_for_byte() -> None:
    # Pins the layout: the test helper and the encoder agree on every byte.
    assert assemble(*parts()) == encode_frame(small(), **META)


def test_round_trip_float16_within_tolerance_and_half_payload() -> None:
    values = {"w": torch.tensor([[0.1, -0.2, 0.3], [1.7, -2.9, 100.0]])}
    frame = decode_frame(encode_frame(values, dtype="float16", **META))
    assert frame.dtype == "float16"
    assert frame.tensors["w"].dtype == torch.float32
    # float16 keeps 11 significant bits: relative error at most 2**-11.
    torch.testing.assert_close(frame.tensors["w"], values["w"], rtol=2**-11, atol=0.0)

    # Both frames carry the same safetensors overhead ("F16"/"F32" are the same length), so
    # their payloads differ by exactly the 2 bytes per value that float16 saves.
    big = {"w": torch.randn(64, 64)}
    payload32 = header_of(encode_frame(big, **META))["payload_len"]
    payload16 = header_of(encode_frame(big, dtype="float16", **META))["payload_len"]
    assert payload32 - payload16 == 64 * 64 * 2
    assert payload16 < 0.51 * payload32


def header_of(frame: bytes) -> dict:
    """The JSON header of a frame, read by hand: bytes 5..9 hold its length."""
    (length,) = struct.unpack_from("<I", frame, 5)
    return json.loads(frame[9 : 9 + length])


def test_encoding_is_deterministic() -> None:
    forward = small()
    backward = dict(reversed(list(small().items())))
    first = encode_frame(forward, **META)
    assert encode_frame(forward, **META) == first
    assert encode_frame(backward, **META) == first  # insertion order does not matter


def test_encoder_copies_non_contiguous_and_shared_tensors() -> None:
    base = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    tensors = {"t": base.t(), "tied": base}  # a transposed view sharing storage with `tied`
    frame = decode_frame(encode_frame(tensors, **META))
    assert torch.equal(frame.tensors["t"], base.t())
    assert torch.equal(frame.tensors["tied"], base)


def test_expected_shapes_from_template() -> None:
    assert expected_shapes(small()) == {"w": (2, 2), "b": (2,)}
    frame = decode_frame(encode_frame(small(), **META), expected=expected_shapes(small()))
    assert set(frame.tensors) == {"w", "b"}


@pytest.mark.parametrize(("dtype", "itemsize"), [("float32", 4), ("float16", 2)])
def test_adapter_frame_size(dtype: str, itemsize: int) -> None:
    state = {name: torch.randn(shape) for name, shape in ADAPTER_SHAPES.items()}
    frame = encode_frame(state, dtype=dtype, **META)
    overhead = len(frame) - ADAPTER_PARAMS * itemsize
    assert 0 < overhead < 2048
    decoded = decode_frame(frame, expected=ADAPTER_SHAPES)
    assert expected_shapes(decoded.tensors) == ADAPTER_SHAPES


def test_frame_rejected_is_a_frame_error() -> None:
    err = FrameRejected("hash", "frame hash mismatch")
    assert isinstance(err, FrameError) and isinstance(err, FedClipError)
    assert err.exit_code == 5 and err.reason == "hash"
    with pytest.raises(ValueError):
        FrameRejected("bogus", "no such reason")


# --- the encoder refuses what a receiver would refuse ----------------------------------------


def test_encode_refuses_nan() -> None:
    with pytest.raises(FrameRejected) as info:
        encode_frame({"w": torch.tensor([1.0, float("nan")])}, **META)
    assert info.value.reason == "nonfinite" and "'w'" in str(info.value)


def test_encode_refuses_float16_overflow() -> None:
    with pytest.raises(FrameRejected) as info:
        encode_frame({"w": torch.tensor([70000.0])}, dtype="float16", **META)
    assert info.value.reason == "nonfinite"


@pytest.mark.parametrize(
    ("tensors", "kwargs", "error"),
    [
        ({"w": torch.tensor([1, 2])}, {}, TypeError),
        ({"w": torch.ones(2)}, {"dtype": "bfloat16"}, ValueError),
        ({}, {}, ValueError),
        ({"w": torch.ones(2)}, {"job": ""}, ValueError),
        ({"w": torch.ones(2)}, {"client": ""}, ValueError),
        ({"w": torch.ones(2)}, {"round": -1}, ValueError),
        ({"__metadata__": torch.ones(2)}, {}, ValueError),
    ],
)
def test_encode_refuses_bad_arguments(tensors, kwargs, error) -> None:
    with pytest.raises(error):
        encode_frame(tensors, **{**META, **kwargs})


# --- one test per rejection reason -----------------------------------------------------------


def test_reject_truncated() -> None:
    frame = encode_frame(small(), **META)
    rejected(frame[: FIXED_OVERHEAD - 1], "truncated")
    rejected(b"", "truncated")


def test_reject_payload_shorter_than_declared() -> None:
    header, payload = parts()
    header["payload_len"] += 8
    message = rejected(assemble(header, payload), "truncated")
    assert str(len(payload)) in message


def test_reject_magic() -> None:
    header, payload = parts()
    message = rejected(assemble(header, payload, magic=b"XCLP"), "magic")
    assert "XCLP" in message


def test_reject_version() -> None:
    header, payload = parts()
    message = rejected(assemble(header, payload, version=3), "version")
    assert "3" in message


def test_reject_oversize_before_anything_else() -> None:
    frame = encode_frame(small(), **META)
    rejected(frame, "oversize", max_bytes=len(frame) - 1)
    decode_frame(frame, max_bytes=len(frame))  # the limit is inclusive
    # Garbage (no magic, no hash) is still reported as oversize: size is checked first.
    rejected(b"\x00" * 1000, "oversize", max_bytes=999)
    assert DEFAULT_MAX_FRAME_BYTES == 64 * 1024 * 1024


def test_reject_hash_mismatch() -> None:
    frame = bytearray(encode_frame(small(), **META))
    frame[-40] ^= 0x01  # a payload byte
    message = rejected(bytes(frame), "hash")
    assert "hash mismatch" in message


def test_reject_header_not_json() -> None:
    _, payload = parts()
    rejected(assemble(b"{not json", payload), "header")
    rejected(assemble(b"\xff\xfe", payload), "header")  # not UTF-8
    rejected(assemble(b"[1, 2]", payload), "header")  # JSON, not an object


@pytest.mark.parametrize(
    ("change", "mentions"),
    [
        ({"round": "3"}, "round"),
        ({"round": True}, "round"),
        ({"job": 7}, "job"),
        ({"payload_len": 1.5}, "payload_len"),
        ({"tensors": []}, "tensors"),
        ({"tensors": [{"name": "w"}]}, "entry 0"),
        ({"tensors": [{"name": "w", "shape": [2, -2]}]}, "'w'"),
        ({"extra": 1}, "extra"),
    ],
)
def test_reject_header_wrong_types_or_keys(change: dict, mentions: str) -> None:
    header, payload = parts()
    header.update(change)
    assert mentions in rejected(assemble(header, payload), "header")


def test_reject_header_missing_key() -> None:
    header, payload = parts()
    del header["client"]
    assert "client" in rejected(assemble(header, payload), "header")


def test_reject_header_duplicate_json_key() -> None:
    header, payload = parts()
    raw = json.dumps(header)[:-1] + ', "round": 4}'
    assert "round" in rejected(assemble(raw.encode(), payload), "header")


def test_reject_header_length_beyond_data() -> None:
    header, payload = parts()
    frame = assemble(header, payload, header_len=10_000)
    assert "10000" in rejected(frame, "header")
    frame = assemble(header, payload, header_len=MAX_HEADER_BYTES + 1)
    rejected(frame, "header")


def test_reject_payload_longer_than_declared() -> None:
    header, payload = parts()
    header["payload_len"] -= 8
    rejected(assemble(header, payload), "header")


def test_reject_payload_not_safetensors() -> None:
    header, _ = parts()
    garbage = b"\x00" * 16
    header["payload_len"] = len(garbage)
    assert "safetensors" in rejected(assemble(header, garbage), "header")


def test_reject_payload_names_differ_from_header() -> None:
    header, payload = parts()
    header["tensors"][0]["name"] = "bias"  # header says "bias", payload has "b"
    message = rejected(assemble(header, payload), "header")
    assert "'bias'" in message and "'b'" in message


def test_reject_names_differ_from_expected() -> None:
    frame = encode_frame(small(), **META)
    message = rejected(frame, "names", expected={"w": (2, 2), "c": (2,)})
    assert "missing ['c']" in message and "unexpected ['b']" in message


def test_reject_shape_differs_from_expected() -> None:
    frame = encode_frame(small(), **META)
    message = rejected(frame, "shape", expected={"w": (2, 3), "b": (2,)})
    assert "'w'" in message and "[2, 2]" in message and "[2, 3]" in message


def test_reject_shape_differs_from_header() -> None:
    header, payload = parts()
    header["tensors"][1]["shape"] = [4]  # "w" is [2, 2] in the payload
    message = rejected(assemble(header, payload), "shape")
    assert "'w'" in message


def test_reject_unsupported_dtype() -> None:
    header, payload = parts()
    header["dtype"] = "bfloat16"
    assert "bfloat16" in rejected(assemble(header, payload), "dtype")


def test_reject_payload_dtype_differs_from_header() -> None:
    header, payload = parts(dtype="float16")
    header["dtype"] = "float32"
    message = rejected(assemble(header, payload), "dtype")
    assert "'b'" in message and "F16" in message


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_reject_nonfinite(dtype: str, bad: float) -> None:
    tensors = small()
    tensors["w"][1, 0] = bad
    message = rejected(assemble(*parts(tensors, dtype)), "nonfinite")
    assert "'w'" in message


@pytest.mark.parametrize(
    ("change", "mentions"),
    [({"round": -1}, "-1"), ({"job": ""}, "job"), ({"client": ""}, "client")],
)
def test_reject_meta(change: dict, mentions: str) -> None:
    header, payload = parts()
    header.update(change)
    assert mentions in rejected(assemble(header, payload), "meta")


def test_every_reason_is_tested() -> None:
    # Keeps this file honest when a reason is added to the module.
    tested = {
        "truncated", "magic", "version", "oversize", "header", "hash",
        "names", "shape", "dtype", "nonfinite", "meta",
    }  # fmt: skip
    codec_frames = {"codec", "k", "indices", "scales"}  # tested in tests/unit/core/test_codecs.py
    assert REASONS == tested | codec_frames


# --- the payload's safetensors layout, read in place -------------------------------------------


def st_payload(entries: dict, data: bytes, pad: bytes = b"") -> bytes:
    """A safetensors payload by hand: u64 LE header length | JSON header | data."""
    text = json.dumps(entries).encode() + pad
    return struct.pack("<Q", len(text)) + text + data


def frame_with(entries: dict, data: bytes, **kw) -> bytes:
    payload = st_payload(entries, data, **kw)
    header = {**META, "dtype": "float32",
              "tensors": [{"name": n, "shape": e["shape"]} for n, e in sorted(entries.items())
                          if isinstance(e, dict) and "shape" in e],
              "payload_len": len(payload)}
    return assemble(header, payload)


F32 = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)


def test_hand_written_payload_with_padding_and_metadata_is_read() -> None:
    entries = {"__metadata__": {"who": "test"},
               "a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
               "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    frame = decode_frame(frame_with(entries, F32, pad=b"   "))
    assert frame.tensors["a"].tolist() == [3.0, 4.0] and frame.tensors["b"].tolist() == [1.0, 2.0]


@pytest.mark.parametrize(
    ("offsets", "mentions"),
    [
        ([[0, 8], [4, 12]], "overlaps"),       # b starts inside a (and the data has 16 bytes)
        ([[0, 8], [0, 8]], "overlaps"),        # both on the same bytes
        ([[0, 8], [8, 24]], "within"),         # runs past the end of the data
        ([[8, 0], [8, 16]], "within"),         # reversed
        ([[-8, 0], [8, 16]], "within"),        # negative
        ([[0, 4], [8, 16]], "needs 8"),        # a's 4 bytes cannot hold its shape [2]
        ([[0, 8], [12, 20]], "within"),        # runs past, again with a gap
    ],
)
def test_reject_payload_offsets_out_of_range_overlapping_or_lying(
    offsets: list, mentions: str
) -> None:
    entries = {"a": {"dtype": "F32", "shape": [2], "data_offsets": offsets[0]},
               "b": {"dtype": "F32", "shape": [2], "data_offsets": offsets[1]}}
    assert mentions in rejected(frame_with(entries, F32), "header")


def test_reject_payload_gaps_and_unclaimed_bytes() -> None:
    gap = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
           "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}
    assert "unused" in rejected(frame_with(gap, F32), "header")
    tail = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}
    assert "after the last tensor" in rejected(frame_with(tail, F32), "header")


@pytest.mark.parametrize(
    ("entries", "reason", "mentions"),
    [
        ({"a": {"dtype": "F64", "shape": [2], "data_offsets": [0, 16]}}, "dtype", "F64"),
        ({"a": {"dtype": "I32", "shape": [4], "data_offsets": [0, 16]}}, "dtype", "I32"),
        ({"a": {"dtype": 1, "shape": [4], "data_offsets": [0, 16]}}, "header", "string"),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16], "x": 1}}, "header",
         "{dtype, shape, data_offsets}"),
        ({"a": {"dtype": "F32", "shape": [4.0], "data_offsets": [0, 16]}}, "header", "shape"),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, True]}}, "header", "within"),
        # 69 dimensions holding 4 values: numpy cannot even reshape that (a ValueError before)
        ({"a": {"dtype": "F32", "shape": [1] * 68 + [4], "data_offsets": [0, 16]}}, "header",
         "69 dimensions"),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
          "__metadata__": {"k": 1}}, "header", "__metadata__"),
    ],
)
def test_reject_payload_entries(entries: dict, reason: str, mentions: str) -> None:
    assert mentions in rejected(frame_with(entries, F32), reason)


def test_reject_payload_header_length_bounds() -> None:
    header, payload = parts()
    for n in (MAX_HEADER_BYTES + 1, len(payload), 2**64 - 1):
        bad = struct.pack("<Q", n) + payload[8:]
        assert "header length" in rejected(assemble({**header, "payload_len": len(bad)}, bad),
                                           "header")


def test_reject_payload_duplicate_tensor_key() -> None:
    text = (b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},'
            b'"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}')
    payload = struct.pack("<Q", len(text)) + text + F32
    header = {**META, "dtype": "float32", "tensors": [{"name": "a", "shape": [4]}],
              "payload_len": len(payload)}
    assert "duplicate" in rejected(assemble(header, payload), "header")


def test_float32_tensors_are_views_of_immutable_bytes_only() -> None:
    import numpy as np

    from fedclip_edge.strategy import RunningMean

    data = encode_frame(small(), **META)
    frame = decode_frame(data)
    w = frame.tensors["w"].numpy()
    assert np.shares_memory(w, np.frombuffer(data, dtype=np.uint8))  # no copy
    # a writable buffer is copied once: writing to it later changes nothing handed out
    buf = bytearray(data)
    from_buf = decode_frame(buf).tensors
    ro = decode_frame(memoryview(buf).toreadonly()).tensors  # read-only view, writable memory
    buf[:] = bytes(len(buf))
    for got in (from_buf, ro):
        assert torch.equal(got["w"], small()["w"]) and torch.equal(got["b"], small()["b"])
    # a view of bytes (as an envelope hands its frame over) is viewed in place
    outer = b"xx" + data
    inner = decode_frame(memoryview(outer)[2:]).tensors["w"].numpy()
    assert np.shares_memory(inner, np.frombuffer(outer, dtype=np.uint8))
    # aggregating reads the views, never writes them
    before = hashlib.sha256(data).digest()
    acc = RunningMean("samples")
    acc.add(frame.tensors, 3)
    acc.add(decode_frame(data).tensors, 1)
    assert hashlib.sha256(data).digest() == before
    assert torch.equal(acc.result()["w"], small()["w"])
