"""Fuzzing the MQTT envelope, message and chunk decoders (`protocol.decode_envelope`,
`decode_message`, `Reassembler.feed`) with hypothesis.

Every case must end in `MessageRejected` or a valid result equal to the input (a decoded
message re-encodes and decodes to itself, with every number finite and in its bounds; chunks
reassemble to exactly what was split), never another exception.
Profiles: tests/support/fuzz_profiles.py.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from support import fuzz_profiles

from fedclip_edge.broker import protocol as P
from fedclip_edge.broker.protocol import MessageRejected, Reassembler

_PREFIX = struct.Struct("<4sBI")
IDS = st.from_regex(r"\A[A-Za-z0-9_.\-]{1,12}\Z")
FINITE = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12)
WEIRD = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([10**400, -(10**400), 2**63, 2**64, -1, 0, 2**31, 10**9 + 1, 65537]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from(["", "x" * 300, "a/b#", "+", "online", "done", "update", "chunk"]),
    st.lists(st.one_of(st.integers(), st.text(max_size=5)), max_size=4),
    st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), st.text(max_size=5)), max_size=3),
    st.dictionaries(
        st.text(min_size=1, max_size=5), st.sampled_from([10**400, "x", -1]), max_size=2
    ),
)
RAW_TOKENS = st.sampled_from(
    ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" + "0" * 400, "[" * 5000 + "]" * 5000]
)


@st.composite
def messages(draw) -> P.Message:
    kind = draw(st.sampled_from(["status", "global", "update", "control"]))
    if kind == "status":
        return P.Status(
            client=draw(IDS),
            state=draw(st.sampled_from(P.STATES)),
            samples=draw(
                st.dictionaries(
                    st.sampled_from(["train", "val", "test"]),
                    st.integers(0, P.MAX_SAMPLES),
                )
            ),
            backend=draw(st.text(max_size=20)),
            dim=draw(st.integers(0, P.MAX_DIM)),
            versions=draw(st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=8))),
            round=draw(st.integers(-1, P.MAX_ROUND)),
            upload_s=draw(st.one_of(st.none(), st.floats(0, P.MAX_SECONDS))),
            hello=draw(st.booleans()),
        )
    if kind == "global":
        return P.GlobalModel(
            job=draw(IDS),
            round=draw(st.integers(0, P.MAX_ROUND)),
            frame=draw(st.binary(min_size=1, max_size=64)),
            seed=draw(st.integers(0, 2**63 - 1)),
            train=draw(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "lr": FINITE,
                        "betas": st.lists(FINITE, max_size=2),
                        "loss": st.sampled_from(["ce", "clip"]),
                        "logit_scale": st.none(),
                    },
                )
            ),
            have=tuple(sorted(draw(st.sets(IDS, max_size=4)))),
            session=draw(st.text(max_size=12)),
            rounds=draw(st.integers(0, P.MAX_ROUND)),
        )
    if kind == "update":
        return P.Update(
            job=draw(IDS),
            round=draw(st.integers(0, P.MAX_ROUND)),
            client=draw(IDS),
            samples=draw(st.integers(0, P.MAX_SAMPLES)),
            metrics=draw(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "loss": FINITE,
                        "bytes_down": st.integers(0, 2**40),
                        "backend": st.text(max_size=10),
                        "global_test_acc": st.one_of(st.none(), st.floats(0, 1)),
                    },
                )
            ),
            frame=draw(st.binary(min_size=1, max_size=64)),
        )
    return P.Control(
        job=draw(IDS),
        state=draw(st.sampled_from(P.CONTROL_STATES)),
        round=draw(st.integers(-1, P.MAX_ROUND)),
        rounds=draw(st.integers(0, P.MAX_ROUND)),
    )


def _bounded(msg: P.Message) -> None:
    """What a receiver relies on after decoding: numbers finite and in range, ids valid."""
    if isinstance(msg, P.Status):
        P.check_id(msg.client, "client")
        assert 0 <= msg.dim <= P.MAX_DIM and -1 <= msg.round <= P.MAX_ROUND
        assert msg.upload_s is None or (
            isinstance(msg.upload_s, float) and math.isfinite(msg.upload_s) and msg.upload_s >= 0
        )
        assert all(0 <= v <= P.MAX_SAMPLES for v in msg.samples.values())
        float(sum(msg.samples.values()))
    elif isinstance(msg, P.GlobalModel):
        P.check_id(msg.job, "job")
        assert 0 <= msg.round <= P.MAX_ROUND and 0 <= msg.rounds <= P.MAX_ROUND
        assert P.SEED_RANGE[0] <= msg.seed <= P.SEED_RANGE[1]
        for v in msg.train.values():
            if isinstance(v, (int, float)):
                assert math.isfinite(float(v))
    elif isinstance(msg, P.Update):
        P.check_id(msg.job, "job")
        P.check_id(msg.client, "client")
        assert 0 <= msg.round <= P.MAX_ROUND and 0 <= msg.samples <= P.MAX_SAMPLES
        float(msg.samples)
        for k, v in msg.metrics.items():
            if k != "backend":
                assert v is None or math.isfinite(float(v))
    else:
        P.check_id(msg.job, "job")


def _check(test: str, data: bytes) -> P.Message | None:
    """The property: MessageRejected (counted), or a bounded message that round-trips."""
    try:
        msg = P.decode_message(data)
    except MessageRejected as exc:
        assert exc.reason in P.REASONS
        assert "\n" not in str(exc)
        fuzz_profiles.record(test, "rejected")
        return None
    _bounded(msg)
    assert P.decode_message(msg.encode()) == msg, "a decoded message does not round-trip"
    fuzz_profiles.record(test, "accepted")
    return msg


def _envelope(header_text: bytes, body: bytes = b"", version: int = P.PROTOCOL_VERSION) -> bytes:
    return _PREFIX.pack(P.MAGIC, version, len(header_text)) + header_text + body


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    _, _, hlen = _PREFIX.unpack_from(data)
    return json.loads(data[_PREFIX.size : _PREFIX.size + hlen]), data[_PREFIX.size + hlen :]


@given(st.binary(max_size=512))
def test_random_bytes(data: bytes) -> None:
    _check("protocol/random_bytes", data)
    try:
        P.decode_envelope(data)
    except MessageRejected:
        pass


@given(st.binary(max_size=256), st.binary(max_size=32))
def test_random_header_behind_a_valid_prefix(header: bytes, body: bytes) -> None:
    _check("protocol/random_header", _envelope(header, body))


@given(messages())
def test_valid_messages_round_trip(msg) -> None:
    assert _check("protocol/valid", msg.encode()) == msg


@given(messages(), st.lists(st.integers(min_value=0), min_size=1, max_size=8))
def test_bit_flips(msg, positions) -> None:
    data = bytearray(msg.encode())
    for p in positions:
        bit = p % (len(data) * 8)
        data[bit // 8] ^= 1 << (bit % 8)
    _check("protocol/bit_flips", bytes(data))


@given(messages(), st.integers(min_value=0), st.binary(max_size=32))
def test_truncations_and_extensions(msg, cut, extra) -> None:
    data = msg.encode()
    _check("protocol/truncated", data[: cut % len(data)])
    _check("protocol/extended", data + extra)


FIELDS = [
    "type",
    "client",
    "job",
    "state",
    "samples",
    "backend",
    "dim",
    "versions",
    "round",
    "rounds",
    "upload_s",
    "seed",
    "train",
    "have",
    "session",
    "metrics",
    "unknown",
]


@given(messages(), st.sampled_from(FIELDS), st.one_of(WEIRD, st.just("<delete>")))
def test_mutated_header_fields(msg, field, value) -> None:
    header, body = _split(msg.encode())
    if value == "<delete>":
        header.pop(field, None)
    else:
        header[field] = value
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    _check("protocol/mutated_field", _envelope(text, body))


@given(
    messages(),
    st.sampled_from(FIELDS + ["metrics.loss", "metrics.bytes_down", "train.lr", "samples.train"]),
    RAW_TOKENS,
)
def test_raw_json_tokens(msg, field, token) -> None:
    """Non-finite and huge numbers, deep nesting: what json.dumps never writes but a peer may."""
    header, body = _split(msg.encode())
    if "." in field:
        outer, inner = field.split(".")
        header[outer] = {inner: "__RAW__"}
    else:
        header[field] = "__RAW__"
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).replace('"__RAW__"', token)
    _check("protocol/raw_tokens", _envelope(text.encode(), body))


def test_the_issues_crashes_are_rejections() -> None:
    """Issue 9, items 1 and 2: each crashed the aggregator before these bounds."""
    status = {"type": "status", "client": "dev-1", "state": "uploaded", "round": 1}
    update = {"type": "update", "job": "j", "round": 1, "client": "dev-1", "samples": 5}
    cases = [
        {**status, "upload_s": 10**400},
        {**status, "upload_s": -1},
        {**status, "dim": 1_000_000},
        {**update, "metrics": {"bytes_down": "x"}},
        {**update, "metrics": {"loss": 10**400}},
        {**update, "samples": 10**400},
    ]
    for header in cases:
        data = _envelope(json.dumps(header).encode(), b"frame")
        try:
            P.decode_message(data)
        except MessageRejected as exc:
            assert exc.reason == "fields", header
        else:
            raise AssertionError(f"accepted {header}")
    inf = _envelope(b'{"type":"status","client":"d","state":"uploaded","upload_s":1e400}')
    try:
        P.decode_message(inf)
    except MessageRejected:
        pass
    else:
        raise AssertionError("accepted upload_s 1e400 (parses to inf)")


@given(st.integers(min_value=0, max_value=255), st.integers(min_value=0, max_value=2**32 - 1))
def test_versions_and_declared_lengths(version, hlen) -> None:
    data = bytearray(P.Control("j", "running", 1, 3).encode())
    struct.pack_into("<4sBI", data, 0, P.MAGIC, version, hlen)
    _check("protocol/version_length", bytes(data))


# ----------------------------------------------------------------------------- chunks


def _feed(test: str, r: Reassembler, topic: str, chunk: bytes):
    try:
        out = r.feed(topic, chunk)
    except MessageRejected as exc:
        assert exc.reason in P.REASONS
        fuzz_profiles.record(test, "rejected")
        return "rejected"
    fuzz_profiles.record(test, "accepted")
    return out


@given(
    st.binary(min_size=1, max_size=3000),
    st.integers(min_value=600, max_value=1200),
    st.randoms(use_true_random=False),
    st.integers(min_value=0, max_value=3),
)
def test_chunks_in_any_order_with_redeliveries_reassemble_exactly(
    payload, max_payload, rnd, dups
) -> None:
    chunks = P.split_payload(payload, max_payload)
    if len(chunks) == 1:
        return
    order = list(range(len(chunks))) + [rnd.randrange(len(chunks)) for _ in range(dups)]
    rnd.shuffle(order)
    r = Reassembler(max_bytes=1 << 20)
    done = []
    for i in order:
        out = _feed("chunks/valid", r, "t", chunks[i])
        assert out != "rejected"
        if out is not None:
            done.append(out)
    assert len(done) == 1 and done[0][0] == payload
    assert r.pending_bytes == 0


CHUNK_FIELDS = ["transfer", "index", "count", "total", "sha256", "type", "unknown"]


@given(
    st.binary(min_size=601, max_size=2000),
    st.sampled_from(CHUNK_FIELDS),
    st.one_of(WEIRD, st.just("<delete>"), st.binary(max_size=8).map(bytes.hex)),
    st.integers(min_value=0, max_value=10),
)
def test_mutated_chunk_headers(payload, field, value, which) -> None:
    chunks = P.split_payload(payload, 600)
    assert len(chunks) > 1
    r = Reassembler(max_bytes=1 << 16, max_pending_bytes=1 << 17)
    target = which % len(chunks)
    for i, chunk in enumerate(chunks):
        if i == target:
            header, body = _split(chunk)
            if value == "<delete>":
                header.pop(field, None)
            else:
                header[field] = value
            chunk = _envelope(json.dumps(header, sort_keys=True).encode(), body)
        out = _feed("chunks/mutated", r, "t", chunk)
        if out not in (None, "rejected"):
            assert out[0] == payload  # whatever completes is exactly what was sent


@given(st.lists(st.binary(max_size=300), max_size=10))
def test_random_chunk_bytes(parts) -> None:
    r = Reassembler(max_bytes=1 << 16, max_pending_bytes=1 << 17)
    for part in parts:
        _feed("chunks/random", r, "t", part)
        _feed("chunks/random", r, "t", _envelope(part[: len(part) // 2], part[len(part) // 2 :]))


def test_empty_or_countless_chunks_are_rejected() -> None:
    """Empty chunk bodies grew the bookkeeping without counting as pending bytes; a count above
    MAX_CHUNKS would let one transfer hold that many entries."""
    r = Reassembler(max_bytes=1 << 30)
    base = {"type": "chunk", "transfer": "t1", "count": 1000, "total": 1000, "sha256": "0" * 64}
    for header, body in (
        ({**base, "index": 0}, b""),
        ({**base, "index": 0, "count": P.MAX_CHUNKS + 1, "total": 1 << 29}, b"x"),
    ):
        try:
            r.feed("t", P.encode_envelope(header, body))
        except MessageRejected as exc:
            assert exc.reason == "chunk"
        else:
            raise AssertionError(f"accepted {header} with a {len(body)}-byte body")
    assert r.pending_bytes == 0 and not r._pending
