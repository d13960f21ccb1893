"""Issue 22: a flood stays at the broker. A signed job subscribes to its registered ids' own
topics (an unregistered id's flood is never routed to the aggregator), and a registered id over
its rate limit is unsubscribed for a penalty window, then subscribed again (broker/penalty.py).
The scenario (tests/support/flood.py) runs here in memory and in
tests/integration/test_flood_mosquitto.py against a real mosquitto."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from support import flood, keys

from fedclip_edge.broker import protocol as P
from fedclip_edge.broker.aggregator import Aggregator, AggregatorConfig
from fedclip_edge.broker.penalty import PenaltyBox, id_filters
from fedclip_edge.broker.transport import MemoryBroker, MemoryTransport, MqttTransport


class _Subs:
    """What PenaltyBox needs of a transport: its filters, subscribe and unsubscribe."""

    def __init__(self, filters: list[str]) -> None:
        self._filters = dict.fromkeys(filters)
        self.calls: list[tuple[str, tuple[str, ...]]] = []

    def subscribe(self, *patterns: str) -> None:
        self._filters.update(dict.fromkeys(patterns))
        self.calls.append(("sub", patterns))

    def unsubscribe(self, *patterns: str) -> None:
        for p in patterns:
            self._filters.pop(p)
        self.calls.append(("unsub", patterns))


def test_the_penalty_doubles_while_a_sender_keeps_flooding_is_capped_and_forgiven() -> None:
    now = [0.0]
    lines: list[str] = []
    box = PenaltyBox(penalty_s=10, max_penalty_s=40, log=lines.append, clock=lambda: now[0])
    t = _Subs(id_filters("j", ["x", "y"]))
    topic = P.update_topic("j", "x")
    windows = []
    for _ in range(4):
        box.tripped(t, topic)
        assert box.held == {"x"} and box.holds(topic) and not box.holds(P.update_topic("j", "y"))
        box.tripped(t, topic)  # already held: nothing more
        start = now[0]
        while box.held:
            now[0] += 1
            box.tick(t)
        windows.append(now[0] - start)
    assert windows == [10, 20, 40, 40]  # doubled while it keeps tripping, capped
    assert t.calls[0] == ("unsub", ("fedclip/j/update/x", "fedclip/j/status/x"))
    assert t.calls[1] == ("sub", ("fedclip/j/update/x", "fedclip/j/status/x"))
    assert len(t.calls) == 8 and box.penalties == {"x": 4} and box.dropped == {"x": 4}
    assert box.take_new() == ["x"] * 4 and box.take_new() == []
    now[0] += 41  # quiet for longer than the cap: forgiven, back to the first window
    box.tripped(t, topic)
    assert "for 10s (penalty 1 in a row)" in lines[-1]
    # a sender heard through a wildcard only (an unsigned job) cannot be unsubscribed alone
    w = _Subs([P.update_filter("j"), P.status_filter("j")])
    box.tripped(w, P.update_topic("j", "z"))
    assert w.calls == [] and "z" not in box.held


def test_signed_jobs_subscribe_registered_ids_and_unsigned_jobs_the_wildcards(tmp_path) -> None:
    def agg(**kw: Any) -> Aggregator:
        cfg = AggregatorConfig(job="j", rounds=1, out=tmp_path, dim=2, **kw)
        return Aggregator(MemoryTransport(MemoryBroker(), "aggregator"), cfg)

    signed = agg(registry=keys.registry(["b", "a"]), signing_key=keys.key(keys.AGGREGATOR))
    assert signed._subscriptions() == [
        "fedclip/j/update/a", "fedclip/j/status/a", "fedclip/j/update/b", "fedclip/j/status/b",
        "fedclip/j/status/+",  # until the rounds start: a refused hello is named with its fix
    ]
    signed.t.subscribe(*signed._subscriptions())
    signed._narrow()
    assert list(signed.t._filters) == id_filters("j", ["a", "b"])
    unsigned = agg(insecure_unsigned=True)
    assert unsigned._subscriptions() == ["fedclip/j/update/+", "fedclip/j/status/+"]


def test_ten_thousand_ids_subscribe_in_batches_of_500() -> None:
    class _Client:
        def __init__(self) -> None:
            self.packets: list[Any] = []

        def subscribe(self, topics: Any, qos: int = 0) -> None:
            self.packets.append(topics)

    t = MqttTransport("mqtt://127.0.0.1:1", "x")
    t.client = _Client()  # type: ignore[assignment]
    t._connected = True
    t.subscribe(*id_filters("j", [f"d{i}" for i in range(10_000)]))
    packets = t.client.packets  # type: ignore[attr-defined]
    assert len(packets) == 40 and all(len(p) == 500 for p in packets)
    assert packets[0][0] == ("fedclip/j/update/d0", 1)


def test_a_flood_stays_at_the_broker_and_the_honest_rounds_complete(tmp_path: Path) -> None:
    """The stranger's flood is never routed to the aggregator; evil is unsubscribed as it
    trips its limit (its round-2 update is its own loss and round 2 does not wait for it),
    subscribed again for round 3, and its round-3 update counts."""
    broker = MemoryBroker()
    clock, lines = flood.FakeClock(), []
    devices = [flood.Device(MemoryTransport(broker, c), c, v)
               for c, v in (("a", 1.0), ("b", 3.0), ("evil", 2.0))]
    flooder = MemoryTransport(broker, "flooder")
    flooder.connect()

    def publish_garbage(topic: str, n: int) -> None:
        for i in range(n):
            flooder.publish(topic, b"FCMQ\x01garbage" + bytes([i % 256]) * 186)

    hooks = flood.FloodHooks(clock, publish_garbage)
    t = MemoryTransport(broker, "aggregator", **flood.limits(clock, lines))
    agg = flood.make_aggregator(t, tmp_path, hooks, lines)
    for d in devices:
        d.start()
    agg.run()
    flood.check(agg, hooks, lines)
    # round 2's global went out again as evil was penalized (an update the broker dropped
    # from a full queue is sent again); nobody's update was lost here, so nothing was resent
    globals_2 = [p for _, topic, p, _ in broker.log if topic == P.global_topic(flood.JOB)
                 and p and P.decode_message(p).round == 2]
    assert len(globals_2) == 2 and agg.counters["rejected_duplicate"] == 0
    # in memory nothing is queued for the aggregator: the unsubscribe stops evil at once
    assert t.penalty.dropped == {} and t.rate_limit.dropped["evil"] == 1


def test_a_sender_back_from_a_penalty_that_still_floods_trips_after_its_probation() -> None:
    """Back from its penalty a sender has 5 messages (probation), not its burst of 100: a flood
    that goes on costs the aggregator 5 garbage messages to decode, not 100."""
    from fedclip_edge.broker.ratelimit import SenderRateLimit

    clock, lines = flood.FakeClock(), []
    broker = MemoryBroker()
    t = MemoryTransport(broker, "aggregator",
                        rate_limit=SenderRateLimit(messages_per_s=10, message_burst=100,
                                                   log=lines.append, clock=clock),
                        penalty=PenaltyBox(penalty_s=10, probation_messages=5,
                                           log=lines.append, clock=clock))
    t.subscribe(*id_filters("j", ["x", "y"]))
    t.connect()
    flooder = MemoryTransport(broker, "flooder")
    flooder.connect()

    def flood_x(n: int) -> int:
        for _ in range(n):
            flooder.publish(P.update_topic("j", "x"), b"garbage")
        got = 0
        while t.recv(0) is not None:
            got += 1
        return got

    assert flood_x(300) == 100 and t.penalty.held == {"x"}  # the burst, then unsubscribed
    clock.now += 11
    t.recv(0)  # the penalty is over: subscribed again, on probation
    assert t.penalty.held == set()
    assert flood_x(300) == 5 and t.penalty.held == {"x"}  # 5 more, then held again (20 s)
    assert "for 20s (penalty 2 in a row)" in lines[-1]
    flooder.publish(P.update_topic("j", "y"), b"honest")  # another sender: untouched
    assert t.recv(0) is not None
