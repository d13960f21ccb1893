"""Signing keys for tests: one Ed25519 key per id, made once per test session.

Tests sign like a deployment does (the aggregator refuses unsigned updates unless told
--insecure-unsigned): devices sign updates and statuses, the aggregator signs globals.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedclip_edge.signing import KeyRegistry

AGGREGATOR = "aggregator"
# The job run tests' aggregators are given (AggregatorConfig.run), so simulated devices sign
# their hellos and updates for it in advance (real agents learn it from the control/global).
RUN = "0000000001-00000000000000aa"


@cache
def key(key_id: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def registry(ids: list[str] | tuple[str, ...]) -> KeyRegistry:
    """Who may take part: the public keys of `ids`."""
    return KeyRegistry({i: key(i).public_key() for i in ids})


def aggregator_public():  # noqa: ANN201 - an Ed25519PublicKey
    return key(AGGREGATOR).public_key()


def key_files(folder: Path, devices: list[str] | tuple[str, ...]) -> Path:
    """The same keys as files, for subprocess runs: <id>.key (0600) and <id>.pub for the
    aggregator, an exporter and each device, and `folder/devices/` holding the devices' public
    keys (the registry `aggregate --device-keys` loads)."""
    from cryptography.hazmat.primitives import serialization

    (folder / "devices").mkdir(parents=True, exist_ok=True)
    for key_id in [AGGREGATOR, "exporter", *devices]:
        k = key(key_id)
        priv = folder / f"{key_id}.key"
        priv.write_bytes(k.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
        priv.chmod(0o600)
        pub = k.public_key().public_bytes(serialization.Encoding.PEM,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
        (folder / f"{key_id}.pub").write_bytes(pub)
        if key_id in devices:
            (folder / "devices" / f"{key_id}.pub").write_bytes(pub)
    return folder
