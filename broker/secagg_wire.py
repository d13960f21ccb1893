"""Secure aggregation's messages over MQTT, and the crypto both ends share (docs/privacy.md,
"Secure aggregation over MQTT").

Why apart: the aggregator (`secagg_round.py`) and the device (`device_agent/secagg_device.py`)
must build, sign and read the same bytes, derive the same share keys and the same fixed point;
the protocol's arithmetic itself (masks, Shamir) is `fedclip_edge.privacy.secagg`.

A message is one envelope of type `secagg`: a small JSON header (step, job, round, client,
attempt, session, sig, `data`) and a body (the masked vector as little-endian uint64, or the
JSON of the share ciphertexts, which can outgrow a header). It is signed with the sender's
Ed25519 key over job, round, client, session and the sha256 of step, attempt, data and body,
so a signature verifies for no other step, attempt or content.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedclip_edge.broker.envelope import (
    MessageRejected,
    _is_int,
    decode_envelope,
    encode_envelope,
    peek_type,
)
from fedclip_edge.broker.topics import _ID_RE
from fedclip_edge.privacy.secagg import PRIME, FixedPoint, agreed_seed
from fedclip_edge.signing import (
    KeyRegistry,
    SignatureRejected,
    decode_signature,
    encode_signature,
    sign_message,
    verify_message,
)

SECAGG = "secagg"
STEPS = ("keys", "roster", "shares", "deal", "masked", "survivors", "reveal")
BITS = 62  # fixed-point bits: sums mod 2**62 stay exact in uint64 arithmetic
SHARE_BYTES = 66  # a Shamir share's y, an element of the field 2**521 - 1
MAX_ROUND = 10**9


def threshold(n: int) -> int:
    """t for a roster of n: max(2, ceil(2n/3)), a strict majority, so survivors of two
    disjoint halves can never both reconstruct."""
    return max(2, math.ceil(2 * n / 3))


def fixed_point(clip: float, max_weight: float, n: int) -> FixedPoint:
    """The round's fixed point: w x delta with |delta| <= clip, w <= max_weight, n summands."""
    return FixedPoint(range=float(clip) * float(max_weight), max_summands=n, bits=BITS)


def context(job: str, rnd: int, attempt: str) -> bytes:
    """What masks and share keys are bound to: a retried round never reuses a mask."""
    return f"{job}|{rnd}|{attempt}".encode()


@dataclass(frozen=True)
class SecAggMessage:
    step: str
    job: str
    round: int
    client: str  # the sender: a device id, or "aggregator"
    attempt: str = ""  # "" for keys (the device does not know the attempt yet)
    data: dict[str, Any] = field(default_factory=dict)
    body: bytes = b""
    session: str = ""
    sig: str = ""
    run: str = ""  # the job run (broker/runbind.py): the run of the round's global

    def encode(self) -> bytes:
        header = {"type": SECAGG, "step": self.step, "job": self.job, "round": self.round,
                  "client": self.client, "attempt": self.attempt, "data": self.data}
        if self.session:
            header["session"] = self.session
        if self.run:
            header["run"] = self.run
        if self.sig:
            header["sig"] = self.sig
        return encode_envelope(header, self.body)

    def body_json(self) -> Any:
        """The body as JSON (shares, deal); MessageRejected when it is not."""
        try:
            return json.loads(bytes(self.body).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise MessageRejected("secagg", f"{self.step} body is not JSON") from None


def is_secagg(payload: bytes) -> bool:
    return peek_type(payload) == SECAGG


def decode(payload: bytes, max_bytes: int = 1 << 30) -> SecAggMessage:
    """An untrusted payload -> a message with typed fields; MessageRejected otherwise."""
    header, body = decode_envelope(payload, max_bytes)
    if header.get("type") != SECAGG:
        raise MessageRejected("type", "not a secure-aggregation message")
    step, job, client = header.get("step"), header.get("job"), header.get("client")
    rnd, attempt, data = header.get("round"), header.get("attempt", ""), header.get("data", {})
    session, sig = header.get("session", ""), header.get("sig", "")
    run = header.get("run", "")
    if (step not in STEPS or not isinstance(job, str) or not _ID_RE.match(job)
            or not isinstance(client, str) or not _ID_RE.match(client)
            or not _is_int(rnd) or not 0 <= rnd <= MAX_ROUND
            or not isinstance(attempt, str) or len(attempt) > 64
            or not isinstance(data, dict) or not isinstance(session, str) or len(session) > 128
            or not isinstance(sig, str) or len(sig) > 256
            or not isinstance(run, str) or len(run) > 64):
        raise MessageRejected("secagg", f"malformed secure-aggregation message ({step!r})")
    return SecAggMessage(step, job, rnd, client, attempt, data, bytes(body), session, sig, run)


def _digest(m: SecAggMessage) -> bytes:
    h = hashlib.sha256(json.dumps({"step": m.step, "attempt": m.attempt, "data": m.data},
                                  sort_keys=True, separators=(",", ":")).encode())
    h.update(hashlib.sha256(m.body).digest())
    return h.digest()


def sign(m: SecAggMessage, key: Ed25519PrivateKey | None) -> SecAggMessage:
    """A copy carrying the sender's signature (unsigned jobs: unchanged)."""
    if key is None:
        return m
    sig = sign_message(key, type=SECAGG, job=m.job, round=m.round, client=m.client,
                       session=m.session, frame_sha256=_digest(m), run=m.run)
    return replace(m, sig=encode_signature(sig))


def verify(m: SecAggMessage, registry: KeyRegistry | None, *, key_id: str | None = None) -> None:
    """MessageRejected unless `m` is signed by `key_id` (default its client); a None registry
    (an unsigned job) accepts everything."""
    if registry is None:
        return
    if not m.sig:
        raise MessageRejected("unsigned", f"unsigned secure-aggregation {m.step} message")
    try:
        verify_message(registry, decode_signature(m.sig), key_id=key_id, type=SECAGG, job=m.job,
                       round=m.round, client=m.client, session=m.session,
                       frame_sha256=_digest(m), run=m.run)
    except SignatureRejected as exc:
        raise MessageRejected(exc.reason, str(exc)) from None


# ---- values in JSON ------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: Any, size: int | None = None) -> bytes:
    """Base64 from an untrusted message; MessageRejected when malformed or of the wrong size."""
    try:
        raw = base64.b64decode(str(text), validate=True)
    except (ValueError, TypeError):
        raise MessageRejected("secagg", "a value is not base64") from None
    if size is not None and len(raw) != size:
        raise MessageRejected("secagg", f"a value is {len(raw)} bytes, expected {size}")
    return raw


def ids(value: Any, what: str) -> list[str]:
    """A sorted list of distinct client ids from an untrusted message."""
    if (not isinstance(value, list) or not all(isinstance(c, str) and _ID_RE.match(c)
                                                for c in value) or len(set(value)) != len(value)):
        raise MessageRejected("secagg", f"{what} is not a list of distinct client ids")
    return sorted(value)


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def agreed(sk: X25519PrivateKey, peer_pk: bytes, me: str, peer: str, ctx: bytes) -> bytes:
    """The pair's mask seed (`privacy.secagg.agreed_seed`), as both ends call it."""
    return agreed_seed(sk, peer_pk, me=me, peer=peer, context=ctx)


def pack_share(y: int) -> str:
    return b64(y.to_bytes(SHARE_BYTES, "big"))


def unpack_share(text: Any) -> int:
    y = int.from_bytes(unb64(text, SHARE_BYTES), "big")
    if y >= PRIME:
        raise MessageRejected("secagg", "a share is outside the field")
    return y


def vector_bytes(v: np.ndarray) -> bytes:
    return np.asarray(v, dtype="<u8").tobytes()


def vector_of(body: bytes, length: int) -> np.ndarray:
    if len(body) != 8 * length:
        raise MessageRejected("secagg", f"masked vector of {len(body)} bytes, expected "
                              f"{8 * length}")
    v = np.frombuffer(body, dtype="<u8").astype(np.uint64)
    if v.size and int(v.max()) >= 1 << BITS:
        raise MessageRejected("secagg", f"masked vector has values outside 2**{BITS}")
    return v


def flatten(state: dict[str, torch.Tensor]) -> np.ndarray:
    """An adapter as one float64 vector, parameters in name order (both ends agree)."""
    return np.concatenate([state[k].detach().double().reshape(-1).numpy()
                           for k in sorted(state)])


def unflatten(vec: np.ndarray, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, at = {}, 0
    for k in sorted(like):
        n = like[k].numel()
        out[k] = torch.from_numpy(vec[at:at + n].copy()).reshape(like[k].shape).to(like[k].dtype)
        at += n
    return out


# ---- the shares' encryption ------------------------------------------------------------------


def share_cipher(c_sk: X25519PrivateKey, peer_c_pk: bytes, ctx: bytes) -> ChaCha20Poly1305:
    """The pair's share-encryption key: HKDF-SHA256 of their X25519 secret, bound to the
    round's context (both ends derive the same)."""
    shared = c_sk.exchange(X25519PublicKey.from_public_bytes(peer_c_pk))
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
               info=b"fedclip-edge secagg shares v1|" + ctx).derive(shared)
    return ChaCha20Poly1305(key)


def seal(cipher: ChaCha20Poly1305, sender: str, recipient: str, plain: bytes,
         nonce: bytes) -> str:
    ad = f"{sender}>{recipient}".encode()
    return b64(nonce + cipher.encrypt(nonce, plain, ad))


def unseal(cipher: ChaCha20Poly1305, sender: str, recipient: str, text: Any) -> bytes:
    raw = unb64(text)
    if len(raw) < 12 + 16:
        raise MessageRejected("secagg", "a share ciphertext is too short")
    try:
        return cipher.decrypt(raw[:12], raw[12:], f"{sender}>{recipient}".encode())
    except InvalidTag:
        raise MessageRejected("secagg", f"the shares from {sender} do not decrypt") from None
