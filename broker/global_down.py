"""The aggregator's compressed downlink: which global goes out as a delta, which dense, and
what every global publication cost.

Why a module of its own: the aggregator only asks `delta_for(round)` before it publishes and
`count(...)` after; the encoding (with the server's error feedback) is the round engine's
plug-in (`fedclip_edge.global_codec.GlobalCodecPlugin`), whose state goes with each round's
commit, so `--resume` keeps the residual and the last delta frame.

A global goes out dense (as before) when: the codec is fp32; it is round 1's (no base); it is a
keyframe round (`--keyframe-every K`: rounds 1, 1+K, 1+2K, ...); it is the final adapter (kept
by devices, never a delta); or a device asked for it (a hello from a device behind the round:
it joined late, missed a round or its rebuilt global failed the digest).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from fedclip_edge.codecs import DEFAULT_TOPK_FRACTION
from fedclip_edge.errors import ConfigError
from fedclip_edge.global_codec import GlobalCodecPlugin, GlobalDelta, GlobalEncoder


class GlobalDownlink:
    """The downlink of one job: the engine plug-in and the per-round byte counts."""

    def __init__(
        self,
        codec: str,
        *,
        job: str,
        rounds: int,
        keyframe_every: int = 0,
        topk_fraction: float = DEFAULT_TOPK_FRACTION,
    ) -> None:
        if keyframe_every < 0:
            raise ConfigError(f"--keyframe-every must be >= 0, got {keyframe_every}")
        try:
            encoder = GlobalEncoder(codec, job=job, topk_fraction=topk_fraction)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.plugin = GlobalCodecPlugin(encoder)
        self.rounds = rounds
        self.keyframe_every = keyframe_every
        self.bytes: Counter[int] = Counter()  # round -> payload bytes of its global publications
        self.sent: Counter[tuple[int, str]] = Counter()  # (round, "delta"|"dense") -> count

    @property
    def active(self) -> bool:
        return self.plugin.encoder.active

    def delta_for(self, rnd: int, *, dense: bool = False) -> GlobalDelta | None:
        """The delta frame to publish as round `rnd`'s global, or None: send it dense."""
        if not self.active or dense or rnd > self.rounds:
            return None
        if self.keyframe_every and (rnd - 1) % self.keyframe_every == 0:
            return None
        last = self.plugin.last
        return last if last is not None and last.round == rnd else None

    def count(self, rnd: int, nbytes: int, *, delta: bool) -> None:
        self.bytes[rnd] += nbytes
        self.sent[(rnd, "delta" if delta else "dense")] += 1

    def round_fields(self, rnd: int) -> dict[str, Any]:
        """For the round's summary line: every device subscribed to the global topic gets every
        publication, so a client's downlink is the sum of them (keyframes, resends included)."""
        return {
            "global_codec": self.plugin.encoder.codec,
            "bytes_down_per_client": self.bytes[rnd],
            "globals_delta": self.sent[(rnd, "delta")],
            "globals_dense": self.sent[(rnd, "dense")],
        }
