"""The messages: hello/status, global, update, control; typed, bounded, with signed fields.

Each message encodes to one envelope (`fedclip_edge.broker.envelope`); `decode_message` turns
a whole (reassembled) payload back into one, every field checked (`fedclip_edge.broker.fields`).
Signed messages carry `session` and `sig` (Ed25519, base64; see broker/authn.py), absent from
unsigned ones so older peers see no change; `run` (the job run they belong to, signed with
them: broker/runbind.py) is absent when empty.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedclip_edge.broker.envelope import (
    MAX_MESSAGE_BYTES,
    MessageRejected,
    _is_int,
    decode_envelope,
    encode_envelope,
)
from fedclip_edge.broker.fields import (
    MAX_DIM,
    MAX_HAVE,
    MAX_ROUND,
    MAX_SAMPLES,
    MAX_SECONDS,
    MAX_TEXT,
    SEED_RANGE,
    _check_metrics,
    _check_train,
    _flat_object,
    _int_field,
    _is_number,
    _need,
    _text_field,
)
from fedclip_edge.broker.topics import _ID_RE
from fedclip_edge.global_fields import DERIVED, check_delta_fields

STATES = ("online", "offline", "training", "uploaded")
CONTROL_STATES = ("running", "done")


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
    run: str = ""  # the job run this device holds ("" before it saw one: broker/runbind.py)

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
                **_signed(self.session, self.sig, self.run),
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
    run: str = ""  # the job run (made at job start, kept by --resume: broker/runbind.py)
    # a compressed global (fedclip_edge.global_codec): {codec, base_round, digest}; {}: dense
    delta: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        extra = {"weighting": self.weighting} if self.weighting else {}
        if self.delta:
            extra["delta"] = self.delta
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
                **_signed(None, self.sig, self.run),
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
    run: str = ""  # the run of the global this update answers

    def encode(self) -> bytes:
        return encode_envelope(
            {
                "type": "update",
                "job": self.job,
                "round": self.round,
                "client": self.client,
                "samples": self.samples,
                "metrics": _finite(self.metrics),
                **_signed(self.session, self.sig, self.run),
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
    run: str = ""  # the job run it speaks for: a `done` ends that run only

    def encode(self) -> bytes:
        return encode_envelope(
            {
                "type": "control",
                "job": self.job,
                "state": self.state,
                "round": self.round,
                "rounds": self.rounds,
                **_signed(self.session, self.sig, self.run),
            }
        )


Message = Status | GlobalModel | Update | Control


def _signed(session: str | None, sig: str, run: str = "") -> dict[str, str]:
    """Header fields of a signed message; none for an unsigned one (old peers see no change)."""
    out = {} if session is None or not session else {"session": session}
    if sig:
        out["sig"] = sig
    if run:
        out["run"] = run
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
            run=_text_field(header, "run", ""),
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
        delta = _delta_field(header)
        if bool(body) == (delta.get("codec") == DERIVED):  # derived: the frame is empty
            raise MessageRejected("fields", "global needs a round >= 0 and a frame (none when "
                                  "derived)")
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
            run=_text_field(header, "run", ""),
            weighting=_text_field(header, "weighting", ""),
            delta=delta,
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
            run=_text_field(header, "run", ""),
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
            run=_text_field(header, "run", ""),
        )
    raise MessageRejected("type", f"a bare {kind!r} envelope is not a message")


def _delta_field(header: dict[str, Any]) -> dict[str, Any]:
    """A compressed global's {codec, base_round, digest} ({} for a dense one), checked."""
    if "delta" not in header:
        return {}
    try:
        return check_delta_fields(header["delta"])
    except ValueError as exc:
        raise MessageRejected("fields", f"global 'delta': {exc}") from None
