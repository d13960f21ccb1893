"""Artifact signatures, as an exporter step: sign an exported folder, verify one before use.

Checking hashes (`manifest.verify_artifact`) finds a damaged file but not a replaced one: whoever
edits a file can rewrite its hash in the manifest. Signing the manifest with the exporting key
closes that. These functions are the hook the export pipeline and the agent call; they take key
files, as the CLI does, and leave the crypto to `fedclip_edge.signing`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedclip_edge.signing import (
    load_private_key,
    load_public_key,
    sign_artifact,
    verify_artifact_signature,
)


def sign_exported_artifact(root: Path | str, key_file: Path | str) -> Path:
    """Sign `root/manifest.json` with the private key in `key_file`; returns manifest.sig."""
    return sign_artifact(Path(root), load_private_key(key_file))


def verify_signed_artifact(root: Path | str, pub_file: Path | str) -> dict[str, Any]:
    """The manifest's signature verifies with `pub_file` and every file matches its hash;
    returns the manifest (raises SignatureRejected / ExportError otherwise)."""
    return verify_artifact_signature(Path(root), load_public_key(pub_file))
