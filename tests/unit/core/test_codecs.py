"""Update codecs and their version-2 frames: hand-worked tiny tensors, round trips, error
feedback, and one rejection test per hostile case.

Hostile frames are built by hand with `assemble_v2`, which recomputes the trailing sha256, so each
test reaches the check it is about instead of tripping over the hash.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct

import numpy as np
import pytest
import safetensors.numpy
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedclip_edge import codecs
from fedclip_edge.adapter import AttentionAdapter
from fedclip_edge.codecs import (
    CODECS,
    DELTA_CODECS,
    ErrorFeedback,
    decode_tensor,
    encode_tensor,
    topk_count,
)
from fedclip_edge.config import SimulationConfig, TrainConfig
from fedclip_edge.errors import CacheError, ConfigError
from fedclip_edge.features import DomainFeatures, FeatureSet
from fedclip_edge.simulate import simulate
from fedclip_edge.strategy import RunningMean
from fedclip_edge.wire import (
    DENSE_FORMAT_VERSION,
    FORMAT_VERSION,
    MAGIC,
    MAX_DECODED_ELEMENTS,
    REASONS,
    FrameRejected,
    decode_frame,
    decode_update,
    encode_frame,
    encode_update,
)

META = {"job": "job-1", "round": 3, "client": "dev-a"}


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def adapter_states(dim: int = 8, seed: int = 0, step: float = 0.01) -> tuple[dict, dict]:
    """(global, local) adapter states a few small steps apart, like one round of training."""
    torch.manual_seed(seed)
    g = AttentionAdapter(dim).state_dict()
    local = {k: v + step * torch.randn_like(v) for k, v in g.items()}
    return g, local


def assemble_v2(header: dict, arrays: dict[str, np.ndarray], *, version: int = FORMAT_VERSION):
    """magic | version | H | header | payload | sha256: a version-2 frame, by hand."""
    payload = safetensors.numpy.save(arrays)
    header = {**header, "payload_len": len(payload)}
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    body = MAGIC + bytes([version]) + struct.pack("<I", len(raw)) + raw + payload
    return body + hashlib.sha256(body).digest()


def topk_parts(**change) -> tuple[dict, dict, dict]:
    """A valid hand-made topk frame of one 2x3 tensor (k=2), and the global it applies to."""
    header = {**META, "codec": "topk", "tensors": [{"name": "w", "shape": [2, 3], "k": 2}]}
    arrays = {
        "0.i": np.array([1, 4], dtype="<i4"),
        "0.v": np.array([0.5, -1.0], dtype="<f2"),
    }
    header.update(change)
    return header, arrays, {"w": torch.zeros(2, 3)}


def int8_parts() -> tuple[dict, dict, dict]:
    """A valid hand-made int8 frame of one 2x2 tensor, and the global it applies to."""
    header = {**META, "codec": "int8", "tensors": [{"name": "w", "shape": [2, 2]}]}
    arrays = {
        "0.v": np.array([127, -50, 0, 0], dtype="i1"),
        "0.s": np.array([0.01, 1.0], dtype="<f4"),
    }
    return header, arrays, {"w": torch.ones(2, 2)}


def rejected(data: bytes, reason: str, global_state: dict | None = None) -> str:
    """Decode `data` (with decode_update when a global is given), assert the reason."""
    with pytest.raises(FrameRejected) as info:
        if global_state is None:
            decode_frame(data)
        else:
            decode_update(data, global_state)
    assert info.value.reason == reason, str(info.value)
    assert "\n" not in str(info.value)
    return str(info.value)


# --- hand-worked codecs ---------------------------------------------------------------------


def test_fp32_is_exact_and_fp16_rounds_to_half_precision() -> None:
    x = t(1.5, -2.0, 1 / 3)
    assert torch.equal(decode_tensor("fp32", encode_tensor("fp32", x)), x)
    half = decode_tensor("fp16", encode_tensor("fp16", x))
    assert half.tolist() == [1.5, -2.0, 0.333251953125]  # 1/3 in fp16


def test_delta_fp16_frame_rebuilds_the_full_state_from_the_global() -> None:
    g = {"w": t(1.0, 2.0)}
    local = {"w": t(1.5, 2.25)}  # delta 0.5, 0.25: exact in fp16
    frame = decode_update(encode_update(local, g, codec="delta-fp16", **META), g)
    assert frame.codec == "delta-fp16" and frame.dtype == "float16"
    assert frame.tensors["w"].tolist() == [1.5, 2.25]


def test_int8_per_row_symmetric_scales_by_hand() -> None:
    delta = torch.tensor([[1.27, -0.5], [0.0, 0.0], [0.2, -0.6]])
    enc = encode_tensor("int8", delta)
    # row peak / 127 per row; an all-zero row gets scale 1 (every scale > 0)
    np.testing.assert_allclose(enc.arrays["s"], [0.01, 1.0, 0.6 / 127], rtol=1e-6)
    assert enc.arrays["v"].tolist() == [127, -50, 0, 0, 42, -127]  # 0.2 / (0.6/127) = 42.33
    back = decode_tensor("int8", enc)
    np.testing.assert_allclose(back, [[1.27, -0.5], [0, 0], [42 * 0.6 / 127, -0.6]], rtol=1e-6)


def test_int8_bias_has_one_scale_and_error_at_most_half_a_step() -> None:
    bias = torch.linspace(-1, 2, 50)
    enc = encode_tensor("int8", bias)
    assert enc.arrays["s"].shape == (1,)
    step = float(enc.arrays["s"][0])
    assert step == pytest.approx(2.0 / 127)
    assert float((decode_tensor("int8", enc) - bias).abs().max()) <= step / 2 + 1e-7


def test_topk_keeps_the_largest_magnitudes_by_hand() -> None:
    delta = t(0.1, -3.0, 0.5, 2.0, 0.0, -0.2, 0.05, 1.0, 0.3, 0.4)
    enc = encode_tensor("topk", delta, topk_fraction=0.2)
    assert enc.k == 2
    assert enc.arrays["i"].tolist() == [1, 3]
    assert enc.arrays["v"].tolist() == [-3.0, 2.0]
    assert decode_tensor("topk", enc).tolist() == [0, -3.0, 0, 2.0, 0, 0, 0, 0, 0, 0]


def test_topk_int8_by_hand() -> None:
    enc = encode_tensor("topk-int8", t(0.0, 1.27, -0.5, 0.01), topk_fraction=0.5)
    assert enc.arrays["i"].tolist() == [1, 2]
    assert enc.arrays["v"].tolist() == [127, -50]
    np.testing.assert_allclose(enc.arrays["s"], [0.01], rtol=1e-6)
    np.testing.assert_allclose(decode_tensor("topk-int8", enc), [0, 1.27, -0.5, 0], rtol=1e-6)


def test_fp16_conversions_match_numpy_bit_for_bit_including_subnormals() -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(70_000) * 10.0 ** rng.uniform(-9, 5, 70_000)).astype(np.float32)
    x = np.concatenate([x, np.array([0.0, -0.0, 65504, 65520, 6e-8, -3e-5], np.float32)])
    with np.errstate(over="ignore"):
        want = x.astype(np.float16)
    assert np.array_equal(codecs.to_fp16(x).view(np.uint16), want.view(np.uint16))
    assert np.array_equal(codecs.to_fp32(want), want.astype(np.float32))
    assert codecs.to_fp16(np.zeros((2, 0), np.float32)).shape == (2, 0)


def test_topk_count() -> None:
    assert topk_count(10, 0.2) == 2
    assert topk_count(3, 0.01) == 1  # at least one entry of a non-empty tensor
    assert topk_count(0, 0.5) == 0
    assert topk_count(33024, 0.01) == 331
    assert topk_count(100, 1.0) == 100
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="fraction"):
            topk_count(10, bad)


def test_unknown_codec_names_the_choices() -> None:
    with pytest.raises(ValueError, match="topk-int8"):
        encode_tensor("zip", t(1.0))


# --- round trips through frames -------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
def test_round_trip_every_codec(codec: str) -> None:
    g, local = adapter_states()
    data = encode_update(local, g, codec=codec, **META)
    assert data == encode_update(local, g, codec=codec, **META)  # deterministic bytes
    frame = decode_update(data, g)
    assert (frame.job, frame.round, frame.client, frame.codec) == ("job-1", 3, "dev-a", codec)
    assert data[4] == FORMAT_VERSION
    for name, want in local.items():
        got = frame.tensors[name]
        assert got.dtype == torch.float32 and got.shape == want.shape
        err = float((got - want).abs().max())
        if codec == "fp32":
            assert err == 0.0
        elif codec in ("fp16", "delta-fp16"):
            assert err < 2e-3
        elif codec == "int8":
            assert err <= float((want - g[name]).abs().max()) / 127 + 1e-6
        else:  # sparse: every entry is the global's or moved toward the local one
            assert bool(((got - g[name]).abs() <= (want - g[name]).abs() + 1e-2).all())


def test_sparse_frames_are_about_the_fraction_of_fp32() -> None:
    g, local = adapter_states(dim=256)
    fp32 = len(encode_update(local, g, codec="fp32", **META))
    topk = len(encode_update(local, g, codec="topk", topk_fraction=0.01, **META))
    topk8 = len(encode_update(local, g, codec="topk-int8", topk_fraction=0.01, **META))
    int8 = len(encode_update(local, g, codec="int8", **META))
    # 1% of entries at 6 (topk) or 5 (topk-int8) bytes vs 4 bytes for all: below 2% and 1.6%
    assert topk8 < topk < 0.02 * fp32
    assert 0.24 * fp32 < int8 < 0.27 * fp32


def test_dense_fp32_and_fp16_frames_need_no_global_and_decode_frame_reads_them() -> None:
    _, local = adapter_states()
    for codec in ("fp32", "fp16"):
        frame = decode_frame(encode_update(local, None, codec=codec, **META))
        assert frame.codec == codec and set(frame.tensors) == set(local)


def test_version_1_frames_still_decode_through_decode_update() -> None:
    g, local = adapter_states()
    old = encode_frame(local, **META, dtype="float16")
    assert old[4] == DENSE_FORMAT_VERSION
    frame = decode_update(old, g)
    assert (frame.codec, frame.dtype) == ("fp16", "float16")
    assert (
        float((frame.tensors["fea_attn.0.weight"] - local["fea_attn.0.weight"]).abs().max()) < 1e-3
    )


def test_delta_codec_needs_the_global_on_both_sides() -> None:
    g, local = adapter_states()
    with pytest.raises(ValueError, match="global_state"):
        encode_update(local, None, codec="topk", **META)
    data = encode_update(local, g, codec="topk", **META)
    assert "decode_update" in rejected(data, "codec")


# --- error feedback ---------------------------------------------------------------------------


def test_error_feedback_by_hand() -> None:
    g = {"w": torch.zeros(10)}
    fb = ErrorFeedback()
    delta = t(0.1, -3.0, 0.5, 2.0, 0.0, -0.2, 0.05, 1.0, 0.3, 0.4)
    first = decode_update(
        encode_update({"w": delta}, g, codec="topk", topk_fraction=0.2, feedback=fb, **META), g
    )
    assert first.tensors["w"].tolist() == [0, -3.0, 0, 2.0, 0, 0, 0, 0, 0, 0]
    np.testing.assert_allclose(fb.residual["w"], [0.1, 0, 0.5, 0, 0, -0.2, 0.05, 1.0, 0.3, 0.4])
    # the next round's delta is zero: what is sent is the largest of what was held back
    second = decode_update(
        encode_update(g, g, codec="topk", topk_fraction=0.2, feedback=fb, **META), g
    )
    assert second.tensors["w"].tolist() == [0, 0, 0.5, 0, 0, 0, 0, 1.0, 0, 0]


@pytest.mark.parametrize("codec", sorted(DELTA_CODECS))
def test_error_feedback_loses_nothing_over_rounds(codec: str) -> None:
    """sum(sent) + residual == sum(true deltas): what is not sent now is sent later."""
    g, _ = adapter_states()
    fb = ErrorFeedback()
    true_sum = {k: torch.zeros_like(v) for k, v in g.items()}
    sent_sum = {k: torch.zeros_like(v) for k, v in g.items()}
    for rnd in range(6):
        _, local = adapter_states(seed=100 + rnd)
        local = {k: g[k] + (local[k] - adapter_states(seed=100 + rnd)[0][k]) for k in g}
        data = encode_update(local, g, codec=codec, feedback=fb, topk_fraction=0.05, **META)
        decoded = decode_update(data, g).tensors
        for k in g:
            true_sum[k] += local[k] - g[k]
            sent_sum[k] += decoded[k] - g[k]
    for k in g:
        torch.testing.assert_close(sent_sum[k] + fb.residual[k], true_sum[k], atol=1e-5, rtol=0)
    if codec != "delta-fp16":
        assert fb.norm() > 0  # lossy codecs hold something back


def test_error_feedback_save_load_round_trip_and_missing_file(tmp_path) -> None:
    fb = ErrorFeedback({"a": t(1.0, -2.0), "b": torch.ones(2, 2)})
    path = tmp_path / "state" / "residual.safetensors"
    fb.save(path)
    back = ErrorFeedback.load(path)
    assert set(back.residual) == {"a", "b"}
    assert torch.equal(back.residual["a"], fb.residual["a"])
    assert not list(path.parent.glob(".*.tmp"))
    assert ErrorFeedback.load(tmp_path / "none.safetensors").residual == {}


def test_error_feedback_save_is_atomic(tmp_path, monkeypatch) -> None:
    path = tmp_path / "residual.safetensors"
    ErrorFeedback({"a": t(1.0)}).save(path)

    def crash(*args, **kwargs):
        raise OSError("disk died at the rename")

    monkeypatch.setattr(codecs.os, "replace", crash)
    with pytest.raises(OSError):
        ErrorFeedback({"a": t(9.0)}).save(path)
    assert ErrorFeedback.load(path).residual["a"].tolist() == [1.0]  # the old file, whole


def test_error_feedback_corrupt_file_is_one_clear_error(tmp_path) -> None:
    path = tmp_path / "residual.safetensors"
    path.write_bytes(b"not safetensors at all")
    with pytest.raises(CacheError, match="unreadable"):
        ErrorFeedback.load(path)


def test_error_feedback_refuses_a_residual_of_another_model() -> None:
    fb = ErrorFeedback({"w": torch.zeros(3)})
    with pytest.raises(CacheError, match="shape"):
        fb.corrected({"w": torch.zeros(4)})


# --- hostile codec frames ---------------------------------------------------------------------


def test_hand_made_frames_are_valid() -> None:
    header, arrays, g = topk_parts()
    frame = decode_update(assemble_v2(header, arrays), g)
    assert frame.tensors["w"].tolist() == [[0, 0.5, 0], [0, -1.0, 0]]
    header, arrays, g = int8_parts()
    frame = decode_update(assemble_v2(header, arrays), g)
    np.testing.assert_allclose(frame.tensors["w"], [[2.27, 0.5], [1.0, 1.0]], rtol=1e-6)


def test_reject_truncated_index_array() -> None:
    header, arrays, g = topk_parts()
    arrays["0.i"] = arrays["0.i"][:1]
    assert "indices" in rejected(assemble_v2(header, arrays), "indices", g)


@pytest.mark.parametrize("bad", [[1, 6], [-1, 4], [4, 1], [3, 3]])
def test_reject_indices_out_of_range_or_repeated(bad: list[int]) -> None:
    header, arrays, g = topk_parts()
    arrays["0.i"] = np.array(bad, dtype="<i4")
    rejected(assemble_v2(header, arrays), "indices", g)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), 0.0, -0.5])
def test_reject_bad_scales(scale: float) -> None:
    header, arrays, g = int8_parts()
    arrays["0.s"] = np.array([0.01, scale], dtype="<f4")
    assert "scale" in rejected(assemble_v2(header, arrays), "scales", g)


def test_reject_wrong_scale_count() -> None:
    header, arrays, g = int8_parts()
    arrays["0.s"] = np.array([0.01], dtype="<f4")
    rejected(assemble_v2(header, arrays), "scales", g)


@pytest.mark.parametrize("k", [7, 10**30, -1, True, 2.0])
def test_reject_declared_k_outside_the_tensor(k) -> None:
    header, arrays, g = topk_parts()
    header["tensors"][0]["k"] = k
    rejected(assemble_v2(header, arrays), "k", g)


def test_reject_huge_declared_shape_before_any_allocation() -> None:
    header, arrays, _ = topk_parts()
    header["tensors"][0]["shape"] = [2**20, 2**20]
    assert str(MAX_DECODED_ELEMENTS) in rejected(assemble_v2(header, arrays), "oversize")


def test_reject_shape_the_global_does_not_have_before_the_payload() -> None:
    header, arrays, _ = topk_parts()
    header["tensors"][0]["shape"] = [3, 3]
    # the payload is not even parsed: the model check comes first
    rejected(assemble_v2(header, {"junk": np.zeros(1, "<f4")}), "shape", {"w": torch.zeros(2, 3)})


def test_reject_names_the_global_does_not_have() -> None:
    header, arrays, _ = topk_parts()
    rejected(assemble_v2(header, arrays), "names", {"v": torch.zeros(2, 3)})


def test_reject_value_count_not_matching_k() -> None:
    header, arrays, g = topk_parts()
    arrays["0.v"] = np.array([0.5, -1.0, 2.0], dtype="<f2")
    rejected(assemble_v2(header, arrays), "shape", g)


def test_reject_wrong_array_dtype() -> None:
    header, arrays, g = topk_parts()
    arrays["0.i"] = np.array([1, 4], dtype="<i8")
    rejected(assemble_v2(header, arrays), "dtype", g)


def test_reject_missing_array() -> None:
    header, arrays, g = int8_parts()
    del arrays["0.s"]
    assert "missing" in rejected(assemble_v2(header, arrays), "header", g)


def test_reject_unknown_codec() -> None:
    header, arrays, g = topk_parts(codec="gzip")
    assert "gzip" in rejected(assemble_v2(header, arrays), "codec", g)


def test_reject_k_missing_for_a_sparse_codec() -> None:
    header, arrays, g = topk_parts()
    del header["tensors"][0]["k"]
    rejected(assemble_v2(header, arrays), "header", g)


def test_reject_nonfinite_values_and_overflow_once_added() -> None:
    header, arrays, g = topk_parts()
    arrays["0.v"] = np.array([np.nan, 1.0], dtype="<f2")
    rejected(assemble_v2(header, arrays), "nonfinite", g)
    header, arrays, g = int8_parts()
    arrays["0.s"] = np.array([1e37, 1.0], dtype="<f4")  # 127 * 1e37 overflows float32
    rejected(assemble_v2(header, arrays), "nonfinite", g)


def test_reject_unknown_version() -> None:
    header, arrays, g = topk_parts()
    assert "3" in rejected(assemble_v2(header, arrays, version=3), "version", g)


def test_every_codec_reason_is_tested() -> None:
    # The reasons version 2 added; each has a test above (keeps this file honest).
    assert {"codec", "k", "indices", "scales"} <= REASONS


# --- fuzzing: hostile bytes end in FrameRejected, never another exception -----------------------

_FUZZ_GLOBAL, _FUZZ_LOCAL = adapter_states(dim=4)
_VALID = {
    c: encode_update(_FUZZ_LOCAL, _FUZZ_GLOBAL, codec=c, topk_fraction=0.25, **META) for c in CODECS
}
_DECODED = {c: decode_update(data, _FUZZ_GLOBAL) for c, data in _VALID.items()}
_FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _rehash(data: bytes) -> bytes:
    body = data[:-32]
    return body + hashlib.sha256(body).digest()


def _decode_or_reject(data: bytes):
    try:
        return decode_update(data, _FUZZ_GLOBAL)
    except FrameRejected as exc:
        assert exc.reason in REASONS
        return None


def _same(a, b) -> bool:
    return (a.job, a.round, a.client, a.codec) == (b.job, b.round, b.client, b.codec) and all(
        torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors
    )


@_FUZZ
@given(codec=st.sampled_from(CODECS), data=st.data())
def test_fuzz_truncations_and_bit_flips_reject_or_decode_equal(codec: str, data) -> None:
    frame = _VALID[codec]
    kind = data.draw(st.sampled_from(["truncate", "flip", "extend"]))
    if kind == "truncate":
        mutated = frame[: data.draw(st.integers(0, len(frame) - 1))]
    elif kind == "flip":
        pos = data.draw(st.integers(0, len(frame) - 1))
        bit = data.draw(st.integers(0, 7))
        mutated = frame[:pos] + bytes([frame[pos] ^ (1 << bit)]) + frame[pos + 1 :]
    else:
        mutated = frame + data.draw(st.binary(min_size=1, max_size=64))
    got = _decode_or_reject(mutated)
    assert got is None or _same(got, _DECODED[codec])


@_FUZZ
@given(codec=st.sampled_from(CODECS), data=st.data())
def test_fuzz_rehashed_corruption_rejects_or_gives_a_finite_update_of_the_model(
    codec: str, data
) -> None:
    """Bit flips with the hash recomputed (anyone can: it is unkeyed) reach the parser."""
    frame = bytearray(_VALID[codec])
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(frame) - 33))
        frame[pos] ^= 1 << data.draw(st.integers(0, 7))
    got = _decode_or_reject(_rehash(bytes(frame)))
    if got is not None:
        assert set(got.tensors) == set(_FUZZ_GLOBAL)
        for k, v in got.tensors.items():
            assert v.shape == _FUZZ_GLOBAL[k].shape and bool(torch.isfinite(v).all())


@_FUZZ
@given(blob=st.binary(max_size=512))
def test_fuzz_random_bytes_are_rejected(blob: bytes) -> None:
    assert _decode_or_reject(blob) is None
    assert _decode_or_reject(MAGIC + bytes([FORMAT_VERSION]) + blob) is None


@_FUZZ
@given(
    codec=st.sampled_from(CODECS),
    values=st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=40),
    fraction=st.floats(0.01, 1.0),
)
def test_fuzz_encode_decode_round_trip_of_random_tensors(codec, values, fraction) -> None:
    g = {"w": torch.zeros(len(values))}
    local = {"w": torch.tensor(values, dtype=torch.float32)}
    got = decode_update(
        encode_update(local, g, codec=codec, topk_fraction=fraction, **META), g
    ).tensors["w"]
    peak = max(abs(v) for v in values)
    if codec == "fp32":
        assert torch.equal(got, local["w"])
    elif codec in ("fp16", "delta-fp16"):
        assert float((got - local["w"]).abs().max()) <= peak * 2**-10 + 1e-6
    elif codec == "int8":
        assert float((got - local["w"]).abs().max()) <= peak / 127 / 2 * (1 + 1e-5) + 1e-7
    else:
        k = topk_count(len(values), fraction)
        assert int((got != 0).sum()) <= k
        assert math.isfinite(float(got.abs().sum()))


# --- simulate --update-codec --------------------------------------------------------------------


def tiny_features(dim: int = 16, n: int = 30) -> FeatureSet:
    """Three domains of random features over two classes: enough for a few rounds."""
    gen = torch.Generator().manual_seed(0)
    domains = {}
    for name in ("a", "b", "c"):
        domains[name] = DomainFeatures(
            name,
            torch.randn(n, dim, generator=gen),
            torch.arange(n) % 2,
            [f"{name}{i}" for i in range(n)],
            torch.zeros(n, 32, dtype=torch.uint8),
        )
    return FeatureSet({}, ["x", "y"], torch.randn(2, dim, generator=gen), 10.0, domains)


def sim_config(codec: str, **kw) -> SimulationConfig:
    return SimulationConfig(
        test_domain="c",
        rounds=kw.pop("rounds", 2),
        seeds=(0,),
        train=TrainConfig(lr=1e-2, weight_decay=0.0, loss="ce"),
        update_codec=codec,
        **kw,
    )


def test_simulate_aggregates_what_the_codec_decodes(monkeypatch) -> None:
    """With topk, every update the server averages in round 1 differs from the round's global
    in at most k entries per tensor: the server adds decoded sparse deltas, not the local state."""
    fs = tiny_features()
    added: list[dict] = []
    real_add = RunningMean.add

    def spy(self, state, num_samples, global_state=None):
        added.append({k: v.clone() for k, v in state.items()})
        real_add(self, state, num_samples, global_state)

    monkeypatch.setattr(RunningMean, "add", spy)
    summary = simulate(fs, sim_config("topk", rounds=1, topk_fraction=0.05), log=lambda _: None)
    torch.manual_seed(0)  # run_seed's global at round 1
    start = AttentionAdapter(fs.dim).state_dict()
    assert len(added) == 2  # two clients, one round
    for state in added:
        for name, tensor in state.items():
            changed = int((tensor != start[name]).sum())
            assert 0 < changed <= topk_count(tensor.numel(), 0.05)
    assert summary["update_codec"] == "topk"


def test_simulate_reports_bytes_per_client_per_round() -> None:
    fs = tiny_features()
    fp32 = len(encode_update(AttentionAdapter(16).state_dict(), None, codec="fp32", **META))
    lines: list[str] = []
    dense = simulate(fs, sim_config("fp32"), log=lines.append)
    sparse = simulate(fs, sim_config("topk-int8", topk_fraction=0.02), log=lambda _: None)
    # the header names job/round/client, so sizes differ from META's frame by a few bytes
    assert abs(dense["up_bytes_per_client_per_round"] - fp32) < 32
    assert sparse["up_bytes_per_client_per_round"] < 0.5 * fp32  # ~1 kB is framing at d=16
    assert dense["down_bytes_per_client_per_round"] > 0.95 * fp32
    for h in dense["history"]:
        assert set(h["up_bytes"]) == {"a", "b"}
    assert "update codec fp32" in lines[-1] and "bytes per client per round" in lines[-1]


def test_simulate_refuses_unknown_codec_and_bad_fraction() -> None:
    with pytest.raises(ConfigError, match="topk-int8"):
        sim_config("zip")
    with pytest.raises(ConfigError, match="fraction"):
        sim_config("topk", topk_fraction=0.0)


# --- bench codecs -----------------------------------------------------------------------------


def test_bench_codecs_reports_every_codec_with_real_frame_sizes(tmp_path) -> None:
    from fedclip_edge.benchmarks.codecs import META as BENCH_META
    from fedclip_edge.benchmarks.codecs import _update, run_codec_bench

    lines: list[str] = []
    report = run_codec_bench(dim=32, repeats=1, tower=False, out=tmp_path, log=lines.append)
    assert [r["codec"] for r in report["rows"]] == list(CODECS)
    g, local = _update(32, 0)
    by = {r["codec"]: r for r in report["rows"]}
    for codec in CODECS:
        frame = encode_update(local, g, codec=codec, topk_fraction=0.01, **BENCH_META)
        assert by[codec]["bytes"] == len(frame)
        assert by[codec]["ratio_vs_fp32"] == pytest.approx(by["fp32"]["bytes"] / len(frame))
    assert by["fp32"]["relative_error_one_round"] == 0.0
    assert 0 < by["int8"]["relative_error_one_round"] < by["topk"]["relative_error_one_round"]
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(report["rows"]))
    assert "topk-int8" in lines[0] and "not measured" in lines[0]


def test_simulate_help_lists_every_codec(capsys, monkeypatch) -> None:
    from fedclip_edge.cli import main

    monkeypatch.setenv("COLUMNS", "300")  # rich wraps the choice list at the terminal width
    assert main(["simulate", "--help"]) == 0
    out = capsys.readouterr().out
    assert "<" + "|".join(CODECS) + ">" in out
    assert main(["bench", "codecs", "--help"]) == 0
    assert "--topk-fraction" in capsys.readouterr().out


def test_codecs_accuracy_reads_simulate_runs_into_table_and_plot(tmp_path, capsys) -> None:
    from fedclip_edge.benchmarks.codecs_accuracy import main as accuracy_main

    fs = tiny_features()
    for codec in ("fp32", "topk"):
        simulate(fs, sim_config(codec, topk_fraction=0.05), tmp_path / codec, log=lambda _: None)
    assert (
        accuracy_main([str(tmp_path / "fp32"), str(tmp_path / "topk"), "--out", str(tmp_path)]) == 0
    )
    rows = json.loads((tmp_path / "codecs_accuracy.json").read_text())
    assert [r["codec"] for r in rows] == ["fp32", "topk"]
    fp32 = json.loads((tmp_path / "fp32" / "summary.json").read_text())
    assert rows[0]["up_bytes_per_client_per_round"] == fp32["up_bytes_per_client_per_round"]
    curve = rows[1]["curve"]["cumulative_up_bytes"]
    assert len(curve) == 2 and curve[1] > curve[0] > 0
    out = capsys.readouterr().out
    assert "| fp32 |" in out and "| topk 0.05 |" in out and "+0.00" in out
    assert (tmp_path / "codecs_accuracy.png").stat().st_size > 10_000
    assert accuracy_main([str(tmp_path / "none"), "--out", str(tmp_path)]) == 2


def test_codecs_accuracy_plots_both_ways(tmp_path) -> None:
    """Runs with a compressed global: the curve counts uplink and downlink bytes per round."""
    from fedclip_edge.benchmarks.codecs_accuracy import main as accuracy_main

    fs = tiny_features()
    cfg = sim_config("topk", topk_fraction=0.05, global_codec="int8")
    simulate(fs, cfg, tmp_path / "run", log=lambda _: None)
    assert accuracy_main([str(tmp_path / "run"), "--out", str(tmp_path), "--both-ways"]) == 0
    row = json.loads((tmp_path / "codecs_accuracy.json").read_text())[0]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    down = summary["per_seed"][0]["down_bytes_by_round"]
    up, both = row["curve"]["cumulative_up_bytes"], row["curve"]["cumulative_up_down_bytes"]
    assert both == pytest.approx([u + sum(down[: i + 1]) for i, u in enumerate(up)])
    assert row["global_codec"] == "int8"
    assert (tmp_path / "codecs_accuracy.png").stat().st_size > 10_000
