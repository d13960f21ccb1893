"""The device agent driven through the in-memory transport: its per-round generator, the
outbox that re-sends a lost update, and the re-send when the aggregator repeats a global."""

from __future__ import annotations

import dataclasses
import threading
import time

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from support import keys
from support.fleet import JOB, TRAIN, start_agents

from fedclip_edge.adapter import AttentionAdapter
from fedclip_edge.broker import authn
from fedclip_edge.broker import protocol as P
from fedclip_edge.broker.transport import MemoryBroker, MemoryTransport
from fedclip_edge.device_agent.agent import round_generator
from fedclip_edge.wire import encode_frame


def _signed(msg: object) -> bytes:
    """What the aggregator publishes: signed with its key (agents refuse anything else)."""
    return authn.sign(msg, keys.key(keys.AGGREGATOR)).encode()


def test_round_generator_is_stable() -> None:
    x = torch.randperm(10, generator=round_generator(0, 1, "dev-a"))
    y = torch.randperm(10, generator=round_generator(0, 1, "dev-a"))
    z = torch.randperm(10, generator=round_generator(0, 2, "dev-a"))
    assert torch.equal(x, y) and not torch.equal(x, z)


def test_agent_outbox_resends_after_reconnect_and_drops_when_round_is_over() -> None:
    broker = MemoryBroker()
    agg_t = MemoryTransport(broker, "aggregator")
    agg_t.subscribe(P.update_filter(JOB), P.status_filter(JOB))
    agg_t.connect()
    [(agent, th)] = start_agents(broker, ["dev-a"])
    lines: list[str] = []
    agent.log = lines.append
    time.sleep(0.1)
    torch.manual_seed(0)
    state = AttentionAdapter(8).state_dict()

    def publish_global(rnd: int) -> None:
        frame = encode_frame(state, job=JOB, round=rnd, client="aggregator")
        g = P.GlobalModel(JOB, rnd, frame, seed=0, train=TRAIN, session="s", rounds=3)
        agg_t.publish(P.global_topic(JOB), _signed(g), retain=True)

    def wait_outbox(rnd: int) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (agent._outbox and agent._outbox.round == rnd):
            time.sleep(0.02)
        assert agent._outbox is not None and agent._outbox.round == rnd

    real_send = agent.t._send
    agent.t._send = lambda *a, **k: lambda timeout: False  # type: ignore  # network is down
    publish_global(1)
    wait_outbox(1)
    agent.t._send = real_send  # type: ignore[method-assign]
    agent.t.connect()  # reconnect: hello again, and the queued update goes out
    got: list[str] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(t.endswith("/update/dev-a") for t in got):
        m = agg_t.recv(0.1)
        if m is not None:
            got.append(m.topic)
    assert any(t.endswith("/update/dev-a") for t in got)
    # an update lost in round 2 is dropped once round 3's global adapter arrives
    agent.t._send = lambda *a, **k: lambda timeout: False  # type: ignore
    publish_global(2)
    wait_outbox(2)
    publish_global(3)
    wait_outbox(3)
    assert any("round 2: unsent update dropped" in line for line in lines)
    agent.t._send = real_send  # type: ignore[method-assign]
    agent.stop.set()
    th.join(5)
    assert not th.is_alive()
    assert P.decode_message(broker.retained[P.status_topic(JOB, "dev-a")]).state == "offline"


def test_agent_resends_when_a_repeated_global_does_not_list_it():
    """An update lost in transit (a broker restart, say) is re-sent when the aggregator repeats
    the same publication for its retry; a publication that lists the device gets nothing."""
    broker = MemoryBroker()
    ((agent, thread),) = start_agents(broker, ["dev-a"])
    agg = MemoryTransport(broker, "aggregator")
    agg.subscribe(P.update_filter(JOB))
    agg.connect()
    frame = encode_frame(AttentionAdapter(8).state_dict(), job=JOB, round=1, client="server")

    def publish(have: tuple[str, ...]) -> None:
        g = P.GlobalModel(JOB, 1, frame, seed=0, train=TRAIN, have=have, session="s", rounds=3)
        agg.publish(P.global_topic(JOB), _signed(g), retain=True)

    def updates(timeout: float) -> int:
        n, deadline = 0, time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = agg.recv(0.05)
            if msg is not None and "/update/" in msg.topic:
                n += 1
        return n

    try:
        publish(())
        assert updates(3.0) == 1  # trained and sent
        publish(())  # the very same publication again: the aggregator still lacks it
        assert updates(2.0) == 1
        publish(("dev-a",))  # listed: nothing to send
        assert updates(1.0) == 0
    finally:
        agg.publish(P.control_topic(JOB), _signed(P.Control(JOB, "done", 1, 3)), retain=True)
        thread.join(10)
        agg.close()


def test_agent_refuses_a_global_with_hostile_training_settings() -> None:
    """Settings from the network are typed and bounded: the agent refuses the global with one
    line (no traceback, no endless training) and takes the next, good one."""
    broker = MemoryBroker()
    ((agent, thread),) = start_agents(broker, ["dev-a"])
    lines: list[str] = []
    agent.log = lines.append
    agg = MemoryTransport(broker, "aggregator")
    agg.subscribe(P.update_filter(JOB))
    agg.connect()
    torch.manual_seed(0)
    frame = encode_frame(AttentionAdapter(8).state_dict(), job=JOB, round=1, client="aggregator")
    for i, bad in enumerate(({"batch_size": 1.5}, {"eps": -1}, {"betas": [2, 3]},
                             {"epochs": 10**9}, {"lr": 10**400}, {"nope": 1})):
        g = P.GlobalModel(JOB, 1, frame, seed=0, train={**TRAIN, **bad}, session=f"s{i}",
                          rounds=3)
        agg.publish(P.global_topic(JOB), _signed(g), retain=True)
    deadline = time.monotonic() + 30
    def refused() -> int:  # by the decoder's bounds ('fields') or the agent's own check
        return agent.rejected["bad_train_settings"] + agent.rejected["fields"]

    while time.monotonic() < deadline and refused() < 6:
        time.sleep(0.02)
    assert refused() == 6 and agent.rounds_trained == 0
    assert sum("bad training settings" in line or "ignored a bad message" in line
               for line in lines) == 6
    good = P.GlobalModel(JOB, 1, frame, seed=0, train=TRAIN, session="ok", rounds=3)
    agg.publish(P.global_topic(JOB), _signed(good), retain=True)
    m = agg.recv(5)
    assert m is not None and m.topic.endswith("/update/dev-a")
    agent.stop.set()
    thread.join(5)
    assert not thread.is_alive()


def test_agent_refuses_globals_and_controls_the_aggregator_did_not_sign() -> None:
    """A broker can inject a global every device would accept, or a retained 'done' that ends
    the job before any training: signed by another key, or not at all, both are refused."""
    broker = MemoryBroker()
    ((agent, thread),) = start_agents(broker, ["dev-a"])
    agg = MemoryTransport(broker, "aggregator")
    agg.subscribe(P.update_filter(JOB))
    agg.connect()
    torch.manual_seed(0)
    frame = encode_frame(AttentionAdapter(8).state_dict(), job=JOB, round=1, client="aggregator")
    g = P.GlobalModel(JOB, 1, frame, seed=0, train=TRAIN, session="x", rounds=3)
    stranger = Ed25519PrivateKey.generate()
    agg.publish(P.global_topic(JOB), g.encode(), retain=True)
    agg.publish(P.global_topic(JOB), authn.sign(g, stranger).encode(), retain=True)
    agg.publish(P.control_topic(JOB), P.Control(JOB, "done", 3, 3).encode(), retain=True)
    # a signed global whose train settings a broker rewrote after signing
    tampered = dataclasses.replace(authn.sign(g, keys.key(keys.AGGREGATOR)),
                                   train={**TRAIN, "epochs": 1000})
    agg.publish(P.global_topic(JOB), tampered.encode(), retain=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and sum(agent.rejected.values()) < 4:
        time.sleep(0.02)
    assert agent.rejected["unsigned"] == 2 and agent.rejected["bad_signature"] == 2
    assert not agent.done and agent.rounds_trained == 0
    agg.publish(P.global_topic(JOB), _signed(g), retain=True)
    m = agg.recv(5)
    assert m is not None and m.topic.endswith("/update/dev-a")
    up = P.decode_message(m.payload)
    assert isinstance(up, P.Update)
    assert authn.verify(up, keys.registry(["dev-a"])) == "dev-a"
    agent.stop.set()
    thread.join(5)
    assert not thread.is_alive()


def _offline_agent(broker: MemoryBroker, client: str) -> tuple[object, list[str]]:
    """An agent connected and subscribed but not yet running: what is published now waits in
    its inbox, as a persistent session's queue waits for a device that was offline."""
    from support.fleet import local_data

    from fedclip_edge.device_agent.agent import Agent, AgentConfig

    cfg = AgentConfig(JOB, client, idle_timeout_s=30, poll_s=0.02, key=keys.key(client),
                      aggregator_key=keys.aggregator_public())
    t = MemoryTransport(broker, client)
    t.subscribe(P.global_topic(JOB), P.control_topic(JOB))
    t.connect()
    lines: list[str] = []
    return Agent(t, cfg, local_data(client), log=lines.append), lines


def _global(rnd: int, rounds: int = 3) -> bytes:
    frame = encode_frame(AttentionAdapter(8).state_dict(), job=JOB, round=rnd, client="aggregator")
    return _signed(P.GlobalModel(JOB, rnd, frame, seed=0, train=TRAIN, session="s", rounds=rounds))


def _updates(agg: MemoryTransport) -> list[int]:
    out = []
    while (m := agg.recv(0)) is not None:
        if "/update/" in m.topic:
            out.append(P.decode_message(m.payload).round)
    return out


def test_agent_back_from_offline_answers_only_the_newest_global() -> None:
    """The soak's lost updates: a device restarted after being killed gets the globals of the
    rounds it missed in one burst. It trains only on the newest, and after the job ended it
    sends nothing at all (before, it answered each old global: updates nobody could count)."""
    broker = MemoryBroker()
    agg = MemoryTransport(broker, "aggregator")
    agg.subscribe(P.update_filter(JOB))
    agg.connect()
    agent, lines = _offline_agent(broker, "dev-a")
    for rnd in (1, 2, 3):  # the queue: three rounds' globals, not yet read
        agg.publish(P.global_topic(JOB), _global(rnd))
    th = threading.Thread(target=agent.run, daemon=True)
    th.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and agent.last_trained < 3:
        time.sleep(0.02)
    assert agent.last_trained == 3 and agent.rounds_trained == 1
    assert _updates(agg) == [3]
    assert any("round 1: skipped, round 2's global already arrived" in x for x in lines)
    assert any("round 2: skipped, round 3's global already arrived" in x for x in lines)
    agg.publish(P.control_topic(JOB), _signed(P.Control(JOB, "done", 3, 3)))
    th.join(10)
    assert not th.is_alive()

    # after the job: globals of rounds 2 and 3, the final global and `done`, all queued
    agent2, lines2 = _offline_agent(broker, "dev-b")
    for payload in (_global(2), _global(3), _global(4)):
        agg.publish(P.global_topic(JOB), payload)
    agg.publish(P.control_topic(JOB), _signed(P.Control(JOB, "done", 3, 3)))
    assert agent2.run() == 0
    assert _updates(agg) == []
    assert agent2.final_state is not None and agent2.done
    assert any("round 3: skipped, the final global already arrived" in x for x in lines2)


def test_agent_does_not_send_an_update_whose_round_ended_while_it_trained(monkeypatch) -> None:
    """Round 2's global arrives while round 1 trains (made certain: the training step itself
    publishes it): round 1's update is not sent, round 2's is."""
    import fedclip_edge.device_agent.round_work as agent_mod

    broker = MemoryBroker()
    agg = MemoryTransport(broker, "aggregator")
    agg.subscribe(P.update_filter(JOB))
    agg.connect()
    agent, lines = _offline_agent(broker, "dev-a")
    real_train = agent_mod.train_local
    calls: list[int] = []

    def train_and_round_moves_on(*a, **k):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 1:
            agg.publish(P.global_topic(JOB), _global(2))
        return real_train(*a, **k)

    monkeypatch.setattr(agent_mod, "train_local", train_and_round_moves_on)
    agg.publish(P.global_topic(JOB), _global(1))
    th = threading.Thread(target=agent.run, daemon=True)
    th.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and agent.last_trained < 2:
        time.sleep(0.02)
    agg.publish(P.control_topic(JOB), _signed(P.Control(JOB, "done", 3, 3)))
    th.join(10)
    assert len(calls) == 2 and agent.last_trained == 2
    assert _updates(agg) == [2]
    assert any("round 1: trained but not sent, round 2's global arrived meanwhile" in x
               for x in lines)
