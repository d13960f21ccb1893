"""Ed25519 signatures: who sent an update or a global, and who exported an artifact.

The broker's ACL says who may publish on a topic, but the broker, its operator and anyone holding
a device's broker credentials can still publish anything. A signature binds a message to the key
of the device (or aggregator) that made it, end to end.

What is signed is a canonical, domain-separated encoding of the message's identifying fields
(type, job, round, client, session, the job's run) and the sha256 of its frame, so a signature
lifted from one message verifies for no other round, job, run, client, session or type.
Artifact signatures cover the manifest's exact bytes; the manifest lists every file's sha256,
so the signature authenticates every file.

Key files: `<id>.key` (PEM PKCS8, mode 0600, refused if group/other can read it, as ssh does)
and `<id>.pub` (PEM SubjectPublicKeyInfo). A `KeyRegistry` (a folder of `*.pub` files, or one
file) lists who may take part.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import stat
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedclip_edge.errors import SigningError

# Different domains for different uses: a message signature can never pass as an artifact's.
MESSAGE_DOMAIN = b"fedclip-edge/sig/v1\0"
ARTIFACT_DOMAIN = b"fedclip-edge/artifact-manifest/v1\0"
SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32
ARTIFACT_SIGNATURE_FILE = "manifest.sig"
_MANIFEST_FILE = "manifest.json"  # exporters.names.MANIFEST_FILE; not imported, keeps this light
# Ids become file names and MQTT topic levels: the same rule as protocol.check_id.
_ID_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_MAX_FIELD_BYTES = 1024
_MAX_REGISTRY_BYTES = 16 * 1024 * 1024

REASONS: frozenset[str] = frozenset({"bad_signature", "unknown_key", "malformed_signature"})


class SignatureRejected(SigningError):
    """A signature refused for one `reason` (one of `REASONS`), countable without parsing text."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown signature rejection reason {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message


# ----------------------------------------------------------------------------- keys


def check_key_id(key_id: str) -> str:
    """Key ids are device ids: 1-64 characters of A-Z a-z 0-9 _ . - (file names, topics)."""
    if not isinstance(key_id, str) or not _ID_RE.match(key_id):
        raise SigningError(f"key id {key_id!r} must be 1-64 characters of A-Z a-z 0-9 _ . -")
    return key_id


def public_bytes(key: Ed25519PublicKey | Ed25519PrivateKey) -> bytes:
    """The 32 raw bytes of a public key (of a private key: its public half)."""
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """`SHA256:<base64>` of the raw public key, like ssh-keygen -l, to compare keys by eye."""
    digest = hashlib.sha256(public_bytes(key)).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def _write_private(path: Path, data: bytes) -> None:
    """Create `path` with mode 0600 from the first byte on (os.open with the mode, O_EXCL: never
    an existing file whose mode we did not set)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def new_keypair(out_dir: Path | str, key_id: str, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Make `<out_dir>/<key_id>.key` (private, 0600) and `<key_id>.pub`; returns both paths.

    Refuses to replace an existing key unless `overwrite`: a device's key is its identity, and
    losing it silently locks the device out of the federation.
    """
    check_key_id(key_id)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SigningError(f"cannot create key folder {out}: {exc.strerror or exc}") from None
    if not out.is_dir():
        raise SigningError(f"key folder {out} is not a directory")
    key_path, pub_path = out / f"{key_id}.key", out / f"{key_id}.pub"
    if not overwrite:
        for p in (key_path, pub_path):
            if p.exists() or p.is_symlink():
                raise SigningError(f"{p} exists; refusing to replace a key (use --force)")
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    pub_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # Write both under temporary names, then rename: a crash leaves no half-made key pair.
    tmp_key = out / f".{key_id}.key.tmp-{os.getpid()}"
    tmp_pub = out / f".{key_id}.pub.tmp-{os.getpid()}"
    try:
        for tmp in (tmp_key, tmp_pub):
            if tmp.exists() or tmp.is_symlink():
                tmp.unlink()
        _write_private(tmp_key, pem)
        tmp_pub.write_bytes(pub_pem)
        os.chmod(tmp_pub, 0o644)
        os.replace(tmp_pub, pub_path)
        os.replace(tmp_key, key_path)
    except OSError as exc:
        for tmp in (tmp_key, tmp_pub):
            if tmp.exists():
                tmp.unlink()
        raise SigningError(
            f"cannot write key pair {key_id} in {out}: {exc.strerror or exc}"
        ) from None
    return key_path, pub_path


def _read_key_file(path: Path, what: str, limit: int = 64 * 1024) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise SigningError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise SigningError(f"{what} {path} is a directory, not a key file") from None
    except OSError as exc:
        raise SigningError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise SigningError(f"{what} {path} is larger than {limit} bytes: not a key file")
    return data


def load_private_key(path: Path | str) -> Ed25519PrivateKey:
    """Load an Ed25519 private key; refuses one that group or others may read (like ssh)."""
    path = Path(path)
    data = _read_key_file(path, "private key")
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if os.name == "posix" and mode & 0o077:
        raise SigningError(
            f"private key {path} is accessible by group or others (mode {mode:04o}): "
            f"run chmod 600 {path}"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise SigningError(f"private key {path} is encrypted: use an unencrypted key") from None
    except Exception:  # cryptography raises ValueError or UnsupportedAlgorithm for junk
        raise SigningError(f"{path} is not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"private key {path} is {type(key).__name__}, not an Ed25519 key")
    return key


def _parse_public(data: bytes, where: str) -> Ed25519PublicKey:
    """A PEM SubjectPublicKeyInfo, or the base64 of the 32 raw bytes."""
    text = data.strip()
    if text.startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(text)
        except Exception:
            raise SigningError(f"{where} is not a valid PEM public key") from None
        if not isinstance(key, Ed25519PublicKey):
            raise SigningError(f"{where} is {type(key).__name__}, not an Ed25519 public key")
        return key
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SigningError(f"{where} is neither PEM nor base64 of an Ed25519 public key") from None
    if len(raw) != PUBLIC_KEY_BYTES:
        raise SigningError(
            f"{where} decodes to {len(raw)} bytes; an Ed25519 public key has {PUBLIC_KEY_BYTES}"
        )
    return Ed25519PublicKey.from_public_bytes(raw)


def load_public_key(path: Path | str) -> Ed25519PublicKey:
    """Load an Ed25519 public key file (PEM, or one line of base64 of the raw key)."""
    path = Path(path)
    return _parse_public(_read_key_file(path, "public key"), f"public key {path}")


def public_key_line(key_id: str, key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """One line of a registry file: `<id>  <base64 raw key>`."""
    return f"{check_key_id(key_id)}  {base64.b64encode(public_bytes(key)).decode('ascii')}"


class KeyRegistry:
    """Who may take part: key id -> public key. A key id is the device (or aggregator) id.

    One public key under two ids is refused: it would let one key holder speak as two devices.
    """

    def __init__(self, keys: Mapping[str, Ed25519PublicKey]) -> None:
        seen: dict[bytes, str] = {}
        for key_id, key in keys.items():
            check_key_id(key_id)
            raw = public_bytes(key)
            if raw in seen:
                raise SigningError(f"key ids {seen[raw]!r} and {key_id!r} have the same public key")
            seen[raw] = key_id
        self._keys = dict(keys)

    @classmethod
    def load(cls, path: Path | str) -> KeyRegistry:
        """A folder of `<id>.pub` files, one `.pub` file (id = file stem), or a file of
        `<id>  <base64 key>` lines (blank lines and `#` comments allowed)."""
        path = Path(path)
        if path.is_dir():
            files = sorted(path.glob("*.pub"))
            if not files:
                raise SigningError(f"key registry {path} has no *.pub files")
            keys: dict[str, Ed25519PublicKey] = {}
            for f in files:
                keys[check_key_id(f.stem)] = load_public_key(f)
            return cls(keys)
        data = _read_key_file(path, "key registry", _MAX_REGISTRY_BYTES)
        if data.lstrip().startswith(b"-----BEGIN"):
            return cls({check_key_id(path.stem): _parse_public(data, f"public key {path}")})
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise SigningError(f"key registry {path} is not UTF-8 text") from None
        keys = {}
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2:
                raise SigningError(f"{path}:{n}: expected '<id>  <base64 public key>'")
            key_id, b64 = parts
            if not _ID_RE.match(key_id):
                raise SigningError(f"{path}:{n}: key id {key_id!r} is not a valid id")
            if key_id in keys:
                raise SigningError(f"{path}:{n}: key id {key_id!r} is listed twice")
            keys[key_id] = _parse_public(b64.encode("ascii", "replace"), f"{path}:{n}")
        if not keys:
            raise SigningError(f"key registry {path} lists no keys")
        return cls(keys)

    def get(self, key_id: str) -> Ed25519PublicKey | None:
        return self._keys.get(key_id)

    def ids(self) -> list[str]:
        return sorted(self._keys)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids())


# ----------------------------------------------------------------------------- messages


def _field(name: str, value: bytes) -> bytes:
    if len(value) > _MAX_FIELD_BYTES:
        raise ValueError(f"{name} is {len(value)} bytes, above {_MAX_FIELD_BYTES}")
    tag = name.encode("ascii")
    return struct.pack(">B", len(tag)) + tag + struct.pack(">I", len(value)) + value


def _text(name: str, value: Any, *, empty_ok: bool = False) -> bytes:
    if not isinstance(value, str) or (not value and not empty_ok):
        raise ValueError(
            f"{name} must be a {'' if empty_ok else 'non-empty '}string, got {value!r}"
        )
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name} is not encodable as UTF-8") from None


def _digest(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray)) and len(value) == 32:
        return bytes(value)
    if isinstance(value, str) and len(value) == 64:
        try:
            return bytes.fromhex(value)
        except ValueError:
            pass
    raise ValueError("frame_sha256 must be 32 bytes or 64 hex characters")


def signed_bytes(
    *, type: str, job: str, round: int, client: str, session: str, frame_sha256: bytes | str,
    run: str = "",
) -> bytes:
    """The exact bytes a message signature covers: a fixed domain tag, then each field as
    tag + u32 length + value in a fixed order, so no two field tuples encode alike. The job
    run (`run`, broker/runbind.py) is a last tagged field, present only when not empty."""
    if isinstance(round, bool) or not isinstance(round, int) or not 0 <= round < 2**63:
        raise ValueError(f"round must be an integer in [0, 2**63), got {round!r}")
    return MESSAGE_DOMAIN + b"".join(
        (
            _field("type", _text("type", type)),
            _field("job", _text("job", job)),
            _field("round", struct.pack(">Q", round)),
            _field("client", _text("client", client)),
            _field("session", _text("session", session, empty_ok=True)),
            _field("frame_sha256", _digest(frame_sha256)),
            _field("run", _text("run", run, empty_ok=True)) if run else b"",
        )
    )


def sign_message(
    key: Ed25519PrivateKey,
    *,
    type: str,
    job: str,
    round: int,
    client: str,
    session: str,
    frame_sha256: bytes | str,
    run: str = "",
) -> bytes:
    """The 64-byte signature of a message's identifying fields and its frame's sha256."""
    return key.sign(
        signed_bytes(
            type=type,
            job=job,
            round=round,
            client=client,
            session=session,
            frame_sha256=frame_sha256,
            run=run,
        )
    )


def verify_message(
    registry: KeyRegistry,
    signature: Any,
    *,
    type: str,
    job: str,
    round: int,
    client: str,
    session: str,
    frame_sha256: bytes | str,
    key_id: str | None = None,
    run: str = "",
) -> str:
    """Check a message's signature against the registered key of `key_id` (default: `client`,
    the sender of an update); returns the key id. `SignatureRejected` if it does not verify."""
    signer = client if key_id is None else key_id
    if not isinstance(signature, (bytes, bytearray)) or len(signature) != SIGNATURE_BYTES:
        got = len(signature) if isinstance(signature, (bytes, bytearray)) else type_name(signature)
        raise SignatureRejected(
            "malformed_signature", f"signature must be {SIGNATURE_BYTES} bytes, got {got}"
        )
    key = registry.get(signer) if isinstance(signer, str) else None
    if key is None:
        raise SignatureRejected("unknown_key", f"no registered key for {signer!r}")
    try:
        message = signed_bytes(
            type=type,
            job=job,
            round=round,
            client=client,
            session=session,
            frame_sha256=frame_sha256,
            run=run,
        )
    except ValueError as exc:  # a field nobody can have signed
        raise SignatureRejected(
            "bad_signature", f"message fields cannot be signed: {exc}"
        ) from None
    try:
        key.verify(bytes(signature), message)
    except InvalidSignature:
        raise SignatureRejected(
            "bad_signature", f"signature does not verify with the registered key of {signer!r} "
            "(signed with another key? each device signs with its own <id>.key)"
        ) from None
    return signer


def type_name(value: Any) -> str:
    return type(value).__name__


def encode_signature(signature: bytes) -> str:
    """A signature as text for a JSON header (base64)."""
    return base64.b64encode(signature).decode("ascii")


def decode_signature(text: Any) -> bytes:
    """The inverse of `encode_signature`; `malformed_signature` for anything else."""
    if not isinstance(text, str) or len(text) > 4 * SIGNATURE_BYTES:
        raise SignatureRejected("malformed_signature", "signature must be a base64 string")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise SignatureRejected("malformed_signature", "signature is not valid base64") from None
    if len(raw) != SIGNATURE_BYTES:
        raise SignatureRejected(
            "malformed_signature", f"signature is {len(raw)} bytes, not {SIGNATURE_BYTES}"
        )
    return raw


# ----------------------------------------------------------------------------- artifacts


def sign_artifact(root: Path | str, key: Ed25519PrivateKey) -> Path:
    """Write `manifest.sig` over the exact bytes of `root/manifest.json`; returns its path.

    The manifest lists every file's sha256 and size, so signing it authenticates the artifact.
    """
    root = Path(root)
    manifest = root / _MANIFEST_FILE
    try:
        data = manifest.read_bytes()
    except OSError as exc:
        raise SigningError(
            f"cannot sign {root}: {manifest} unreadable ({exc.strerror or exc})"
        ) from None
    record = {
        "alg": "ed25519",
        "key": fingerprint(key),
        "signature": encode_signature(key.sign(ARTIFACT_DOMAIN + data)),
    }
    out = root / ARTIFACT_SIGNATURE_FILE
    tmp = root / (ARTIFACT_SIGNATURE_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, out)
    return out


def verify_artifact_signature(
    root: Path | str, pubkey: Ed25519PublicKey | Path | str
) -> dict[str, Any]:
    """Authenticate an artifact: `manifest.sig` verifies against `pubkey` over the manifest's
    exact bytes, and every file matches the hash that signed manifest lists. Returns the
    manifest. `SignatureRejected` for a signature problem, `ExportError` for a changed file."""
    from fedclip_edge.exporters.manifest import validate_manifest, verify_artifact

    root = Path(root)
    key = pubkey if isinstance(pubkey, Ed25519PublicKey) else load_public_key(pubkey)
    sig_path = root / ARTIFACT_SIGNATURE_FILE
    if not (root / _MANIFEST_FILE).is_file():
        raise SigningError(f"{root} has no {_MANIFEST_FILE}: not an exported artifact")
    if not sig_path.is_file():
        raise SignatureRejected(
            "malformed_signature", f"artifact {root} is not signed (no {ARTIFACT_SIGNATURE_FILE})"
        )
    data = (root / _MANIFEST_FILE).read_bytes()  # read once: the bytes verified are the bytes used
    try:
        record = json.loads(_read_key_file(sig_path, "artifact signature").decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise SignatureRejected("malformed_signature", f"{sig_path} is not JSON") from None
    if not isinstance(record, dict) or record.get("alg") != "ed25519":
        raise SignatureRejected("malformed_signature", f"{sig_path} is not an ed25519 signature")
    signature = decode_signature(record.get("signature"))
    try:
        key.verify(signature, ARTIFACT_DOMAIN + data)
    except InvalidSignature:
        raise SignatureRejected(
            "bad_signature",
            f"artifact {root}: manifest signature (key {record.get('key')}) does not verify "
            f"with the given key {fingerprint(key)}",
        ) from None
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise SigningError(f"{root / _MANIFEST_FILE} is not valid JSON") from None
    if not isinstance(manifest, dict):
        raise SigningError(f"{root / _MANIFEST_FILE} is not a JSON object")
    validate_manifest(manifest)
    return verify_artifact(root, manifest)
