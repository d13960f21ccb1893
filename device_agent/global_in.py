"""A device's side of the global: dense, or a compressed delta applied to the one it holds.

Why: with `aggregate --global-codec` a global envelope carries `delta` = {codec, base_round,
digest}: the frame is the change since round `base_round`'s global. A device that holds that
global rebuilds the new one (`fedclip_edge.global_codec.apply_delta`) and checks the digest of
the exact global the aggregator holds, so the two never drift. A device that does not (it
joined late, missed a round, or the digest differs) asks for a dense copy: it says hello again
with its last round, which the aggregator answers with a dense global (broker/ingest.py).

Round 1's global may come derived (an empty frame, `delta` codec "derived"): the device makes
it itself, `derive_initial(the global's signed seed, its adapter width)`, and checks the digest;
a mismatch (another torch that initializes otherwise) asks for a dense copy the same way. The
device says it can in its hello (`CAPABILITY`, in `versions`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fedclip_edge.broker import protocol as P
from fedclip_edge.global_codec import GlobalMismatch, apply_delta, derive_checked
from fedclip_edge.global_fields import DERIVE_KEY, DERIVE_VERSION, DERIVED
from fedclip_edge.wire import FrameRejected, decode_frame

CAPABILITY = {DERIVE_KEY: DERIVE_VERSION}  # merged into the hello's versions


class GlobalIn:
    """The last global this device rebuilt (round and tensors): the next delta's base."""

    def __init__(
        self,
        shapes: dict[str, tuple[int, ...]],
        *,
        log: Callable[[str], None],
        ask_dense: Callable[[], None],
    ) -> None:
        self.shapes = shapes
        self.log = log
        self.ask_dense = ask_dense
        self.round = -1
        self.state: dict[str, torch.Tensor] | None = None
        self.dense_asked = 0  # how many dense copies this device asked for

    def rebuild(self, g: P.GlobalModel) -> dict[str, torch.Tensor] | None:
        """The global `g` stands for, or None (logged; for a delta, a dense copy is asked)."""
        if not g.delta:
            try:
                state = decode_frame(g.frame, expected=self.shapes).tensors
            except FrameRejected as exc:
                self.log(f"warning: global adapter for round {g.round} rejected: {exc.message}")
                return None
            return self._hold(g.round, state)
        if g.round == self.round and self.state is not None:
            return self.state  # the same global again (a retry of a short round)
        base = int(g.delta["base_round"])
        if g.delta["codec"] == DERIVED:
            try:
                return self._hold(g.round, derive_checked(g.seed, self.shapes, g.delta["digest"]))
            except GlobalMismatch as exc:
                why = str(exc)
        elif base != self.round or self.state is None:
            why = (f"it is a change since round {base}'s global, this device holds "
                   + (f"round {self.round}'s" if self.state is not None else "none"))
        else:
            try:
                return self._hold(g.round, apply_delta(g.frame, self.state, g.delta["digest"]))
            except GlobalMismatch as exc:
                why = str(exc)
        self.dense_asked += 1
        self.log(f"round {g.round}: compressed global not usable here ({why}); asking for a "
                 "dense copy")
        self.ask_dense()
        return None

    def _hold(self, rnd: int, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.round, self.state = rnd, state
        return state
