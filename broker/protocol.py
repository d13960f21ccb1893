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
# Chunks of one transfer at most: 1 GiB in 64 KiB chunks (a sender splits into far fewer).
MAX_CHUNKS = 16384
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
        "dim",
        "unsigned",
        "bad_signature",
        "unknown_key",
        "malformed_signature",
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


def decode_envelope(
    data: bytes, max_bytes: int = MAX_MESSAGE_BYTES
) -> tuple[dict, bytes | memoryview]:
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
    # the body as a view of the payload, not a 2 MB copy per update (the frame decoder reads it)
    return header, memoryview(data)[_PREFIX.size + hlen :]


# ----------------------------------------------------------------------------- messages


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _need(header: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    v = header.get(key)
    ok = _is_int(v) if kind is int else isinstance(v, kind) and not isinstance(v, bool)
    if not ok:
        raise MessageRejected("fields", f"{header.get('type')} field {key!r} is missing or wrong")
    return v


# Bounds of every number and text in a message: a value outside them is refused at decoding,
# so nothing downstream (float(), torch.manual_seed, allocations by dim) sees it.
MAX_ROUND = 2**31 - 1
MAX_SAMPLES = 10**9
MAX_DIM = 65536
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed takes
MAX_SECONDS = 1e7
MAX_METRIC = 1e15  # |value| of a numeric metric (bytes, seconds, accuracies, losses)
MAX_TEXT = 256
MAX_ENTRIES = 64  # keys of samples / versions / metrics / train
MAX_HAVE = 100_000  # client ids a global lists
# The only metric that may be text; every other metric is a number or null.
TEXT_METRICS = frozenset({"backend", "update_codec", "update_dtype", "site_weighting"})


def _int_field(header: Mapping[str, Any], key: str, lo: int, hi: int, default: Any = ...) -> int:
    """An integer in [lo, hi]; `default` (when given) if the key is absent."""
    v = header.get(key, default) if default is not ... else header.get(key)
    if not _is_int(v) or not lo <= v <= hi:
        raise MessageRejected(
            "fields", f"{header.get('type')} field {key!r} must be an integer in [{lo}, {hi}]"
        )
    return v


def _text_field(header: Mapping[str, Any], key: str, default: Any = ..., *, ident: bool = False):
    """A string of at most MAX_TEXT characters; with `ident`, a job or client id."""
    v = header.get(key, default) if default is not ... else header.get(key)
    ok = isinstance(v, str) and len(v) <= MAX_TEXT and (not ident or bool(_ID_RE.match(v)))
    if not ok:
        what = "an id (1-64 of A-Z a-z 0-9 _ . -)" if ident else f"a string of <= {MAX_TEXT}"
        raise MessageRejected("fields", f"{header.get('type')} field {key!r} must be {what}")
    return v


def _is_number(v: Any, bound: float) -> bool:
    """A finite int or float with |v| <= bound (JSON's 1e400 parses to inf; 10**400 is an int)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    if isinstance(v, int):
        return -bound <= v <= bound
    return math.isfinite(v) and abs(v) <= bound


def _flat_object(header: Mapping[str, Any], key: str) -> dict[str, Any]:
    v = header.get(key)
    if v is None:
        return {}
    if (
        not isinstance(v, dict)
        or len(v) > MAX_ENTRIES
        or not all(isinstance(k, str) and 0 < len(k) <= MAX_TEXT for k in v)
    ):
        raise MessageRejected(
            "fields", f"{header.get('type')} field {key!r} must be an object of <= {MAX_ENTRIES}"
        )
    return v


def _check_metrics(metrics: Mapping[str, Any]) -> None:
    for k, v in metrics.items():
        if v is None or _is_number(v, MAX_METRIC):
            continue
        if k in TEXT_METRICS and isinstance(v, str) and len(v) <= MAX_TEXT:
            continue
        raise MessageRejected(
            "fields", f"update metric {k!r} must be a finite number of magnitude <= {MAX_METRIC:g}"
        )


def _check_train(train: Mapping[str, Any]) -> None:
    """Training settings as plain values (their meaning is checked by the agent's TrainConfig)."""
    for k, v in train.items():
        if v is None or isinstance(v, bool) or _is_number(v, MAX_METRIC):
            continue
        if isinstance(v, str) and len(v) <= MAX_TEXT:
            continue
        if isinstance(v, list) and len(v) <= 8 and all(_is_number(x, MAX_METRIC) for x in v):
            continue
        raise MessageRejected("fields", f"global 'train' setting {k!r} has a value out of range")


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
    session: str = ""  # the device process's id (signed: see broker/authn.py)
    sig: str = ""  # Ed25519 signature, base64; "" when unsigned

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
                **_signed(self.session, self.sig),
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
    sig: str = ""
    weighting: str = ""  # the job's FedAvg weighting, which a site applies to its devices

    def encode(self) -> bytes:
        extra = {"weighting": self.weighting} if self.weighting else {}
        return encode_envelope(
            {
                **extra,
                "type": "global",
                "rounds": self.rounds,
                "job": self.job,
                "round": self.round,
                "seed": self.seed,
                "train": self.train,
                "have": sorted(self.have),
                "session": self.session,
                **_signed(None, self.sig),
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
    session: str = ""
    sig: str = ""

    def encode(self) -> bytes:
        return encode_envelope(
            {
                "type": "update",
                "job": self.job,
                "round": self.round,
                "client": self.client,
                "samples": self.samples,
                "metrics": _finite(self.metrics),
                **_signed(self.session, self.sig),
            },
            self.frame,
        )


@dataclass(frozen=True)
class Control:
    job: str
    state: str  # running | done
    round: int
    rounds: int
    session: str = ""
    sig: str = ""

    def encode(self) -> bytes:
        return encode_envelope(
            {
                "type": "control",
                "job": self.job,
                "state": self.state,
                "round": self.round,
                "rounds": self.rounds,
                **_signed(self.session, self.sig),
            }
        )


Message = Status | GlobalModel | Update | Control


def _signed(session: str | None, sig: str) -> dict[str, str]:
    """Header fields of a signed message; none for an unsigned one (old peers see no change)."""
    out = {} if session is None or not session else {"session": session}
    if sig:
        out["sig"] = sig
    return out



def _finite(d: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics as strict JSON: NaN/inf become null."""
    return {
        str(k): (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()
    }



def decode_message(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """A whole (reassembled) payload -> a typed message; `MessageRejected` if anything is off.

    Every field is typed and bounded here (numbers finite and in range, texts short, ids valid),
    so a receiver can use the values without guarding each use. The body's frame is left
    undecoded: only the receiver knows the tensor shapes to expect.
    """
    header, body = decode_envelope(data, max_bytes)
    try:
        return _decode_fields(header, body)
    except (TypeError, ValueError, OverflowError, KeyError, AttributeError, RecursionError) as exc:
        # a check missed above must still end as a counted rejection, never a crash
        raise MessageRejected(
            "fields", f"{header.get('type')} message is malformed: {type(exc).__name__}"
        ) from None


def _decode_fields(header: dict[str, Any], body: bytes) -> Message:
    kind = header["type"]
    if kind in ("hello", "status"):
        client = _text_field(header, "client", ident=True)
        state = _need(header, "state", str)
        if state not in STATES:
            raise MessageRejected("fields", f"unknown device state {state!r}")
        samples = _flat_object(header, "samples")
        if not all(_is_int(v) and 0 <= v <= MAX_SAMPLES for v in samples.values()):
            raise MessageRejected(
                "fields", f"status 'samples' must map names to counts in [0, {MAX_SAMPLES}]"
            )
        dim = _int_field(header, "dim", 0, MAX_DIM, 0)
        rnd = _int_field(header, "round", -1, MAX_ROUND, -1)
        upload_s = header.get("upload_s")
        if upload_s is not None and not (_is_number(upload_s, MAX_SECONDS) and upload_s >= 0):
            raise MessageRejected(
                "fields", f"status 'upload_s' must be a number of seconds in [0, {MAX_SECONDS:g}]"
            )
        versions = _flat_object(header, "versions")
        if not all(isinstance(v, str) and len(v) <= MAX_TEXT for v in versions.values()):
            raise MessageRejected("fields", "status 'versions' must map names to short strings")
        return Status(
            client=client,
            state=state,
            samples=dict(samples),
            backend=_text_field(header, "backend", ""),
            dim=dim,
            versions=dict(versions),
            round=rnd,
            upload_s=float(upload_s) if upload_s is not None else None,
            hello=kind == "hello",
            session=_text_field(header, "session", ""),
            sig=_text_field(header, "sig", ""),
        )
    if kind == "global":
        have = header.get("have", [])
        if (
            not isinstance(have, list)
            or len(have) > MAX_HAVE
            or not all(isinstance(c, str) and _ID_RE.match(c) for c in have)
        ):
            raise MessageRejected("fields", "global 'have' must be a list of client ids")
        train = _flat_object(header, "train") if "train" in header else {}
        _check_train(train)
        rnd = _int_field(header, "round", 0, MAX_ROUND)
        if not body:
            raise MessageRejected("fields", "global needs a round >= 0 and a frame")
        return GlobalModel(
            job=_text_field(header, "job", ident=True),
            round=rnd,
            frame=body,
            seed=_int_field(header, "seed", *SEED_RANGE),
            train=train,
            have=tuple(have),
            session=_text_field(header, "session", ""),
            rounds=_int_field(header, "rounds", 0, MAX_ROUND),
            sig=_text_field(header, "sig", ""),
            weighting=_text_field(header, "weighting", ""),
        )
    if kind == "update":
        metrics = _flat_object(header, "metrics") if "metrics" in header else {}
        _check_metrics(metrics)
        samples = _int_field(header, "samples", 0, MAX_SAMPLES)
        rnd = _int_field(header, "round", 0, MAX_ROUND)
        if not body:
            raise MessageRejected("fields", "update needs samples >= 0, round >= 0 and a frame")
        return Update(
            job=_text_field(header, "job", ident=True),
            round=rnd,
            client=_text_field(header, "client", ident=True),
            samples=samples,
            metrics=metrics,
            frame=body,
            session=_text_field(header, "session", ""),
            sig=_text_field(header, "sig", ""),
        )
    if kind == "control":
        state = _need(header, "state", str)
        if state not in CONTROL_STATES:
            raise MessageRejected("fields", f"unknown control state {state!r}")
        return Control(
            job=_text_field(header, "job", ident=True),
            state=state,
            round=_int_field(header, "round", -1, MAX_ROUND),
            rounds=_int_field(header, "rounds", 0, MAX_ROUND),
            session=_text_field(header, "session", ""),
            sig=_text_field(header, "sig", ""),
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
