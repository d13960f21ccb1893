"""Ed25519 signing: messages bound to their identifying fields, key files guarded like ssh's,
artifacts authenticated over their manifest."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedclip_edge.cli import main
from fedclip_edge.errors import ExportError, SigningError
from fedclip_edge.exporters.manifest import file_records, verify_artifact, write_manifest
from fedclip_edge.exporters.names import SCHEMA, SCHEMA_VERSION
from fedclip_edge.exporters.signature import sign_exported_artifact, verify_signed_artifact
from fedclip_edge.signing import (
    ARTIFACT_SIGNATURE_FILE,
    KeyRegistry,
    SignatureRejected,
    decode_signature,
    encode_signature,
    fingerprint,
    load_private_key,
    load_public_key,
    new_keypair,
    public_key_line,
    sign_artifact,
    sign_message,
    signed_bytes,
    verify_artifact_signature,
    verify_message,
)

FIELDS = {
    "type": "update",
    "job": "job-1",
    "round": 3,
    "client": "dev-1",
    "session": "s-42",
    "frame_sha256": hashlib.sha256(b"frame").digest(),
}
# One changed value per field: each must break the signature.
CHANGED = {
    "type": "global",
    "job": "job-2",
    "round": 4,
    "client": "dev-2",
    "session": "s-43",
    "frame_sha256": hashlib.sha256(b"other frame").digest(),
}


@pytest.fixture
def keys(tmp_path: Path) -> tuple[dict[str, Ed25519PrivateKey], KeyRegistry]:
    for key_id in ("dev-1", "dev-2"):
        new_keypair(tmp_path, key_id)
    private = {k: load_private_key(tmp_path / f"{k}.key") for k in ("dev-1", "dev-2")}
    return private, KeyRegistry.load(tmp_path)


def test_sign_verify_round_trip(keys) -> None:
    private, registry = keys
    sig = sign_message(private["dev-1"], **FIELDS)
    assert len(sig) == 64
    assert verify_message(registry, sig, **FIELDS) == "dev-1"
    # hex digest and raw digest are the same field
    assert verify_message(registry, sig, **{**FIELDS, "frame_sha256": FIELDS["frame_sha256"].hex()})
    # through the JSON-header text form
    assert verify_message(registry, decode_signature(encode_signature(sig)), **FIELDS)


@pytest.mark.parametrize("field", sorted(FIELDS))
def test_every_field_change_fails(keys, field: str) -> None:
    """A replay into another round, job, client, session or type, or with another frame."""
    private, registry = keys
    sig = sign_message(private["dev-1"], **FIELDS)
    forged = {**FIELDS, field: CHANGED[field]}
    # the signer is looked up by the signed client: a changed client must be another known key
    key_id = "dev-1" if field != "client" else "dev-2"
    with pytest.raises(SignatureRejected) as err:
        verify_message(registry, sig, **forged, key_id=key_id)
    assert err.value.reason == "bad_signature"
    # and the signed bytes differ, so it is the encoding, not luck
    assert signed_bytes(**forged) != signed_bytes(**FIELDS)


def test_encoding_is_unambiguous() -> None:
    """Length prefixes: moving bytes from one field to the next changes the signed bytes."""
    a = signed_bytes(**{**FIELDS, "job": "ab", "client": "c"})
    b = signed_bytes(**{**FIELDS, "job": "a", "client": "bc"})
    assert a != b
    assert a.startswith(b"fedclip-edge/sig/v1\0")


def test_signature_of_another_key_is_bad(keys) -> None:
    private, registry = keys
    sig = sign_message(private["dev-2"], **FIELDS)  # dev-2 signs as if it were dev-1
    with pytest.raises(SignatureRejected) as err:
        verify_message(registry, sig, **FIELDS)
    assert err.value.reason == "bad_signature"


def test_unknown_key(keys) -> None:
    private, registry = keys
    sig = sign_message(private["dev-1"], **FIELDS)
    with pytest.raises(SignatureRejected) as err:
        verify_message(registry, sig, **{**FIELDS, "client": "dev-9"})
    assert err.value.reason == "unknown_key"
    assert "dev-9" in str(err.value)


def test_tampered_signature(keys) -> None:
    private, registry = keys
    sig = bytearray(sign_message(private["dev-1"], **FIELDS))
    sig[10] ^= 0x01
    with pytest.raises(SignatureRejected) as err:
        verify_message(registry, bytes(sig), **FIELDS)
    assert err.value.reason == "bad_signature"


@pytest.mark.parametrize("bad", [b"", b"x" * 63, b"x" * 65, "not bytes", None, 12])
def test_malformed_signature(keys, bad) -> None:
    _, registry = keys
    with pytest.raises(SignatureRejected) as err:
        verify_message(registry, bad, **FIELDS)
    assert err.value.reason == "malformed_signature"


@pytest.mark.parametrize("text", ["", "!!!", "QUJD", "A" * 400, None, 5])
def test_decode_signature_malformed(text) -> None:
    with pytest.raises(SignatureRejected) as err:
        decode_signature(text)
    assert err.value.reason == "malformed_signature"


def test_fields_nobody_can_sign_are_rejected_not_crashing(keys) -> None:
    private, registry = keys
    sig = sign_message(private["dev-1"], **FIELDS)
    for bad in (
        {"round": 10**400},
        {"round": -1},
        {"round": True},
        {"job": ""},
        {"job": 5},
        {"frame_sha256": b"short"},
        {"frame_sha256": "zz" * 32},
    ):
        with pytest.raises(SignatureRejected) as err:
            verify_message(registry, sig, **{**FIELDS, **bad})
        assert err.value.reason == "bad_signature", bad


# ----------------------------------------------------------------------------- key files


def test_key_files_modes_and_refusals(tmp_path: Path) -> None:
    old = os.umask(0)  # even with an open umask the private key is never group/other readable
    try:
        key_path, pub_path = new_keypair(tmp_path, "dev-1")
    finally:
        os.umask(old)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub_path.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert fingerprint(load_private_key(key_path)) == fingerprint(load_public_key(pub_path))
    with pytest.raises(SigningError, match="refusing to replace"):
        new_keypair(tmp_path, "dev-1")
    before = key_path.read_bytes()
    new_keypair(tmp_path, "dev-1", overwrite=True)
    assert key_path.read_bytes() != before
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_private_key_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    key_path, _ = new_keypair(tmp_path, "dev-1")
    key_path.chmod(mode)
    with pytest.raises(SigningError, match="chmod 600") as err:
        load_private_key(key_path)
    assert f"{mode:04o}" in str(err.value)


def test_key_loading_errors_are_one_line(tmp_path: Path) -> None:
    key_path, pub_path = new_keypair(tmp_path, "dev-1")
    with pytest.raises(SigningError, match="not found"):
        load_private_key(tmp_path / "nope.key")
    with pytest.raises(SigningError, match="not found"):
        load_public_key(tmp_path / "nope.pub")
    with pytest.raises(SigningError, match="not a PEM private key"):
        _junk_private(tmp_path)
    with pytest.raises(SigningError, match="not a PEM private key"):
        # a public key where a private one is expected
        bad = tmp_path / "pub-as-key.key"
        bad.write_bytes(pub_path.read_bytes())
        bad.chmod(0o600)
        load_private_key(bad)
    with pytest.raises(SigningError, match="not a valid PEM public key|not an Ed25519"):
        # a private key where a public one is expected
        load_public_key(key_path)
    with pytest.raises(SigningError, match="is a directory"):
        load_public_key(tmp_path)
    with pytest.raises(SigningError, match="must be 1-64 characters"):
        new_keypair(tmp_path, "a/b")


def _junk_private(tmp_path: Path) -> None:
    junk = tmp_path / "junk.key"
    junk.write_bytes(b"hello")
    junk.chmod(0o600)
    load_private_key(junk)


def test_other_key_type_is_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    k = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "ec.key"
    path.write_bytes(
        k.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    with pytest.raises(SigningError, match="not an Ed25519 key"):
        load_private_key(path)
    pub = tmp_path / "ec.pub"
    pub.write_bytes(
        k.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(SigningError, match="not an Ed25519 public key"):
        load_public_key(pub)


# ----------------------------------------------------------------------------- registry


def test_registry_from_lines_file_and_single_pub(tmp_path: Path) -> None:
    keys_dir = tmp_path / "k"
    for key_id in ("dev-1", "dev-2"):
        new_keypair(keys_dir, key_id)
    lines = tmp_path / "devices.txt"
    lines.write_text(
        "# who may take part\n\n"
        + "\n".join(
            public_key_line(k, load_public_key(keys_dir / f"{k}.pub")) for k in ("dev-1", "dev-2")
        )
        + "\n"
    )
    from_lines = KeyRegistry.load(lines)
    from_dir = KeyRegistry.load(keys_dir)
    assert from_lines.ids() == from_dir.ids() == ["dev-1", "dev-2"]
    for k in ("dev-1", "dev-2"):
        assert fingerprint(from_lines.get(k)) == fingerprint(from_dir.get(k))
    single = KeyRegistry.load(keys_dir / "dev-2.pub")
    assert single.ids() == ["dev-2"] and "dev-1" not in single and len(single) == 1


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("dev-1\n", "expected '<id>  <base64 public key>'"),
        ("dev/1 AAAA\n", "not a valid id"),
        ("dev-1 !!!!\n", "neither PEM nor base64"),
        ("dev-1 QUJD\n", "decodes to 3 bytes"),
        ("# only a comment\n", "lists no keys"),
    ],
)
def test_registry_file_errors(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "devices.txt"
    path.write_text(text)
    with pytest.raises(SigningError, match=match):
        KeyRegistry.load(path)


def test_registry_refuses_duplicates_and_empty(tmp_path: Path) -> None:
    key_path, pub_path = new_keypair(tmp_path / "k", "dev-1")
    line = public_key_line("dev-1", load_public_key(pub_path))
    dup_id = tmp_path / "dup-id.txt"
    other = Ed25519PrivateKey.generate()
    dup_id.write_text(line + "\n" + public_key_line("dev-1", other) + "\n")
    with pytest.raises(SigningError, match="listed twice"):
        KeyRegistry.load(dup_id)
    dup_key = tmp_path / "dup-key.txt"
    dup_key.write_text(line + "\n" + line.replace("dev-1", "dev-2", 1) + "\n")
    with pytest.raises(SigningError, match="same public key"):
        KeyRegistry.load(dup_key)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SigningError, match="no \\*.pub files"):
        KeyRegistry.load(tmp_path / "empty")
    with pytest.raises(SigningError, match="not found"):
        KeyRegistry.load(tmp_path / "missing.txt")


# ----------------------------------------------------------------------------- artifacts


def _fake_artifact(root: Path) -> Path:
    """A minimal artifact folder with a valid manifest (hashes from the manifest helpers)."""
    root.mkdir()
    (root / "image_encoder.onnx").write_bytes(b"\x08\x07onnx-model-bytes" * 100)
    (root / "golden.npz").write_bytes(b"golden-set")
    write_manifest(
        root,
        {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "created": "2026-01-01T00:00:00Z",
            "model": {"name": "fake", "pretrained": "none", "weights_sha256": "0", "embed_dim": 4},
            "preprocess": {},
            "precision": "fp32",
            "opset": 17,
            "max_batch": 1,
            "image_encoder": {"file": "image_encoder.onnx", "inputs": [], "outputs": []},
            "golden": {"file": "golden.npz"},
            "parity": {},
            "versions": {},
        },
    )
    verify_artifact(root)
    return root


def _rehash(root: Path) -> None:
    path = root / "manifest.json"
    data = json.loads(path.read_text())
    data["files"] = file_records(root)
    path.write_text(json.dumps(data, indent=2))


def test_artifact_signature_detects_tampered_onnx_with_recomputed_hashes(tmp_path: Path) -> None:
    root = _fake_artifact(tmp_path / "art")
    key_path, pub_path = new_keypair(tmp_path / "keys", "exporter")
    sig_path = sign_exported_artifact(root, key_path)
    assert sig_path.name == ARTIFACT_SIGNATURE_FILE
    manifest = verify_signed_artifact(root, pub_path)
    assert manifest["image_encoder"]["file"] == "image_encoder.onnx"

    # tamper with the model and recompute its hash in the manifest: hash checks pass ...
    (root / "image_encoder.onnx").write_bytes(b"\x08\x07evil-model-bytes" * 100)
    _rehash(root)
    verify_artifact(root)
    # ... the signature does not
    with pytest.raises(SignatureRejected) as err:
        verify_signed_artifact(root, pub_path)
    assert err.value.reason == "bad_signature"


def test_artifact_signature_detects_tampered_file_without_rehash(tmp_path: Path) -> None:
    root = _fake_artifact(tmp_path / "art")
    key = Ed25519PrivateKey.generate()
    sign_artifact(root, key)
    (root / "golden.npz").write_bytes(b"golden-sez")  # same size, other bytes
    with pytest.raises(ExportError, match="golden.npz"):
        verify_artifact_signature(root, key.public_key())


def test_artifact_signature_other_key_and_unsigned(tmp_path: Path) -> None:
    root = _fake_artifact(tmp_path / "art")
    with pytest.raises(SignatureRejected, match="not signed") as err:
        verify_artifact_signature(root, Ed25519PrivateKey.generate().public_key())
    assert err.value.reason == "malformed_signature"
    sign_artifact(root, Ed25519PrivateKey.generate())
    with pytest.raises(SignatureRejected, match="does not verify") as err:
        verify_artifact_signature(root, Ed25519PrivateKey.generate().public_key())
    assert err.value.reason == "bad_signature"
    (root / ARTIFACT_SIGNATURE_FILE).write_text("{not json")
    with pytest.raises(SignatureRejected) as err:
        verify_artifact_signature(root, Ed25519PrivateKey.generate().public_key())
    assert err.value.reason == "malformed_signature"


def test_message_signature_is_not_an_artifact_signature(tmp_path: Path) -> None:
    """Domain separation: the same key's signature over the same bytes in the other domain."""
    root = _fake_artifact(tmp_path / "art")
    key = Ed25519PrivateKey.generate()
    raw = key.sign((root / "manifest.json").read_bytes())  # no artifact domain tag
    (root / ARTIFACT_SIGNATURE_FILE).write_text(
        json.dumps({"alg": "ed25519", "signature": encode_signature(raw)})
    )
    with pytest.raises(SignatureRejected):
        verify_artifact_signature(root, key.public_key())


# ----------------------------------------------------------------------------- CLI


def test_cli_keys_new_and_show(tmp_path: Path, capsys) -> None:
    out = tmp_path / "keys"
    assert main(["keys", "new", "--out", str(out), "--id", "dev-1", "--id", "aggregator"]) == 0
    made = capsys.readouterr().out
    assert "dev-1  SHA256:" in made and "aggregator  SHA256:" in made
    assert stat.S_IMODE((out / "dev-1.key").stat().st_mode) == 0o600
    assert main(["keys", "show", str(out)]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in shown] == ["aggregator", "dev-1"]
    fp = fingerprint(load_public_key(out / "dev-1.pub"))
    assert f"dev-1  {fp}" in shown
    assert main(["keys", "show", str(out / "dev-1.key")]) == 0
    assert fp in capsys.readouterr().out

    (out / "dev-1.key").chmod(0o644)
    assert main(["keys", "show", str(out / "dev-1.key")]) == SigningError.exit_code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "chmod 600" in err
    assert main(["keys", "new", "--out", str(out), "--id", "dev-1"]) == SigningError.exit_code
    assert "refusing to replace" in capsys.readouterr().err
    assert main(["keys", "new", "--out", str(out), "--id", "a/b#"]) == SigningError.exit_code
    assert "must be 1-64 characters" in capsys.readouterr().err
