"""The round engine's fleet when every client lives in this process (simulate, bench fedavg).

Why: a simulated client does what a device does (receive the global, train, send its update
through the wire codec) without a broker; the engine cannot tell it from an MQTT fleet. Clients
train one after another in a fixed order, so a run is deterministic for its seeds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from fedclip_edge.codecs import DEFAULT_TOPK_FRACTION, ErrorFeedback
from fedclip_edge.rounds.engine import OpenRound, Update
from fedclip_edge.wire import encode_update

# work(round, index of the client, its name) -> its update (trained, sent, received)
ClientWork = Callable[[OpenRound, int, str], Update]


class InProcessFleet:
    """Clients trained in turn by `work`; `on_publish(round)` runs when the global goes out
    (a caller that measures the downlink does it there or in `work`)."""

    def __init__(
        self,
        clients: Sequence[str],
        work: ClientWork,
        on_publish: Callable[[OpenRound], None] | None = None,
    ) -> None:
        self.clients = list(clients)
        self.work = work
        self.on_publish = on_publish

    def publish(self, rnd: OpenRound) -> None:
        if self.on_publish is not None:
            self.on_publish(rnd)

    def collect(self, rnd: OpenRound) -> bool:
        for i, client in enumerate(self.clients):
            rnd.add(self.work(rnd, i, client))
        return rnd.count > 0


class Uplink:
    """A client's update through the update codec, as a device sends it and the server decodes
    it: encoded against the round's global with the client's own error feedback (kept across
    rounds here, as a device keeps it on disk), decoded against the same global."""

    def __init__(
        self, codec: str, *, job: str, topk_fraction: float = DEFAULT_TOPK_FRACTION
    ) -> None:
        self.codec = codec
        self.job = job
        self.topk_fraction = topk_fraction
        self.feedback: dict[str, ErrorFeedback] = {}

    def send(
        self, rnd: OpenRound, client: str, state: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], int]:
        """(the update as the server decoded it, the frame's bytes)."""
        frame = encode_update(
            state,
            rnd.global_state,
            codec=self.codec,
            job=self.job,
            round=rnd.number,
            client=client,
            feedback=self.feedback.setdefault(client, ErrorFeedback()),
            topk_fraction=self.topk_fraction,
        )
        return rnd.decode(frame).tensors, len(frame)


def records(rnd_answered: Mapping[str, Mapping[str, Any]], key: str) -> dict[str, Any]:
    """One field of every client's record, in the round's order."""
    return {c: r[key] for c, r in rnd_answered.items()}
