"""The MQTT protocol between the aggregator and devices: topics, envelopes, messages, chunks.

Topics (prefix `fedclip`, QoS 1; the broker ACL is written against exactly these):

- `fedclip/<job>/global`           aggregator, retained: the current global adapter
- `fedclip/<job>/control`          aggregator, retained: job state (running / done)
- `fedclip/<job>/update/<client>`  one device: its update for a round
- `fedclip/<job>/status/<client>`  one device, retained: hello/status; its last will "offline"

Every payload is an envelope

    b"FCMQ" | version u8 | header length u32 (little-endian) | JSON header | binary body

The JSON header carries the message type and metadata; the body carries a wire frame
(`fedclip_edge.wire`) for global models and updates. Never pickle, never JSON lists of floats.
A payload above the transport's `max_payload` travels as N chunk envelopes (type `chunk`) that
carry a transfer id, index, count, total length and the sha256 of the whole; `Reassembler`
puts them back together with bounded memory and time. Decoding treats input as hostile and
raises `MessageRejected` with a `reason` a receiver can count.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fedclip_edge.errors import ConfigError, FrameError

PREFIX = "fedclip"
QOS = 1
PROTOCOL_VERSION = 1
MAGIC = b"FCMQ"
_PREFIX = struct.Struct("<4sBI")
MAX_HEADER_BYTES = 256 * 1024
# MQTT's protocol maximum payload is 268,435,455 bytes; stay well below it by default.
DEFAULT_MAX_PAYLOAD = 64 * 1024 * 1024
MAX_MESSAGE_BYTES = 1024 * 1024 * 1024  # what a receiver reassembles at most (1 GiB)
AGGREGATOR_ID = "aggregator"

_ID_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")

MESSAGE_TYPES = ("hello", "status", "global", "update", "control", "chunk")
STATES = ("online", "offline", "training", "uploaded")
CONTROL_STATES = ("running", "done")

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


# ----------------------------------------------------------------------------- topics


class BadId(ConfigError, ValueError):
    """A job or client id that cannot be a topic level: a user's mistake (one `error:` line),
    still a ValueError for code that checks ids as values."""


def check_id(value: str, what: str) -> str:
    """Job and client ids become topic levels: no '/', '+', '#', no spaces, at most 64 chars."""
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise BadId(f"{what} {value!r} must be 1-64 characters of A-Z a-z 0-9 _ . -")
    return value


def global_topic(job: str) -> str:
    return f"{PREFIX}/{check_id(job, 'job')}/global"


def control_topic(job: str) -> str:
    return f"{PREFIX}/{check_id(job, 'job')}/control"


def update_topic(job: str, client: str) -> str:
    return f"{PREFIX}/{check_id(job, 'job')}/update/{check_id(client, 'client id')}"


def status_topic(job: str, client: str) -> str:
    return f"{PREFIX}/{check_id(job, 'job')}/status/{check_id(client, 'client id')}"


def update_filter(job: str) -> str:
    return f"{PREFIX}/{check_id(job, 'job')}/update/+"


def status_filter(job: str) -> str:
    return f"{PREFIX}/{check_id(job, 'job')}/status/+"


def parse_topic(topic: str) -> tuple[str, str, str | None]:
    """'fedclip/J/update/C' -> (J, 'update', C); 'fedclip/J/global' -> (J, 'global', None)."""
    parts = topic.split("/")
    if len(parts) == 3 and parts[0] == PREFIX and parts[2] in ("global", "control"):
        return parts[1], parts[2], None
    if len(parts) == 4 and parts[0] == PREFIX and parts[2] in ("update", "status"):
        return parts[1], parts[2], parts[3]
    raise MessageRejected("topic", f"topic {topic!r} is not a fedclip topic")


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT filter matching with '+' (one level) and '#' (the rest)."""
    p, t = pattern.split("/"), topic.split("/")
    for i, level in enumerate(p):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(p) == len(t)


# ----------------------------------------------------------------------------- envelopes


def encode_envelope(header: Mapping[str, Any], body: bytes = b"") -> bytes:
    """One envelope; the header is sorted compact JSON (same input, same bytes)."""
    raw = json.dumps(dict(header), sort_keys=True, separators=(",", ":"), allow_nan=False)
    hb = raw.encode("utf-8")
    if len(hb) > MAX_HEADER_BYTES:
        raise ValueError(f"envelope header is {len(hb)} bytes, above {MAX_HEADER_BYTES}")
    return _PREFIX.pack(MAGIC, PROTOCOL_VERSION, len(hb)) + hb + bytes(body)


def _no_constants(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def decode_envelope(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> tuple[dict, bytes]:
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
    return header, bytes(data[_PREFIX.size + hlen :])


# ----------------------------------------------------------------------------- messages


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _need(header: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    v = header.get(key)
    ok = _is_int(v) if kind is int else isinstance(v, kind) and not isinstance(v, bool)
    if not ok:
        raise MessageRejected("fields", f"{header.get('type')} field {key!r} is missing or wrong")
    return v


@dataclass(frozen=True)
class Status:
    """Hello and presence in one message: every status carries the device's full description,
    so the retained status alone tells a (re)started aggregator who is there."""

    client: str
    state: str  # online | offline | training | uploaded
    samples: dict[str, int] = field(default_factory=dict)  # train / val / test
    backend: str = ""
    dim: int = 0
    versions: dict[str, str] = field(default_factory=dict)
    round: int = -1  # last round this device answered
    upload_s: float | None = None  # with state "uploaded": publish -> PUBACK
    hello: bool = False

    def encode(self) -> bytes:
        return encode_envelope(
            {
                "type": "hello" if self.hello else "status",
                "client": self.client,
                "state": self.state,
                "samples": self.samples,
                "backend": self.backend,
                "dim": self.dim,
                "versions": self.versions,
                "round": self.round,
                "upload_s": self.upload_s,
            }
        )


def offline_status(client: str) -> bytes:
    """The last will: minimal, as the broker sends it on the device's behalf."""
    return encode_envelope({"type": "status", "client": client, "state": "offline"})


@dataclass(frozen=True)
class GlobalModel:
    """The adapter devices train from in `round`; `have` lists clients already answered (so a
    device whose update was lost resends it), `train` the job's local training settings."""

    job: str
    round: int
    frame: bytes
    seed: int = 0
    train: dict[str, Any] = field(default_factory=dict)
    have: tuple[str, ...] = ()
    session: str = ""
    rounds: int = 0  # the job's last round: a global with round > rounds is the final adapter

    def encode(self) -> bytes:
        return encode_envelope(
            {
                "type": "global",
                "rounds": self.rounds,
                "job": self.job,
                "round": self.round,
                "seed": self.seed,
                "train": self.train,
                "have": sorted(self.have),
                "session": self.session,
            },
            self.frame,
        )


@dataclass(frozen=True)
class Update:
    job: str
    round: int
    client: str
    samples: int
    metrics: dict[str, Any]
    frame: bytes

    def encode(self) -> bytes:
        return encode_envelope(
            {
                "type": "update",
                "job": self.job,
                "round": self.round,
                "client": self.client,
                "samples": self.samples,
                "metrics": _finite(self.metrics),
            },
            self.frame,
        )


@dataclass(frozen=True)
class Control:
    job: str
    state: str  # running | done
    round: int
    rounds: int

    def encode(self) -> bytes:
        return encode_envelope(
            {
                "type": "control",
                "job": self.job,
                "state": self.state,
                "round": self.round,
                "rounds": self.rounds,
            }
        )


Message = Status | GlobalModel | Update | Control


def _finite(d: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics as strict JSON: NaN/inf become null."""
    return {
        str(k): (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()
    }


def decode_message(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """A whole (reassembled) payload -> a typed message; `MessageRejected` if anything is off.

    The body's frame is left undecoded: only the receiver knows the tensor shapes to expect.
    """
    header, body = decode_envelope(data, max_bytes)
    kind = header["type"]
    if kind in ("hello", "status"):
        client = _need(header, "client", str)
        state = _need(header, "state", str)
        if state not in STATES:
            raise MessageRejected("fields", f"unknown device state {state!r}")
        samples = header.get("samples") or {}
        if not isinstance(samples, dict) or not all(
            isinstance(k, str) and _is_int(v) and v >= 0 for k, v in samples.items()
        ):
            raise MessageRejected("fields", "status 'samples' must map names to counts")
        dim = header.get("dim", 0)
        rnd = header.get("round", -1)
        upload_s = header.get("upload_s")
        if not _is_int(dim) or not _is_int(rnd):
            raise MessageRejected("fields", "status 'dim' and 'round' must be integers")
        if upload_s is not None and not isinstance(upload_s, (int, float)):
            raise MessageRejected("fields", "status 'upload_s' must be a number")
        versions = header.get("versions") or {}
        return Status(
            client=client,
            state=state,
            samples=dict(samples),
            backend=str(header.get("backend", "")),
            dim=dim,
            versions={str(k): str(v) for k, v in dict(versions).items()}
            if isinstance(versions, dict)
            else {},
            round=rnd,
            upload_s=float(upload_s) if upload_s is not None else None,
            hello=kind == "hello",
        )
    if kind == "global":
        have = header.get("have", [])
        if not isinstance(have, list) or not all(isinstance(c, str) for c in have):
            raise MessageRejected("fields", "global 'have' must be a list of client ids")
        train = header.get("train", {})
        if not isinstance(train, dict):
            raise MessageRejected("fields", "global 'train' must be an object")
        rnd = _need(header, "round", int)
        if rnd < 0 or not body:
            raise MessageRejected("fields", "global needs a round >= 0 and a frame")
        return GlobalModel(
            job=_need(header, "job", str),
            round=rnd,
            frame=body,
            seed=_need(header, "seed", int),
            train=train,
            have=tuple(have),
            session=str(header.get("session", "")),
            rounds=_need(header, "rounds", int),
        )
    if kind == "update":
        metrics = header.get("metrics", {})
        if not isinstance(metrics, dict):
            raise MessageRejected("fields", "update 'metrics' must be an object")
        samples = _need(header, "samples", int)
        rnd = _need(header, "round", int)
        if samples < 0 or rnd < 0 or not body:
            raise MessageRejected("fields", "update needs samples >= 0, round >= 0 and a frame")
        return Update(
            job=_need(header, "job", str),
            round=rnd,
            client=_need(header, "client", str),
            samples=samples,
            metrics=metrics,
            frame=body,
        )
    if kind == "control":
        state = _need(header, "state", str)
        if state not in CONTROL_STATES:
            raise MessageRejected("fields", f"unknown control state {state!r}")
        return Control(
            job=_need(header, "job", str),
            state=state,
            round=_need(header, "round", int),
            rounds=_need(header, "rounds", int),
        )
    raise MessageRejected("type", f"a bare {kind!r} envelope is not a message")


# ----------------------------------------------------------------------------- chunks


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


@dataclass
class _Pending:
    count: int
    total: int
    sha256: str
    started: float
    parts: dict[int, bytes] = field(default_factory=dict)
    size: int = 0
    wire_bytes: int = 0


class Reassembler:
    """Chunks -> whole payloads, bounding memory (`max_bytes` per transfer, `max_pending_bytes`
    across all) and time (`timeout_s` per incomplete transfer)."""

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
        self.expired = 0

    @property
    def pending_bytes(self) -> int:
        return sum(p.size for p in self._pending.values())

    def expire(self) -> list[str]:
        """Drop transfers older than `timeout_s`; returns their topics."""
        now = self.clock()
        gone = [k for k, p in self._pending.items() if now - p.started > self.timeout_s]
        for k in gone:
            del self._pending[k]
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
            if self.pending_bytes + len(body) > self.max_pending_bytes:
                raise MessageRejected("chunk_oversize", "too many incomplete transfers pending")
            p = self._pending[key] = _Pending(count, total, digest, self.clock())
        elif (p.count, p.total, p.sha256) != (count, total, digest):
            del self._pending[key]
            raise MessageRejected("chunk", f"chunk {index} disagrees with its transfer's header")
        if index in p.parts:
            return None  # QoS 1 redelivery of a chunk: already have it
        if p.size + len(body) > total or self.pending_bytes + len(body) > self.max_pending_bytes:
            del self._pending[key]
            raise MessageRejected("chunk_oversize", "chunks carry more bytes than declared")
        p.parts[index] = body
        p.size += len(body)
        p.wire_bytes += len(payload)
        if len(p.parts) < count:
            return None
        del self._pending[key]
        self._done[key] = None
        if len(self._done) > 1024:
            self._done.popitem(last=False)
        whole = b"".join(p.parts[i] for i in range(count))
        if len(whole) != total:
            raise MessageRejected("chunk", f"reassembled {len(whole)} bytes, declared {total}")
        if hashlib.sha256(whole).hexdigest() != digest:
            raise MessageRejected("chunk_hash", "reassembled payload fails its sha256")
        return whole, p.wire_bytes, self.clock() - p.started
