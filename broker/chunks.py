"""Chunking: a payload above the transport's `max_payload` travels as N chunk envelopes
(type `chunk`) that carry a transfer id, index, count, total length and the sha256 of the whole;
`Reassembler` puts them back together with bounded memory and time.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from fedclip_edge.broker.envelope import (
    MAX_MESSAGE_BYTES,
    MessageRejected,
    _is_int,
    decode_envelope,
    encode_envelope,
)

# Chunks of one transfer at most: 1 GiB in 64 KiB chunks (a sender splits into far fewer).
MAX_CHUNKS = 16384


def split_payload(payload: bytes, max_payload: int) -> list[bytes]:
    """`payload` itself if it fits, else chunk envelopes that each fit in `max_payload`."""
    if len(payload) <= max_payload:
        return [payload]
    overhead = 512  # header of a chunk envelope: ids, counts, a hex digest
    if max_payload <= overhead:
        raise ValueError(f"max_payload {max_payload} is too small to carry chunks")
    step = max_payload - overhead
    count = -(-len(payload) // step)
    transfer = os.urandom(8).hex()
    digest = hashlib.sha256(payload).hexdigest()
    out = []
    for i in range(count):
        piece = payload[i * step : (i + 1) * step]
        env = encode_envelope(
            {
                "type": "chunk",
                "transfer": transfer,
                "index": i,
                "count": count,
                "total": len(payload),
                "sha256": digest,
            },
            piece,
        )
        if len(env) > max_payload:  # cannot happen with the overhead above; keep it checked
            raise ValueError("chunk envelope exceeds max_payload")
        out.append(env)
    return out


@dataclass
class _Pending:
    count: int
    total: int
    sha256: str
    started: float
    parts: dict[int, bytes] = field(default_factory=dict)
    size: int = 0
    wire_bytes: int = 0


# A sender has one transfer in flight per topic (plus a retry): a third one on the same topic
# supersedes the oldest, so one topic (one device, with the broker's ACL) cannot pin memory with
# transfers it never finishes.
MAX_TRANSFERS_PER_TOPIC = 2


class Reassembler:
    """Chunks -> whole payloads, bounding memory (`max_bytes` per transfer, `max_pending_bytes`
    across all, `MAX_TRANSFERS_PER_TOPIC` per topic) and time (`timeout_s` per incomplete
    transfer; the owner calls `expire()` on its own schedule too, not only when chunks come).
    Every byte check is O(1) per chunk."""

    def __init__(
        self,
        *,
        max_bytes: int = MAX_MESSAGE_BYTES,
        max_pending_bytes: int = 2 * MAX_MESSAGE_BYTES,
        timeout_s: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_bytes = max_bytes
        self.max_pending_bytes = max_pending_bytes
        self.timeout_s = timeout_s
        self.clock = clock
        self._pending: dict[tuple[str, str], _Pending] = {}
        # recently completed transfers: QoS 1 redelivers chunks; they must not start anew
        self._done: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._per_topic: dict[str, int] = {}
        self._pending_bytes = 0
        self.expired = 0
        self.superseded = 0

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def _drop(self, key: tuple[str, str]) -> None:
        p = self._pending.pop(key)
        self._pending_bytes -= p.size
        left = self._per_topic[key[0]] - 1
        if left:
            self._per_topic[key[0]] = left
        else:
            del self._per_topic[key[0]]

    def expire(self) -> list[str]:
        """Drop transfers older than `timeout_s`; returns their topics. Pending transfers are
        kept in arrival order, so this stops at the first young one."""
        now = self.clock()
        gone = []
        for k, p in self._pending.items():
            if now - p.started <= self.timeout_s:
                break
            gone.append(k)
        for k in gone:
            self._drop(k)
        self.expired += len(gone)
        return [k[0] for k in gone]

    def feed(self, topic: str, payload: bytes) -> tuple[bytes, int, float] | None:
        """A chunk in; (whole payload, wire bytes of all its chunks, seconds from first chunk)
        when it completes, else None. `MessageRejected` for a chunk that does not fit."""
        self.expire()
        header, body = decode_envelope(payload, self.max_bytes)
        if header["type"] != "chunk":
            raise MessageRejected("chunk", "not a chunk envelope")
        transfer = header.get("transfer")
        index, count, total = header.get("index"), header.get("count"), header.get("total")
        digest = header.get("sha256")
        if not (
            isinstance(transfer, str)
            and 0 < len(transfer) <= 64
            and _is_int(index)
            and _is_int(count)
            and _is_int(total)
            and isinstance(digest, str)
            and len(digest) == 64
            and 0 <= index < count
            and 0 < total
            and count <= total
            and count <= MAX_CHUNKS
            and body  # an empty chunk would grow the bookkeeping without counting as pending bytes
        ):
            raise MessageRejected("chunk", "chunk header fields are missing or inconsistent")
        if total > self.max_bytes:
            raise MessageRejected(
                "chunk_oversize", f"transfer of {total} bytes is above the {self.max_bytes} limit"
            )
        key = (topic, transfer)
        if key in self._done:
            return None
        p = self._pending.get(key)
        if p is None:
            if self._per_topic.get(topic, 0) >= MAX_TRANSFERS_PER_TOPIC:
                oldest = next(k for k in self._pending if k[0] == topic)
                self._drop(oldest)
                self.superseded += 1
            if self._pending_bytes + len(body) > self.max_pending_bytes:
                raise MessageRejected("chunk_oversize", "too many incomplete transfers pending")
            p = self._pending[key] = _Pending(count, total, digest, self.clock())
            self._per_topic[topic] = self._per_topic.get(topic, 0) + 1
        elif (p.count, p.total, p.sha256) != (count, total, digest):
            self._drop(key)
            raise MessageRejected("chunk", f"chunk {index} disagrees with its transfer's header")
        if index in p.parts:
            return None  # QoS 1 redelivery of a chunk: already have it
        if p.size + len(body) > total or self._pending_bytes + len(body) > self.max_pending_bytes:
            self._drop(key)
            raise MessageRejected("chunk_oversize", "chunks carry more bytes than declared")
        p.parts[index] = body
        p.size += len(body)
        self._pending_bytes += len(body)
        p.wire_bytes += len(payload)
        if len(p.parts) < count:
            return None
        self._drop(key)
        self._done[key] = None
        if len(self._done) > 1024:
            self._done.popitem(last=False)
        whole = b"".join(p.parts[i] for i in range(count))
        if len(whole) != total:
            raise MessageRejected("chunk", f"reassembled {len(whole)} bytes, declared {total}")
        if hashlib.sha256(whole).hexdigest() != digest:
            raise MessageRejected("chunk_hash", "reassembled payload fails its sha256")
        return whole, p.wire_bytes, self.clock() - p.started
