"""Issue 22's flood scenario, shared by the in-memory test and the mosquitto one.

A signed job with registered devices `a`, `b` and `evil` (each answers every round with a
constant adapter) and an unregistered `stranger`. As round 2 opens (the aggregator's
`round_started` hook, before the round's global goes out: a certain moment) a flooder publishes
garbage on `evil`'s and `stranger`'s update and status topics; as round 3 opens the penalty
clock is moved past `evil`'s window and the penalty box ticked, so `evil` is subscribed again
before round 3's global leaves (the SUBSCRIBE precedes the PUBLISH on the aggregator's one
connection). Nothing waits on a sleep: the rate limit and the penalty box run on a clock the
test moves (`FakeClock`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedclip_edge.adapter import AttentionAdapter
from fedclip_edge.broker import authn
from fedclip_edge.broker import protocol as P
from fedclip_edge.broker.aggregator import Aggregator, AggregatorConfig, AggregatorHooks
from fedclip_edge.broker.penalty import PenaltyBox
from fedclip_edge.broker.ratelimit import SenderRateLimit
from fedclip_edge.broker.transport import Transport
from fedclip_edge.wire import encode_frame
from support import keys

JOB = "flood"
DIM = 2
REGISTERED = ("a", "b", "evil")
FLOOD = 300  # garbage messages on each flooded topic: far over the test's burst of 20


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limits(clock: FakeClock, lines: list[str]) -> dict[str, Any]:
    """The transport's rate limit (burst 20, 10/s) and penalty box (10 s), on `clock`."""
    return {
        "rate_limit": SenderRateLimit(messages_per_s=10, message_burst=20, report_s=10,
                                      log=lines.append, clock=clock),
        "penalty": PenaltyBox(penalty_s=10, log=lines.append, clock=clock),
    }


def hello_payload(client: str) -> bytes:
    st = P.Status(client, "online", {"train": 6}, "test", DIM, hello=True, session="s",
                  run=keys.RUN)
    return authn.sign(st, keys.key(client), job=JOB).encode()


def update_payload(client: str, rnd: int, value: float) -> bytes:
    state = {k: torch.full(v.shape, value) for k, v in AttentionAdapter(DIM).state_dict().items()}
    frame = encode_frame(state, job=JOB, round=rnd, client=client)
    up = P.Update(JOB, rnd, client, 1, {"loss": value}, frame, session="s", run=keys.RUN)
    return authn.sign(up, keys.key(client)).encode()


class Device(threading.Thread):
    """Says hello (retained) and answers each round's global with `value` on its transport."""

    def __init__(self, t: Transport, client: str, value: float) -> None:
        super().__init__(daemon=True)
        self.t, self.client, self.value = t, client, value
        t.subscribe(P.global_topic(JOB), P.control_topic(JOB))
        t.connect(10)
        t.publish(P.status_topic(JOB, client), hello_payload(client), retain=True).wait(10)
        self.seen: set[int] = set()

    def run(self) -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            msg = self.t.recv(0.05)
            if msg is None:
                continue
            m = P.decode_message(msg.payload)
            if isinstance(m, P.Control) and m.state == "done":
                return
            if isinstance(m, P.GlobalModel) and m.round <= m.rounds and m.round not in self.seen:
                self.seen.add(m.round)
                self.t.publish(P.update_topic(JOB, self.client),
                               update_payload(self.client, m.round, self.value))


class FloodHooks(AggregatorHooks):
    """Round 2: the flood (`flood(topic, n)` publishes n garbage messages and returns once the
    broker has them). Round 3: the penalty clock moves on and the box is ticked. Records who
    answered each round and every topic the aggregator handled."""

    def __init__(self, clock: FakeClock, flood: Callable[[str, int], None]) -> None:
        self.clock, self.flood = clock, flood
        self.answered: dict[int, list[str]] = {}

    def round_started(self, agg: Aggregator, rnd: int) -> None:
        if rnd == 2:
            for who in ("stranger", "evil"):
                self.flood(P.update_topic(JOB, who), FLOOD)
                self.flood(P.status_topic(JOB, who), FLOOD)
        if rnd == 3:
            self.clock.now += 11  # past evil's 10 s window
            agg.t.penalty.tick(agg.t)  # subscribed again before round 3's global goes out

    def before_commit(self, agg: Aggregator, rnd: int, wall_s: float) -> None:
        self.answered[rnd] = sorted(agg._answered)


def make_aggregator(t: Transport, out: Path, hooks: FloodHooks, lines: list[str]) -> Aggregator:
    cfg = AggregatorConfig(job=JOB, rounds=3, out=out, min_clients=2, round_timeout_s=120.0,
                           dim=DIM, wait_clients_s=60.0, upload_grace_s=0.0,
                           registry=keys.registry(REGISTERED),
                           signing_key=keys.key(keys.AGGREGATOR), run=keys.RUN)
    agg = Aggregator(t, cfg, log=lines.append, hooks=hooks)
    handled: list[str] = []
    handle = agg._handle

    def recording(msg: Any) -> None:
        handled.append(msg.topic)
        handle(msg)

    agg._handle = recording  # type: ignore[method-assign]
    agg.handled = handled  # type: ignore[attr-defined]
    return agg


def check(agg: Aggregator, hooks: FloodHooks, lines: list[str]) -> None:
    """What both tests assert after the run."""
    assert agg.completed == 3
    # round 1 before the flood; round 2 without evil (penalized: offline, its update lost);
    # round 3 with evil again (subscribed again, its retained hello back, its update counted)
    assert hooks.answered == {1: ["a", "b", "evil"], 2: ["a", "b"], 3: ["a", "b", "evil"]}
    assert not [t for t in agg.handled if "/stranger" in t]  # type: ignore[attr-defined]
    box = agg.t.penalty
    assert box.penalties == {"evil": 1} and not box.held
    assert sum("penalty: evil went over its rate limit: unsubscribed at the broker for 10s"
               in ln for ln in lines) == 1, lines
    assert sum("penalty: evil subscribed again after 10s" in ln for ln in lines) == 1, lines
    assert "device evil is offline while it is penalized for flooding" in lines
    assert agg.counters["accepted"] == 8
