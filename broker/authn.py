"""Signed protocol messages: who sent a hello, status, update, global or control, end to end.

The broker's ACL says who may publish on a topic; the broker, its operator and anyone holding a
device's credentials can still publish anything there (a replayed update relabelled for a new
round was accepted before this). Each message is signed with its sender's Ed25519 key over
`fedclip_edge.signing.signed_bytes`: type, job, round, client, session and a digest of
everything else that matters in the message:

- update: the frame's own sha256, its last 32 bytes (the frame names job, round and client
  again; the receiver's `decode_frame` checks that digest against the frame's bytes, so the
  signature covers every byte without hashing a 2 MB frame twice);
- global: the frame's sha256 and the job settings devices act on (seed, train, rounds); the
  `have` list is left out: it changes with every re-publication and only asks for re-sends;
- hello/status: the device's description (state, samples, backend, dim, versions, round,
  upload time);
- control: its state, round and rounds (a forged "done" must not end a job).

Every message also carries the job run it belongs to (`run`, signed as its own field; empty in a
device's hello before it saw any: broker/runbind.py says who checks it and how).

A signature therefore verifies for no other round, job, run, client, session or message type.
Verification failures are `MessageRejected` with the signing module's reason
(`bad_signature`, `unknown_key`, `malformed_signature`) or `unsigned`, so the aggregator and the
agent count them like every other rejection.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedclip_edge.broker import protocol as P
from fedclip_edge.broker.hierarchy import SITE_BACKEND
from fedclip_edge.signing import (
    KeyRegistry,
    SignatureRejected,
    decode_signature,
    encode_signature,
    sign_message,
    verify_message,
)


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _status_digest(st: P.Status) -> bytes:
    return hashlib.sha256(
        _canonical(
            {
                "hello": st.hello,
                "state": st.state,
                "samples": st.samples,
                "backend": st.backend,
                "dim": st.dim,
                "versions": st.versions,
                "round": st.round,
                "upload_s": None if st.upload_s is None else float(st.upload_s),
            }
        )
    ).digest()


def _frame_digest(frame: bytes) -> bytes:
    """A wire frame ends with the sha256 of everything before it (fedclip_edge.wire)."""
    return bytes(frame[-32:]) if len(frame) >= 32 else hashlib.sha256(frame).digest()


def _global_digest(g: P.GlobalModel) -> bytes:
    h = hashlib.sha256(_frame_digest(g.frame))
    fields: dict[str, Any] = {"seed": g.seed, "train": g.train, "rounds": g.rounds}
    if g.delta:  # a compressed global's codec, base round and digest are signed too
        fields["delta"] = g.delta
    h.update(_canonical(fields))
    return h.digest()


def _fields(msg: P.Message, job: str) -> dict[str, Any]:
    """The signed tuple of a message; `job` is the topic's for statuses (which carry none)."""
    if isinstance(msg, P.Update):
        return {
            "type": "update",
            "job": msg.job,
            "round": msg.round,
            "client": msg.client,
            "session": msg.session,
            "frame_sha256": _frame_digest(msg.frame),
        }
    if isinstance(msg, P.GlobalModel):
        return {
            "type": "global",
            "job": msg.job,
            "round": msg.round,
            "client": P.AGGREGATOR_ID,
            "session": msg.session,
            "frame_sha256": _global_digest(msg),
        }
    if isinstance(msg, P.Control):
        return {
            "type": "control",
            "job": msg.job,
            "round": max(0, msg.round),
            "client": P.AGGREGATOR_ID,
            "session": msg.session,
            "frame_sha256": hashlib.sha256(
                _canonical({"state": msg.state, "round": msg.round, "rounds": msg.rounds})
            ).digest(),
        }
    if isinstance(msg, P.Status):
        return {
            "type": "hello" if msg.hello else "status",
            "job": job,
            "round": 0,
            "client": msg.client,
            "session": msg.session,
            "frame_sha256": _status_digest(msg),
        }
    raise TypeError(f"cannot sign a {type(msg).__name__}")


def sign(msg: Any, key: Ed25519PrivateKey, *, job: str = "") -> Any:
    """A copy of `msg` carrying its sender's signature (statuses need the topic's `job`)."""
    sig = sign_message(key, **_fields(msg, job), run=msg.run)
    return dataclasses.replace(msg, sig=encode_signature(sig))


def verify(msg: Any, registry: KeyRegistry, *, job: str = "", key_id: str | None = None) -> str:
    """The key id whose signature `msg` carries (default: the message's client; the
    aggregator's messages are checked against `key_id="aggregator"`); `MessageRejected`
    otherwise."""
    if not msg.sig:
        raise P.MessageRejected("unsigned", f"unsigned {type(msg).__name__.lower()} message")
    try:
        return verify_message(registry, decode_signature(msg.sig), key_id=key_id,
                              run=msg.run, **_fields(msg, job))
    except SignatureRejected as exc:
        raise P.MessageRejected(exc.reason, _with_fix(msg, exc.reason, str(exc))) from None


def _with_fix(msg: Any, reason: str, text: str) -> str:
    """An unknown key's refusal says what to do: the operator's usual slip is a key left out
    of the registry (a site's above all: its key goes to the CENTRAL's --site-keys)."""
    if reason != "unknown_key" or not isinstance(msg, P.Status):
        return text
    who = msg.client
    if msg.backend == SITE_BACKEND:
        return (f"site not registered at the central: copy its public key ({who}.pub, made "
                f"with the site's keys) to the central's --site-keys folder ({text})")
    return (f"device {who} is not registered: copy its public key ({who}.pub) to the "
            f"aggregator's --device-keys folder ({text})")


def signed_will(client: str, job: str, session: str, key: Ed25519PrivateKey | None) -> bytes:
    """The offline status the broker sends for a device that vanishes, signed in advance."""
    st = P.Status(client, "offline", session=session)
    return (sign(st, key, job=job) if key is not None else st).encode()


def signature_holds(msg: Any, registry: KeyRegistry | None, signed: bool) -> bool:
    """Whether `msg`'s signature verifies (True when the job is unsigned): checked on the
    envelope before any frame is decoded, so a forged or oversized frame costs a verification
    (the signature covers the frame's trailing digest), never a decode."""
    if not signed:
        return True
    if registry is None:
        return False
    try:
        verify(msg, registry)
    except P.MessageRejected:
        return False
    return True
