"""What a device agent is given: its settings (`AgentConfig`) and its data (`LocalData`), and
the seeds of its local training (a function of seed, round and client only)."""

from __future__ import annotations

import hashlib
import math
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedclip_edge.broker import protocol as P
from fedclip_edge.codecs import CODECS, DEFAULT_TOPK_FRACTION, check_topk_fraction
from fedclip_edge.data.split import split_indices
from fedclip_edge.errors import ConfigError
from fedclip_edge.serving.gate import (
    DEFAULT_PERSONALIZE_EPOCHS,
    DEFAULT_PROMOTE_MARGIN,
    check_margin,
)
from fedclip_edge.signing import KeyRegistry


def client_index(client_id: str) -> int:
    """A stable integer per client id (not Python's salted hash): seeds its local training."""
    return int.from_bytes(hashlib.sha256(client_id.encode()).digest()[:6], "big")


def round_generator(seed: int, rnd: int, client_id: str) -> torch.Generator:
    """The local training generator: a function of (seed, round, client) only, so a resumed
    run and an uninterrupted one train identically."""
    s = 0
    for part in (seed, rnd, client_index(client_id)):
        s = (s * 1_000_003 + part) % (2**63)
    return torch.Generator().manual_seed(s)


@dataclass
class LocalData:
    """One device's features (raw, [N, D]), labels, the class prompts' text features."""

    features: torch.Tensor
    labels: torch.Tensor
    text_features: torch.Tensor
    logit_scale: float
    backend: str = "memory"
    extract_s: float = 0.0
    versions: dict[str, str] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)  # names of text_features' rows
    artifact: dict[str, Any] | None = None  # the encoder export (serving.keep.artifact_record)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def split(self, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The reference protocol's 60/20/20 split of this device's data."""
        parts = split_indices(int(self.labels.shape[0]), seed)
        out = {}
        for name, ix in zip(("train", "val", "test"), parts, strict=True):
            idx = torch.from_numpy(ix).long()
            out[name] = (self.features[idx], self.labels[idx])
        return out


DEFAULT_LOCAL_DP_DELTA = 1e-5


def check_local_dp(clip: float | None, noise_multiplier: float, delta: float) -> None:
    """--dp-clip / --dp-noise-multiplier / --dp-delta, refused in one line each."""
    if clip is None:
        if noise_multiplier:
            raise ConfigError("--dp-noise-multiplier needs --dp-clip: noise is scaled to the "
                              "clip norm (std = multiplier x clip)")
        return
    if not (clip > 0 and math.isfinite(clip)):
        raise ConfigError(f"--dp-clip {clip}: the L2 clip norm must be a number > 0")
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ConfigError(f"--dp-noise-multiplier {noise_multiplier}: must be >= 0")
    if not 0 < delta < 1:
        raise ConfigError(f"--dp-delta {delta}: must be in (0, 1)")


@dataclass
class AgentConfig:
    job: str
    client_id: str
    update_dtype: str = "float32"
    idle_timeout_s: float = 600.0  # no message from the aggregator for this long: give up
    connect_timeout_s: float = 30.0
    poll_s: float = 0.2
    ack_timeout_s: float = 10.0  # wait this long for a PUBACK before leaving it to the outbox
    # this device's signing key and the aggregator's public key; without them only when asked
    key: Ed25519PrivateKey | None = None
    aggregator_key: Ed25519PublicKey | None = None
    insecure_unsigned: bool = False
    session: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    # how updates travel (fedclip_edge.codecs); None: fp32 or fp16 after update_dtype
    update_codec: str | None = None
    topk_fraction: float = DEFAULT_TOPK_FRACTION
    # delta codecs' error-feedback state (residual + last encoded update); None: kept in memory
    # only (tests), run_agent always gives one
    state_file: Path | None = None
    # the device's model store (docs/serving.md): at the job's end the final global adapter and
    # its personalized copy are kept there and gated; None: nothing kept (tests)
    models: Path | None = None
    personalize_epochs: int = DEFAULT_PERSONALIZE_EPOCHS
    promote_margin: float = DEFAULT_PROMOTE_MARGIN
    # local DP (docs/privacy.md): the update delta clipped to L2 norm dp_clip and noised with
    # std dp_noise_multiplier * dp_clip before encoding and signing; None: no local DP
    dp_clip: float | None = None
    dp_noise_multiplier: float = 0.0
    dp_delta: float = DEFAULT_LOCAL_DP_DELTA  # the delta at which the device reports epsilon
    # secure aggregation (device_agent/secagg_device.py): only a masked update leaves
    secure_aggregation: bool = False
    # with it: keep each clipped delta masked and sent in this folder (the device's own audit)
    secagg_record: Path | None = None

    def __post_init__(self) -> None:
        P.check_id(self.job, "job")
        P.check_id(self.client_id, "client id")
        if self.update_dtype not in ("float32", "float16"):
            raise ConfigError("update dtype must be float32 or float16")
        if self.update_codec is not None:
            if self.update_codec not in CODECS:
                raise ConfigError(f"unknown update codec {self.update_codec!r}; choose one of "
                                  f"{', '.join(CODECS)}")
            if self.update_dtype == "float16" and self.update_codec != "fp16":
                raise ConfigError("give --update-codec or --update-dtype float16, not both")
        check_margin(self.promote_margin)
        if self.secure_aggregation and self.codec != "fp32":
            raise ConfigError(f"--secure-aggregation sends a masked fixed-point vector, not a "
                              f"codec's frame: --update-codec {self.codec} is refused with it")
        if self.secagg_record is not None and not self.secure_aggregation:
            raise ConfigError("--secagg-record keeps what secure aggregation masks: give "
                              "--secure-aggregation with it")
        check_local_dp(self.dp_clip, self.dp_noise_multiplier, self.dp_delta)
        if self.personalize_epochs < 0:
            raise ConfigError(f"--personalize-epochs {self.personalize_epochs}: 0 or more")
        try:
            check_topk_fraction(self.topk_fraction)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not self.insecure_unsigned and (self.key is None or self.aggregator_key is None):
            raise ConfigError(
                "updates and globals are signed: give --key (this device's private key) and "
                "--aggregator-key (the aggregator's public key), or run with --insecure-unsigned"
            )

    @property
    def codec(self) -> str:
        """The update codec in effect (--update-dtype float16 is the fp16 codec)."""
        if self.update_codec is not None:
            return self.update_codec
        return "fp16" if self.update_dtype == "float16" else "fp32"

    @property
    def aggregator_registry(self) -> KeyRegistry | None:
        if self.aggregator_key is None or self.insecure_unsigned:
            return None
        return KeyRegistry({P.AGGREGATOR_ID: self.aggregator_key})
