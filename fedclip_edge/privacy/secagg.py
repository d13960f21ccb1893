"""Primitives of pairwise-masked secure aggregation (Bonawitz et al., CCS 2017), and an
in-memory simulation of the protocol: the aggregator learns the sum of the round's updates and
nothing about any one of them, even when devices drop out after masking.

- `FixedPoint`: float updates become integers mod 2**bits (masks only hide what lives in a
  finite group). Values must lie in [-range, range]; each coordinate is rounded to a multiple
  of 1/scale, so a sum of n encoded vectors decodes with error at most n / (2 * scale) per
  coordinate, exactly as long as n * range * scale < 2**(bits - 1) (the constructor picks the
  largest scale that keeps `max_summands` vectors inside that range).
- `keypair`, `agreed_seed`: X25519 key agreement, then HKDF-SHA256 bound to the job, round and
  both device ids, gives each pair of devices a 32-byte seed nobody else knows.
- `expand_mask`: a seed becomes a mask vector by the ChaCha20 keystream (`cryptography`), a
  cryptographic PRG whose output is fixed by the seed alone (numpy's generators do not promise
  the same stream across versions; two devices must expand the same mask).
- `share_secret`, `reconstruct_secret`: Shamir's t-of-n sharing over the prime field
  2**521 - 1, for the devices' mask keys: any t survivors reconstruct a dropped device's key,
  fewer learn nothing.
- `simulate_round`: devices, the server, dropouts, in memory (the protocol's four steps,
  messages passed as Python values; encryption and signing of the shares in transit are the
  transport's job and are not simulated here).
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PRIME = 2**521 - 1  # a Mersenne prime: Shamir's field, large enough for a 32-byte secret
SEED_BYTES = 32


class RangeError(ValueError):
    """A value outside the fixed-point range: encoding it would wrap and corrupt the sum."""


# ---- fixed point -------------------------------------------------------------------------


@dataclass(frozen=True)
class FixedPoint:
    """Floats in [-range, range] as integers mod 2**bits, summable by up to `max_summands`."""

    range: float
    max_summands: int
    bits: int = 32

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 63:
            raise ValueError(f"bits must be in 2..63, got {self.bits}")
        if not self.range > 0 or self.max_summands < 1:
            raise ValueError("range must be > 0 and max_summands >= 1")
        if self.scale < 1:
            raise ValueError(f"{self.bits} bits cannot hold {self.max_summands} values of "
                             f"magnitude {self.range}: use more bits or a smaller range")

    @property
    def modulus(self) -> int:
        return 1 << self.bits

    @property
    def scale(self) -> int:
        """Units per 1.0: the largest integer with max_summands * range * scale < 2**(bits-1)."""
        return int(((1 << (self.bits - 1)) - 1) // (self.max_summands * self.range))

    def error_bound(self, summands: int) -> float:
        """The largest decoding error per coordinate of a sum of `summands` encoded vectors."""
        return summands / (2 * self.scale)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """round(x * scale) mod 2**bits as uint64; refuses values outside [-range, range]."""
        x = np.asarray(x, dtype=np.float64)
        if x.size and (not np.all(np.isfinite(x)) or float(np.max(np.abs(x))) > self.range):
            worst = float(np.max(np.abs(np.nan_to_num(x, nan=np.inf))))
            raise RangeError(f"update value {worst:g} is outside the secure-aggregation range "
                             f"[-{self.range:g}, {self.range:g}]: clip updates to that range")
        q = np.rint(x * self.scale).astype(np.int64)
        return (q % self.modulus).astype(np.uint64)

    def decode(self, total: np.ndarray) -> np.ndarray:
        """An encoded (sum) vector back to floats: values >= 2**(bits-1) are negative."""
        v = np.asarray(total, dtype=np.uint64) % np.uint64(self.modulus)
        signed = v.astype(np.int64)
        signed[v >= np.uint64(self.modulus >> 1)] -= self.modulus
        return signed.astype(np.float64) / self.scale

    def add(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a + b) % np.uint64(self.modulus)

    def sub(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        m = np.uint64(self.modulus)
        return (a + (m - b % m)) % m


# ---- key agreement and masks --------------------------------------------------------------


def keypair(randbytes: Callable[[int], bytes] = secrets.token_bytes
            ) -> tuple[X25519PrivateKey, bytes]:
    """An X25519 key pair: the private key and the raw 32-byte public key to publish."""
    sk = X25519PrivateKey.from_private_bytes(randbytes(32))
    return sk, sk.public_key().public_bytes_raw()


def agreed_seed(sk: X25519PrivateKey, peer_public: bytes, *, me: str, peer: str,
                context: bytes) -> bytes:
    """The pair's 32-byte mask seed: HKDF-SHA256 of the X25519 shared secret, bound to the
    two ids (sorted: both ends derive the same) and the context (job, round), so a seed never
    repeats across rounds even with the same keys."""
    shared = sk.exchange(X25519PublicKey.from_public_bytes(peer_public))
    a, b = sorted((me, peer))
    info = b"fedclip-edge secagg v1|" + context + b"|" + a.encode() + b"|" + b.encode()
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=info).derive(shared)


def expand_mask(seed: bytes, length: int, bits: int) -> np.ndarray:
    """`length` uniform integers mod 2**bits from the ChaCha20 keystream of `seed` (8 bytes a
    value, the low `bits` bits kept: uniform because 2**bits divides 2**64)."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a mask seed is {SEED_BYTES} bytes, got {len(seed)}")
    enc = Cipher(algorithms.ChaCha20(seed, b"\x00" * 16), mode=None).encryptor()
    stream = enc.update(b"\x00" * (8 * length))
    words = np.frombuffer(stream, dtype="<u8").astype(np.uint64)
    return words & np.uint64((1 << bits) - 1)


# ---- Shamir secret sharing ------------------------------------------------------------------


def share_secret(secret: bytes, n: int, t: int,
                 randbelow: Callable[[int], int] = secrets.randbelow) -> list[tuple[int, int]]:
    """t-of-n shares (x, y) of a secret of at most 64 bytes: y = f(x) for a random polynomial
    f of degree t - 1 with f(0) = secret, at x = 1..n."""
    if not 1 <= t <= n:
        raise ValueError(f"threshold must be in 1..n ({n}), got {t}")
    s = int.from_bytes(secret, "big")
    if s >= PRIME or len(secret) > 64:
        raise ValueError("secret too large for the field")
    coeffs = [s] + [randbelow(PRIME) for _ in range(t - 1)]
    shares = []
    for x in range(1, n + 1):
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares.append((x, y))
    return shares


def reconstruct_secret(shares: Iterable[tuple[int, int]], length: int = SEED_BYTES) -> bytes:
    """f(0) by Lagrange interpolation from t shares with distinct x (more shares are fine)."""
    pts = list(dict(shares).items())
    if not pts:
        raise ValueError("no shares")
    total = 0
    for i, (xi, yi) in enumerate(pts):
        num, den = 1, 1
        for j, (xj, _) in enumerate(pts):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
    if total >= 1 << (8 * length):  # fewer than t shares, or wrong ones: a random field value
        raise ValueError(f"the shares do not reconstruct a {length}-byte secret (fewer than "
                         f"the threshold, or not from one sharing)")
    return total.to_bytes(length, "big")


# ---- the protocol, in memory -----------------------------------------------------------------


class ProtocolError(RuntimeError):
    """The round cannot finish safely (too few survivors, a share request that would unmask)."""


@dataclass
class Device:
    """One device's secrets for a round: its mask key pair, its self-mask seed b, and the
    shares others gave it."""

    id: str
    index: int  # its Shamir x coordinate (1-based)
    mask_sk: X25519PrivateKey
    mask_pk: bytes
    self_seed: bytes
    held_key_shares: dict[str, tuple[int, int]] = field(default_factory=dict)
    held_seed_shares: dict[str, tuple[int, int]] = field(default_factory=dict)

    def masked_input(self, x: np.ndarray, fp: FixedPoint, peers: Mapping[str, bytes],
                     context: bytes) -> np.ndarray:
        """y = encode(x) + PRG(b) + sum_{v > me} PRG(s_uv) - sum_{v < me} PRG(s_uv)."""
        y = fp.add(fp.encode(x), expand_mask(self.self_seed, x.size, fp.bits))
        for v, pk in peers.items():
            if v == self.id:
                continue
            m = expand_mask(agreed_seed(self.mask_sk, pk, me=self.id, peer=v, context=context),
                            x.size, fp.bits)
            y = fp.add(y, m) if v > self.id else fp.sub(y, m)
        return y

    def unmask_shares(self, survivors: set[str], dropped: set[str]
                      ) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, int]]]:
        """Step 4: shares of the survivors' self-mask seeds and of the dropped devices' mask
        keys; never both for one device (that would unmask its input)."""
        if survivors & dropped:
            raise ProtocolError(f"asked to reveal both shares of {sorted(survivors & dropped)}")
        return ({v: self.held_seed_shares[v] for v in survivors},
                {v: self.held_key_shares[v] for v in dropped})


def simulate_round(inputs: Mapping[str, np.ndarray], fp: FixedPoint, threshold: int, *,
                   drop_after_masking: Iterable[str] = (), drop_before_masking: Iterable[str] = (),
                   context: bytes = b"job|round", seed: int | None = None
                   ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One round of the protocol: returns the decoded sum of the surviving devices' inputs and
    every masked vector the server saw. Devices in `drop_before_masking` shared their keys but
    never sent an input; those in `drop_after_masking` sent a masked input, then vanished
    before unmasking (their input counts in the sum: the server holds it). `seed` makes the
    devices' randomness reproducible (tests); None draws it from the OS."""
    rng = random.Random(seed) if seed is not None else None
    randbytes = rng.randbytes if rng is not None else secrets.token_bytes
    randbelow = (lambda n: rng.randrange(n)) if rng is not None else secrets.randbelow
    ids = sorted(inputs)
    n = len(ids)
    if not 1 <= threshold <= n:
        raise ValueError(f"threshold must be in 1..{n}, got {threshold}")
    # step 1: advertise keys
    devices = {}
    for i, u in enumerate(ids, start=1):
        sk, pk = keypair(randbytes)
        devices[u] = Device(u, i, sk, pk, randbytes(SEED_BYTES))
    public = {u: d.mask_pk for u, d in devices.items()}
    # step 2: share keys (t-of-n shares of each mask private key and self-mask seed)
    for u, d in devices.items():
        key_shares = share_secret(d.mask_sk.private_bytes_raw(), n, threshold, randbelow)
        seed_shares = share_secret(d.self_seed, n, threshold, randbelow)
        for v, ks, ss in zip(ids, key_shares, seed_shares, strict=True):
            devices[v].held_key_shares[u] = ks
            devices[v].held_seed_shares[u] = ss
    # step 3: masked inputs
    before = set(drop_before_masking)
    masked = {u: devices[u].masked_input(np.asarray(inputs[u]), fp, public, context)
              for u in ids if u not in before}
    sent = set(masked)
    dropped = set(ids) - sent
    # step 4: unmasking by the devices still there
    survivors = sent - set(drop_after_masking)
    if len(survivors) < threshold:
        raise ProtocolError(f"{len(survivors)} device(s) left to unmask, the threshold is "
                            f"{threshold}: the round's sum cannot be recovered")
    seed_shares: dict[str, list[tuple[int, int]]] = {u: [] for u in sent}
    key_shares: dict[str, list[tuple[int, int]]] = {u: [] for u in dropped}
    for v in sorted(survivors):
        ss, ks = devices[v].unmask_shares(sent, dropped)
        for u, s in ss.items():
            seed_shares[u].append(s)
        for u, s in ks.items():
            key_shares[u].append(s)
    length = next(iter(masked.values())).size if masked else 0
    total = np.zeros(length, dtype=np.uint64)
    for y in masked.values():
        total = fp.add(total, y)
    for u in sent:  # remove each sender's self mask
        b = reconstruct_secret(seed_shares[u][:threshold])
        total = fp.sub(total, expand_mask(b, length, fp.bits))
    for u in dropped:  # remove the pairwise masks the senders added against a dropped device
        sk = X25519PrivateKey.from_private_bytes(reconstruct_secret(key_shares[u][:threshold]))
        for v in sent:
            m = expand_mask(agreed_seed(sk, public[v], me=u, peer=v, context=context),
                            length, fp.bits)
            # v added +m when u > v, -m when u < v: undo it
            total = fp.sub(total, m) if u > v else fp.add(total, m)
    return fp.decode(total), masked

