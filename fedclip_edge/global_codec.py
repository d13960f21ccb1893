"""The global, compressed: the server sends the change of the global since the last round.

Why: with a delta update codec the uplink is tiny, but a dense fp32 global still went down every
round to every device. The server now encodes `aggregate - base` (base: the global the devices
hold, the round's own) with any update codec (`fedclip_edge.codecs`), with server-side error
feedback: what the codec drops this round is kept in a residual and added to the next round's
delta (DoubleSqueeze-style), so nothing is lost, only late.

The one rule that keeps devices and server from drifting: the server's new global is NOT the
aggregate but what a device rebuilds, `base + decoded delta`, computed by the same function
(`wire.decode_update`) on the same bytes. The aggregate minus that global is exactly the new
residual. A device checks what it rebuilt against `state_digest` of the server's global (sent
with the frame, signed with the envelope); a mismatch (a missed round, a corrupt base) asks for
a dense copy.

`fp32` (the default) is today's behaviour exactly: no frame, the aggregate is the global.
"""

from __future__ import annotations

import base64
import hashlib
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import safetensors.torch
import torch

from fedclip_edge import codecs
from fedclip_edge.adapter import AttentionAdapter
from fedclip_edge.codecs import DEFAULT_TOPK_FRACTION, ErrorFeedback
from fedclip_edge.errors import FrameError
from fedclip_edge.global_fields import (
    DERIVED,
    check_delta_fields,  # noqa: F401  (re-exported)
)
from fedclip_edge.rounds.engine import OpenRound, RoundPlugin, State
from fedclip_edge.wire import DEFAULT_MAX_FRAME_BYTES, decode_update, encode_update

GLOBAL_CLIENT = "global"  # the client id inside a global delta frame's header
DIGEST_HEX_BYTES = 64  # a digest as the envelope carries it


class GlobalMismatch(FrameError):
    """A compressed global could not be rebuilt here (wrong base, corrupt frame, digest): the
    device must ask for a dense copy."""


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a global exactly as held: for each tensor in name order, its name, its shape
    and its float32 little-endian bytes. Equal digests mean bit-identical globals."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to(device="cpu", dtype=torch.float32).contiguous()
        h.update(name.encode("utf-8") + b"\0")
        h.update(struct.pack(f"<{t.dim() + 1}q", t.dim(), *t.shape))
        h.update(np.ascontiguousarray(t.numpy(), dtype="<f4").tobytes())
    return h.hexdigest()


def derive_initial(seed: int, dim: int) -> dict[str, torch.Tensor]:
    """Round 1's global as every side makes it (`torch.manual_seed(seed)`, then the adapter's
    default init), so a device that knows the job's seed and width needs no bytes for it; the
    server's digest still decides (another torch could init otherwise).

    The same numbers are drawn from a private generator seeded alike, each `nn.Linear` as its
    `reset_parameters` does, in the adapter's order: the global RNG is never touched, so threads
    that derive or train at the same time (agents in one process) cannot change the result (a
    test keeps it equal to the seeded construction)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        adapter = AttentionAdapter(dim)
    adapter.to_empty(device="cpu")
    with torch.no_grad():
        for module in adapter.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=gen)
                if module.bias is not None:
                    bound = 1 / math.sqrt(module.in_features) if module.in_features else 0.0
                    torch.nn.init.uniform_(module.bias, -bound, bound, generator=gen)
            elif any(True for _ in module.parameters(recurse=False)):
                raise TypeError(f"derive_initial cannot init a {type(module).__name__}")
    return {k: v.detach().clone() for k, v in adapter.state_dict().items()}


def derived_global(state: Mapping[str, torch.Tensor], seed: int, dim: int) -> GlobalDelta | None:
    """Round 1's global as a derived one (no frame: devices make it from the seed), or None
    when `state` is not exactly `derive_initial(seed, dim)` (checked by digest)."""
    digest = state_digest(state)
    if digest != state_digest(derive_initial(seed, dim)):
        return None
    return GlobalDelta(DERIVED, 1, 0, b"", digest)


def derive_checked(
    seed: int, shapes: Mapping[str, tuple[int, ...]], digest: str
) -> dict[str, torch.Tensor]:
    """The receiving side of a derived global: `derive_initial` at the width `shapes` (the
    adapter's) imply, checked against the server's digest; `GlobalMismatch` otherwise."""
    dims = {s[0] for s in shapes.values() if len(s) == 1}
    state = derive_initial(seed, dims.pop()) if len(dims) == 1 else {}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != {k: tuple(v) for k, v in shapes.items()}:
        raise GlobalMismatch("a derived global, but this adapter's shapes are not the "
                             "derivable adapter's")
    mine = state_digest(state)
    if mine != digest:
        raise GlobalMismatch(f"the global derived here from seed {seed} differs from the "
                             f"server's (digest {mine[:12]}, server {str(digest)[:12]})")
    return state


@dataclass(frozen=True)
class GlobalDelta:
    """The global of `round` as a codec frame against the global of `base_round`, and the
    digest of the global a device must get by applying it."""

    codec: str
    round: int
    base_round: int
    frame: bytes
    digest: str

    def fields(self) -> dict[str, Any]:
        """What the global envelope carries besides the frame (`check_delta_fields`)."""
        return {"codec": self.codec, "base_round": self.base_round, "digest": self.digest}

    def to_dict(self) -> dict[str, Any]:
        return {"codec": self.codec, "round": self.round, "base_round": self.base_round,
                "frame": base64.b64encode(self.frame).decode("ascii"), "digest": self.digest}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GlobalDelta:
        return cls(str(d["codec"]), int(d["round"]), int(d["base_round"]),
                   base64.b64decode(d["frame"]), str(d["digest"]))


def apply_delta(
    frame: bytes,
    base: Mapping[str, torch.Tensor],
    digest: str,
    *,
    max_bytes: int = DEFAULT_MAX_FRAME_BYTES,
) -> dict[str, torch.Tensor]:
    """The device's side: the global rebuilt from its `base` and a delta frame, checked against
    the server's digest. `GlobalMismatch` (one line) when it cannot be trusted."""
    try:
        state = decode_update(frame, base, max_bytes=max_bytes).tensors
    except FrameError as exc:
        raise GlobalMismatch(f"global delta frame unusable: {exc}") from None
    got = state_digest(state)
    if got != digest:
        raise GlobalMismatch(
            f"global rebuilt from the base differs from the server's (digest {got[:12]}, "
            f"server {str(digest)[:12]}): the base is not the one the delta was made against"
        )
    return state


class GlobalEncoder:
    """The server's side: encodes each new global against the last one, with error feedback."""

    def __init__(
        self, codec: str, *, job: str, topk_fraction: float = DEFAULT_TOPK_FRACTION
    ) -> None:
        codecs.check_codec(codec)
        codecs.check_topk_fraction(topk_fraction)
        self.codec = codec
        self.job = job
        self.topk_fraction = topk_fraction
        self.feedback = ErrorFeedback()

    @property
    def active(self) -> bool:
        """fp32 sends the global dense, as before: nothing to encode."""
        return self.codec != "fp32"

    def encode(
        self,
        aggregate: Mapping[str, torch.Tensor],
        base: Mapping[str, torch.Tensor],
        *,
        round: int,
        base_round: int,
    ) -> tuple[GlobalDelta, dict[str, torch.Tensor]]:
        """(the frame devices get, the new global = base + decoded delta). The residual keeps
        `aggregate - new global` (with what earlier rounds held back)."""
        frame = encode_update(
            aggregate, base, codec=self.codec, job=self.job, round=round,
            client=GLOBAL_CLIENT, feedback=self.feedback, topk_fraction=self.topk_fraction,
        )
        state = decode_update(frame, base, max_bytes=max(DEFAULT_MAX_FRAME_BYTES, len(frame)))
        new = dict(state.tensors)
        return GlobalDelta(self.codec, round, base_round, frame, state_digest(new)), new

    def residual_norm(self) -> float:
        return self.feedback.norm()

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: the codec and the residual (safetensors bytes, base64)."""
        tensors = {k: v.contiguous() for k, v in self.feedback.residual.items()}
        raw = safetensors.torch.save(tensors) if tensors else b""
        return {"codec": self.codec, "residual": base64.b64encode(raw).decode("ascii")}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("codec") != self.codec:
            raise ValueError(
                f"saved global codec {state.get('codec')!r} differs from --global-codec "
                f"{self.codec!r}: resume with the same codec"
            )
        raw = base64.b64decode(state.get("residual") or "")
        self.feedback = ErrorFeedback(safetensors.torch.load(raw) if raw else {})


class GlobalCodecPlugin(RoundPlugin):
    """The round engine's plug-in: the last `on_aggregate` (after DP noise, unmasking), so the
    global every caller commits and evaluates is the one devices rebuild. The round's frame is
    in `rnd.extras["global_delta"]` (a `GlobalDelta`)."""

    def __init__(self, encoder: GlobalEncoder) -> None:
        self.encoder = encoder
        self.last: GlobalDelta | None = None

    def on_aggregate(self, rnd: OpenRound, state: State) -> State:
        if not self.encoder.active:
            return state
        delta, new = self.encoder.encode(
            state, rnd.global_state, round=rnd.number + 1, base_round=rnd.number
        )
        rnd.extras["global_delta"] = delta
        self.last = delta
        return new

    def state_dict(self) -> dict[str, Any]:
        out = self.encoder.state_dict()
        if self.last is not None:
            out["last"] = self.last.to_dict()
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        self.encoder.load_state_dict(state)
        self.last = GlobalDelta.from_dict(state["last"]) if state.get("last") else None
