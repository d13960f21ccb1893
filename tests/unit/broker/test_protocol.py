"""Protocol: topics, envelopes, typed messages, and chunk reassembly against hostile input."""

from __future__ import annotations

import hashlib
import struct

import pytest

from fedclip_edge.broker import protocol as p
from fedclip_edge.broker.protocol import MessageRejected, Reassembler


def test_topics_are_the_fixed_ones() -> None:
    assert p.global_topic("j1") == "fedclip/j1/global"
    assert p.control_topic("j1") == "fedclip/j1/control"
    assert p.update_topic("j1", "dev-1") == "fedclip/j1/update/dev-1"
    assert p.status_topic("j1", "dev-1") == "fedclip/j1/status/dev-1"
    assert p.parse_topic("fedclip/j1/update/dev-1") == ("j1", "update", "dev-1")
    assert p.parse_topic("fedclip/j1/global") == ("j1", "global", None)
    for bad in ("a/b", "a b", "", "#", "x" * 65):
        with pytest.raises(ValueError):
            p.check_id(bad, "client id")
    with pytest.raises(ValueError):
        p.update_topic("j", "a+b")
    with pytest.raises(MessageRejected):
        p.parse_topic("other/j1/update/x")


@pytest.mark.parametrize(
    "pattern,topic,hit",
    [
        ("fedclip/j/update/+", "fedclip/j/update/a", True),
        ("fedclip/j/update/+", "fedclip/j/update/a/b", False),
        ("fedclip/j/#", "fedclip/j/status/a", True),
        ("fedclip/j/global", "fedclip/j/global", True),
        ("fedclip/j/global", "fedclip/k/global", False),
    ],
)
def test_topic_matching(pattern: str, topic: str, hit: bool) -> None:
    assert p.topic_matches(pattern, topic) is hit


def test_messages_round_trip() -> None:
    u = p.Update("j", 3, "c1", 12, {"loss": 0.5, "nan": float("nan")}, b"FRAME")
    got = p.decode_message(u.encode())
    assert isinstance(got, p.Update)
    assert (got.job, got.round, got.client, got.samples, got.frame) == ("j", 3, "c1", 12, b"FRAME")
    assert got.metrics == {"loss": 0.5, "nan": None}
    g = p.GlobalModel("j", 2, b"F", seed=7, train={"lr": 0.1}, have=("b", "a"), session="s")
    gg = p.decode_message(g.encode())
    assert isinstance(gg, p.GlobalModel) and gg.have == ("a", "b") and gg.seed == 7
    s = p.Status("c1", "online", {"train": 6}, "onnxruntime", 128, {"x": "1"}, hello=True)
    ss = p.decode_message(s.encode())
    assert isinstance(ss, p.Status) and ss.hello and ss.samples == {"train": 6} and ss.dim == 128
    assert p.decode_message(p.offline_status("c1")) == p.Status("c1", "offline")
    c = p.decode_message(p.Control("j", "done", 3, 3).encode())
    assert c == p.Control("j", "done", 3, 3)


def _raw(header: bytes, body: bytes = b"", magic: bytes = b"FCMQ", version: int = 1) -> bytes:
    return struct.pack("<4sBI", magic, version, len(header)) + header + body


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "envelope"),
        (b"garbage that is not an envelope", "envelope"),
        (_raw(b"{}", magic=b"XXXX"), "envelope"),
        (_raw(b"{}", version=9), "envelope"),
        (struct.pack("<4sBI", b"FCMQ", 1, 10_000) + b"{}", "envelope"),
        (_raw(b"[1,2]"), "envelope"),
        (_raw(b"\xff\xfe"), "envelope"),
        (_raw(b'{"type":"nope"}'), "type"),
        (_raw(b'{"type":"update","job":"j","round":true,"client":"c","samples":1}', b"x"),
         "fields"),
        (_raw(b'{"type":"update","job":"j","round":1,"client":"c","samples":-1}', b"x"),
         "fields"),
        (_raw(b'{"type":"update","job":"j","round":1,"client":"c","samples":1}'), "fields"),
        (_raw(b'{"type":"status","client":"c","state":"dancing"}'), "fields"),
        (_raw(b'{"type":"update","job":"j","round":NaN}'), "envelope"),
        (_raw(b'{"type":"chunk"}'), "type"),
    ],
)
def test_hostile_envelopes_are_rejected(data: bytes, reason: str) -> None:
    with pytest.raises(MessageRejected) as err:
        p.decode_message(data)
    assert err.value.reason == reason


def test_small_payload_is_not_chunked() -> None:
    assert p.split_payload(b"abc", 1000) == [b"abc"]


def _reassemble(chunks: list[bytes], r: Reassembler | None = None) -> bytes | None:
    r = r or Reassembler()
    out = None
    for c in chunks:
        res = r.feed("t", c)
        if res is not None:
            out = res[0]
    return out


def test_chunks_reassemble_in_any_order_and_tolerate_redelivery() -> None:
    payload = bytes(range(256)) * 40  # 10240 bytes
    chunks = p.split_payload(payload, 1024)
    assert len(chunks) > 10 and all(len(c) <= 1024 for c in chunks)
    assert all(p.peek_type(c) == "chunk" for c in chunks)
    r = Reassembler()
    shuffled = chunks[::-1] + chunks[:3]  # reversed, then QoS 1 redeliveries
    results = [r.feed("t", c) for c in shuffled]
    done = [x for x in results if x is not None]
    assert len(done) == 1 and done[0][0] == payload
    assert done[0][1] == sum(len(c) for c in chunks)  # wire bytes: every chunk envelope
    assert r.pending_bytes == 0  # redelivered chunks of a finished transfer are ignored


def _rewrite(chunk: bytes, **changes: object) -> bytes:
    header, body = p.decode_envelope(chunk)
    header.update(changes)
    if "body" in changes:
        body = changes.pop("body")  # type: ignore[assignment]
        header.pop("body")
    return p.encode_envelope(header, body)


def test_chunk_hash_mismatch_is_rejected() -> None:
    chunks = p.split_payload(b"a" * 5000, 1024)
    chunks[1] = _rewrite(chunks[1], body=b"b" * len(p.decode_envelope(chunks[1])[1]))
    with pytest.raises(MessageRejected) as err:
        _reassemble(chunks)
    assert err.value.reason == "chunk_hash"


def test_chunk_inconsistent_headers_are_rejected() -> None:
    chunks = p.split_payload(b"a" * 5000, 1024)
    r = Reassembler()
    r.feed("t", chunks[0])
    with pytest.raises(MessageRejected) as err:
        r.feed("t", _rewrite(chunks[1], total=4999))
    assert err.value.reason == "chunk"
    for bad in ({"index": 99}, {"count": 0}, {"sha256": "x"}, {"transfer": 5}, {"total": 0}):
        with pytest.raises(MessageRejected):
            Reassembler().feed("t", _rewrite(chunks[0], **bad))


def test_chunk_memory_and_time_are_bounded() -> None:
    chunks = p.split_payload(b"a" * 5000, 1024)
    with pytest.raises(MessageRejected) as err:
        Reassembler(max_bytes=4000).feed("t", chunks[0])
    assert err.value.reason == "chunk_oversize"
    # a lying sender: more bytes than the declared total
    lie = _rewrite(chunks[0], body=b"a" * 6000)
    with pytest.raises(MessageRejected):
        Reassembler().feed("t", lie)
    # incomplete transfers expire
    now = [0.0]
    r = Reassembler(timeout_s=5.0, clock=lambda: now[0])
    r.feed("t", chunks[0])
    assert r.pending_bytes > 0
    now[0] = 10.0
    assert r.expire() == ["t"] and r.pending_bytes == 0 and r.expired == 1
    # pending bytes across transfers are bounded
    r2 = Reassembler(max_bytes=10_000, max_pending_bytes=800)
    r2.feed("t", chunks[0])
    other = p.split_payload(b"c" * 5000, 1024)
    with pytest.raises(MessageRejected):
        r2.feed("u", other[0])


def test_chunks_of_different_topics_do_not_mix() -> None:
    a = p.split_payload(b"a" * 3000, 1024)
    b = p.split_payload(b"b" * 3000, 1024)
    r = Reassembler()
    got = {}
    for ca, cb in zip(a, b, strict=True):
        for topic, c in (("ta", ca), ("tb", cb)):
            res = r.feed(topic, c)
            if res:
                got[topic] = res[0]
    assert got == {"ta": b"a" * 3000, "tb": b"b" * 3000}
    assert hashlib.sha256(got["ta"]).hexdigest() == hashlib.sha256(b"a" * 3000).hexdigest()


def test_reassembler_bounds_each_topic_and_counts_in_constant_time() -> None:
    """A topic that keeps starting transfers it never finishes holds at most two; the byte
    count is kept, not re-summed per chunk."""
    from fedclip_edge.broker.protocol import MAX_TRANSFERS_PER_TOPIC, Reassembler, split_payload

    r = Reassembler(max_bytes=1 << 20, max_pending_bytes=1 << 30)
    firsts = []
    for i in range(300):
        chunks = split_payload(bytes([i % 251]) * 5000, 1024)
        firsts.append(chunks)
        assert r.feed("fedclip/j/update/flood", chunks[0]) is None
    assert len(r._pending) == MAX_TRANSFERS_PER_TOPIC and r.superseded == 298
    assert r.pending_bytes == sum(p.size for p in r._pending.values())
    # the newest transfer still completes
    whole = None
    for c in firsts[-1][1:]:
        whole = r.feed("fedclip/j/update/flood", c) or whole
    assert whole is not None and whole[0] == bytes([299 % 251]) * 5000
    assert r.pending_bytes == sum(p.size for p in r._pending.values())


def test_transport_expires_stale_chunks_without_new_chunks_and_counts_them() -> None:
    """Expiry runs on the consumer's schedule: an abandoned transfer is dropped and counted
    even when no other chunk ever arrives."""
    from fedclip_edge.broker.protocol import split_payload
    from fedclip_edge.broker.transport import MemoryBroker, MemoryTransport

    t = MemoryTransport(MemoryBroker(), "agg", chunk_timeout_s=0.0)
    t._on_raw("fedclip/j/update/a", split_payload(b"x" * 5000, 1024)[0], False)
    assert t._reassembler.pending_bytes > 0
    t._last_expiry = 0.0  # the next recv is due to expire
    assert t.recv(0.0) is None
    assert t._reassembler.pending_bytes == 0 and t.rejected["chunk_expired"] == 1
