"""Signing keys for tests: one Ed25519 key per id, made once per test session.

Tests sign like a deployment does (the aggregator refuses unsigned updates unless told
--insecure-unsigned): devices sign updates and statuses, the aggregator signs globals.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedclip_edge.signing import KeyRegistry, new_keypair

AGGREGATOR = "aggregator"


@cache
def key(key_id: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def registry(ids: list[str] | tuple[str, ...]) -> KeyRegistry:
    """Who may take part: the public keys of `ids`."""
    return KeyRegistry({i: key(i).public_key() for i in ids})


def aggregator_public():  # noqa: ANN201 - an Ed25519PublicKey
    return key(AGGREGATOR).public_key()


def key_files(folder: Path, devices: list[str]) -> Path:
    """Key files for subprocess runs: <id>.key/.pub for the aggregator, an exporter and each
    device, and `folder/devices/` holding the devices' public keys (the registry)."""
    import shutil

    for key_id in [AGGREGATOR, "exporter", *devices]:
        if not (folder / f"{key_id}.key").is_file():
            new_keypair(folder, key_id, overwrite=True)
    (folder / "devices").mkdir(parents=True, exist_ok=True)
    for d in devices:
        shutil.copyfile(folder / f"{d}.pub", folder / "devices" / f"{d}.pub")
    return folder
