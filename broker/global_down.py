"""The aggregator's compressed downlink: which global goes out as a delta, which dense, and
what every global publication cost.

Why a module of its own: the aggregator only asks `delta_for(round)` before it publishes and
`count(...)` after; the encoding (with the server's error feedback) is the round engine's
plug-in (`fedclip_edge.global_codec.GlobalCodecPlugin`), whose state goes with each round's
commit, so `--resume` keeps the residual and the last delta frame.

Round 1's global goes out derived (an empty frame, `delta` {codec "derived", base_round 0,
digest}: each device makes it from the signed seed and its adapter width, 0 frame bytes) when
the aggregator's initial global is exactly `derive_initial(seed, dim)` (by digest: a resumed job
never claims it) and every active client said it can (`DERIVE_KEY` in its hello's versions). A
device whose derived global fails the digest asks for a dense copy, as for a delta.

A global goes out dense (as before) when: the codec is fp32; it is round 1's and not derived; it
is a keyframe round (`--keyframe-every K`: rounds 1, 1+K, 1+2K, ...); it is the final adapter (kept
by devices, never a delta); or a device asked for it (a hello from a device behind the round:
it joined late, missed a round or its rebuilt global failed the digest).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from fedclip_edge.codecs import DEFAULT_TOPK_FRACTION
from fedclip_edge.errors import ConfigError
from fedclip_edge.global_codec import (
    GlobalCodecPlugin,
    GlobalDelta,
    GlobalEncoder,
    derived_global,
)
from fedclip_edge.global_fields import DERIVE_KEY, DERIVE_VERSION, DERIVED


def can_derive(devices: Iterable[Any]) -> bool:
    """Every active client (a roster `Device`) says it derives round 1's global itself."""
    return all(d.versions.get(DERIVE_KEY) == DERIVE_VERSION for d in devices if d.active)


def kind(delta: GlobalDelta | None) -> str:
    """How a global went out: "derived", "delta" or "dense"."""
    return "dense" if delta is None else DERIVED if delta.codec == DERIVED else "delta"


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
        self.sent: Counter[tuple[int, str]] = Counter()  # (round, kind(...)) -> count
        self.derived: GlobalDelta | None = None  # round 1's, when devices can make it

    def set_initial(self, state: Mapping[str, torch.Tensor], *, seed: int, dim: int,
                    resumed: bool) -> None:
        """Round 1's global may go out derived: it is the seed's, and no resumed job's."""
        if self.active and not resumed:
            self.derived = derived_global(state, seed, dim)

    @property
    def active(self) -> bool:
        return self.plugin.encoder.active

    def delta_for(self, rnd: int, *, dense: bool = False, derive: bool = False
                  ) -> GlobalDelta | None:
        """The delta frame to publish as round `rnd`'s global, or None: send it dense.
        `derive`: every client can derive round 1 (`can_derive`)."""
        if not self.active or dense or rnd > self.rounds:
            return None
        if rnd == 1:
            return self.derived if derive else None
        if self.keyframe_every and (rnd - 1) % self.keyframe_every == 0:
            return None
        last = self.plugin.last
        return last if last is not None and last.round == rnd else None

    def count(self, rnd: int, nbytes: int, *, delta: GlobalDelta | None) -> None:
        """One publication of round `rnd`'s global: its envelope's size, and how it went."""
        self.bytes[rnd] += nbytes
        self.sent[(rnd, kind(delta))] += 1

    def round_fields(self, rnd: int) -> dict[str, Any]:
        """For the round's summary line: every device subscribed to the global topic gets every
        publication, so a client's downlink is the sum of them (keyframes, resends included)."""
        return {
            "global_codec": self.plugin.encoder.codec,
            "bytes_down_per_client": self.bytes[rnd],
            "globals_delta": self.sent[(rnd, "delta")],
            "globals_dense": self.sent[(rnd, "dense")],
            "globals_derived": self.sent[(rnd, DERIVED)],
        }
