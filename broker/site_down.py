"""A site's downlink: the central's global, rebuilt here and passed on to the site's devices.

Why: with `aggregate --global-codec` the central sends the change of its global since the last
round (`fedclip_edge.global_codec`). A site needs the global itself (it decodes its devices'
updates against it and must check the central's digest), so it rebuilds it from the one it
holds, exactly as a device does. Its devices need the same global; they can rebuild it from
the very same frame when they hold the same base, so the site forwards the central's delta
frame unchanged (the envelope re-signed by the site, as every global it sends down) and its
`delta` fields {codec, base_round, digest} as they came: the digest still checks the central's
exact global on every device.

A derived round 1 (the central's frame is empty: `fedclip_edge.global_fields.DERIVED`) the
site derives itself from the signed seed and checks the digest, as a device does (its hello
upstream says it can); it forwards it derived when every one of its devices says it can too,
dense otherwise.

The site sends a dense global instead when the central's was dense (round 1, keyframes, the
final adapter, a dense copy it asked for), when its devices cannot hold the base (the site did
not send them the round before), or when a device asks (a hello from a device behind the
round). When the site cannot rebuild the central's global (it missed a round, was restarted
without its base, or the digest differs) it asks the central for a dense copy: a hello
upstream naming the round it holds.

The last global the site rebuilt is kept in its run folder (`central_global.safetensors`), so a
site resumed with `--resume` rebuilds the next delta without a dense copy.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from fedclip_edge.broker import protocol as P
from fedclip_edge.broker.global_down import kind
from fedclip_edge.broker.store import save_adapter
from fedclip_edge.global_codec import GlobalDelta, GlobalMismatch, apply_delta, derive_checked
from fedclip_edge.global_fields import DERIVED
from fedclip_edge.wire import decode_frame

HELD_FILE = "central_global.safetensors"


class RelayDownlink:
    """What `Aggregator` asks of its downlink (`active`, `delta_for`, `count`, `round_fields`),
    for a site: the central's frames, not an encoder of its own."""

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / HELD_FILE
        self.codec = "fp32"  # the central's global codec, once a delta came
        self.held_round = -1  # the central global this site holds (the next delta's base)
        self.held: dict[str, torch.Tensor] | None = None
        self.forward: GlobalDelta | None = None  # the central's delta for `held_round`
        self.cur = self.prev = -1  # the round last sent down, and the one before it
        self.bytes: Counter[int] = Counter()  # round -> bytes of the site's publications
        self.sent: Counter[tuple[int, str]] = Counter()
        self.bytes_in: Counter[int] = Counter()  # round -> bytes of the central's globals heard

    @property
    def active(self) -> bool:
        """The central sends compressed globals: devices behind the round get dense copies."""
        return self.codec != "fp32"

    # ------------------------------------------------------------------ from the central
    def heard(self, rnd: int, nbytes: int) -> None:
        self.bytes_in[rnd] += nbytes

    def receive(self, g: P.GlobalModel, shapes: Mapping[str, Sequence[int]]
                ) -> dict[str, torch.Tensor]:
        """The central's global `g` stands for. `FrameRejected` for a bad dense frame,
        `GlobalMismatch` when a delta cannot be rebuilt here (ask for a dense copy)."""
        if not g.delta:
            state = decode_frame(g.frame, expected=shapes).tensors
            self.forward = None
            if g.round <= g.rounds:
                self._hold(g.round, state)
            return state
        self.codec = str(g.delta["codec"])
        if g.round == self.held_round and self.held is not None:
            return self.held  # the same global again (a retry, a resend)
        base = int(g.delta["base_round"])
        if self.codec == DERIVED:
            state = derive_checked(g.seed, {k: tuple(v) for k, v in shapes.items()},
                                   g.delta["digest"])
            self.forward = GlobalDelta(DERIVED, g.round, 0, b"", g.delta["digest"])
            self._hold(g.round, state)
            return state
        if base != self.held_round or self.held is None:
            raise GlobalMismatch(
                f"it is a change since round {base}'s global, this site holds "
                + (f"round {self.held_round}'s" if self.held is not None else "none"))
        state = apply_delta(g.frame, self.held, g.delta["digest"])
        self.forward = GlobalDelta(self.codec, g.round, base, bytes(g.frame), g.delta["digest"])
        self._hold(g.round, state)
        return state

    def _hold(self, rnd: int, state: dict[str, torch.Tensor]) -> None:
        self.held_round, self.held = rnd, state
        save_adapter(self.path, state, rnd)

    def load(self, completed: int) -> None:
        """After --resume: the central global kept on disk (if any); the site's devices hold
        the global of its last committed round."""
        self.cur = completed
        if not self.path.is_file():
            return
        with safe_open(str(self.path), framework="pt") as fh:
            rnd = int((fh.metadata() or {}).get("round", -1))
            self.held = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        self.held_round = rnd

    # ------------------------------------------------------------------ to the devices
    def delta_for(self, rnd: int, *, dense: bool = False, derive: bool = False
                  ) -> GlobalDelta | None:
        """The central's delta frame to forward as round `rnd`'s global, or None: dense. Only
        when the site's devices hold its base: the site sent them that round last; a derived
        one only when they all can derive (`derive`)."""
        f = self.forward
        if dense or f is None or f.round != rnd:
            return None
        if f.codec == DERIVED:
            return f if derive else None
        before = self.prev if rnd == self.cur else self.cur
        return f if f.base_round == before else None

    def count(self, rnd: int, nbytes: int, *, delta: GlobalDelta | None) -> None:
        if rnd != self.cur:
            self.prev, self.cur = self.cur, rnd
        self.bytes[rnd] += nbytes
        self.sent[(rnd, kind(delta))] += 1

    def round_fields(self, rnd: int) -> dict[str, Any]:
        """For the site's round summary: what each of its devices got (every publication) and
        what the site got from the central for that round."""
        return {
            "global_codec": self.codec,
            "bytes_down_per_client": self.bytes[rnd],
            "globals_delta": self.sent[(rnd, "delta")],
            "globals_dense": self.sent[(rnd, "dense")],
            "globals_derived": self.sent[(rnd, DERIVED)],
            "bytes_from_central": self.bytes_in[rnd],
        }
