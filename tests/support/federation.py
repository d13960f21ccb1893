"""A short real federation through the in-memory transport, with a rogue message in round 1.

Why here: the status view and the Prometheus exporter are both checked against the run folder
of one real run (real agents training tiny adapters, the real aggregator), not hand-made files.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from fedclip_edge.broker import protocol as P
from fedclip_edge.broker.aggregator import Aggregator, AggregatorConfig, AggregatorHooks
from fedclip_edge.broker.transport import MemoryBroker, MemoryTransport
from support import keys
from support.fleet import JOB, TRAIN, start_agents

CLIENTS = ["dev-a", "dev-b", "dev-c"]


class _Rogue(AggregatorHooks):
    """Publishes one malformed update as round 1 starts (a certain moment: the hook), then
    hands every hook call on to `inner`."""

    def __init__(self, broker: MemoryBroker, inner: AggregatorHooks | None) -> None:
        self.inner = inner or AggregatorHooks()
        self.t = MemoryTransport(broker, "rogue")
        self.t.connect()

    def round_started(self, agg, rnd):  # type: ignore[no-untyped-def]
        self.inner.round_started(agg, rnd)
        if rnd == 1:
            self.t.publish(P.update_topic(JOB, "dev-a"), b"FCMQ\x01garbage")

    def round_closed(self, agg, rnd):  # type: ignore[no-untyped-def]
        self.inner.round_closed(agg, rnd)

    def update_handled(self, agg, seconds, accepted):  # type: ignore[no-untyped-def]
        self.inner.update_handled(agg, seconds, accepted)

    def message_rejected(self, agg, reason):  # type: ignore[no-untyped-def]
        self.inner.message_rejected(agg, reason)

    def before_commit(self, agg, rnd, wall_s):  # type: ignore[no-untyped-def]
        self.inner.before_commit(agg, rnd, wall_s)

    def after_commit(self, agg, rnd, commit_s, reports_s):  # type: ignore[no-untyped-def]
        self.inner.after_commit(agg, rnd, commit_s, reports_s)


def make_federation(
    out: Path,
    *,
    rounds: int = 2,
    hooks: AggregatorHooks | None = None,
    update_codec: str | None = None,
    strategy: str = "fedavg",
    strategy_options: dict[str, Any] | None = None,
    plugins: tuple[Any, ...] = (),
    resume: bool = False,
    agents: bool = True,
) -> tuple[MemoryBroker, Aggregator, list[threading.Thread]]:
    """Three agents started (their threads end after the job) and an aggregator ready to
    `run()` (3 updates a round); the agents send `update_codec` frames when given.
    `agents=False`: the aggregator alone (to read a run folder back, no job to serve)."""
    broker = MemoryBroker()
    running = start_agents(broker, CLIENTS, update_codec=update_codec) if agents else []
    cfg = AggregatorConfig(
        job=JOB,
        rounds=rounds,
        out=out,
        min_clients=3,
        round_timeout_s=20.0,
        dim=8,
        wait_clients_s=10.0,
        upload_grace_s=2.0,
        train=TRAIN,
        seed=3,
        registry=keys.registry(CLIENTS),
        signing_key=keys.key(keys.AGGREGATOR),
        strategy=strategy,
        strategy_options=strategy_options or {},
        resume=resume,
    )
    agg = Aggregator(
        MemoryTransport(broker, "aggregator"),
        cfg,
        log=lambda line: None,
        hooks=_Rogue(broker, hooks),
        plugins=plugins,
    )
    return broker, agg, [th for _, th in running]
