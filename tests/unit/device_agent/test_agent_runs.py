"""The agent signs for the run it holds, ignores older runs and starts newer ones afresh
(issue 22, item 2; docs/protocol.md "Runs").

Driven message by message (`Agent._dispatch`) on the in-memory broker: each step is certain.
"""

from __future__ import annotations

from support import keys
from support.fleet import JOB, TRAIN, local_data

from fedclip_edge.adapter import AttentionAdapter
from fedclip_edge.broker import authn
from fedclip_edge.broker import protocol as P
from fedclip_edge.broker.runbind import new_run_id
from fedclip_edge.broker.transport import MemoryBroker, MemoryTransport, Received
from fedclip_edge.device_agent.agent import Agent, AgentConfig
from fedclip_edge.wire import encode_frame

R1, R2 = new_run_id(now=1000), new_run_id(now=2000)


def _agent(broker: MemoryBroker) -> tuple[Agent, list[str]]:
    cfg = AgentConfig(JOB, "a", idle_timeout_s=30, poll_s=0.02, key=keys.key("a"),
                      aggregator_key=keys.aggregator_public())
    lines: list[str] = []
    agent = Agent(MemoryTransport(broker, "a"), cfg, local_data("a"), log=lines.append)
    agent.t.connect()
    return agent, lines


def _give(agent: Agent, msg: P.Control | P.GlobalModel) -> None:
    signed = authn.sign(msg, keys.key(keys.AGGREGATOR))
    payload = signed.encode()
    accepted = agent._accept(Received(P.global_topic(JOB), payload, False, len(payload)))
    assert accepted is not None
    agent._dispatch(accepted, Received(P.global_topic(JOB), payload, False, len(payload)))


def _global(rnd: int, run: str) -> P.GlobalModel:
    frame = encode_frame(AttentionAdapter(8).state_dict(), job=JOB, round=rnd, client="aggregator")
    return P.GlobalModel(JOB, rnd, frame, seed=1, train=TRAIN, session="s", rounds=2, run=run)


def _sent(broker: MemoryBroker, kind: str) -> list[P.Message]:
    return [P.decode_message(p) for s, t, p, _ in broker.log if s == "a" and f"/{kind}/" in t]


def test_the_agent_says_hello_for_the_run_it_learns_and_signs_its_update_for_it() -> None:
    broker = MemoryBroker()
    agent, _ = _agent(broker)
    _give(agent, P.Control(JOB, "running", 0, 2, "s", run=R1))
    hellos = [m for m in _sent(broker, "status") if isinstance(m, P.Status) and m.hello]
    assert agent.job_run == R1 and hellos[-1].run == R1
    _give(agent, _global(1, R1))
    (up,) = _sent(broker, "update")
    assert isinstance(up, P.Update) and up.round == 1 and up.run == R1
    assert authn.verify(up, keys.registry(["a"])) == "a"  # the run is in what is signed


def test_an_older_runs_done_is_ignored_and_a_newer_run_starts_afresh() -> None:
    broker = MemoryBroker()
    agent, lines = _agent(broker)
    _give(agent, _global(1, R2))
    assert agent.last_trained == 1
    # run 1's `done`, replayed: one line, counted, the agent goes on
    _give(agent, P.Control(JOB, "done", 2, 2, "s", run=R1))
    assert not agent.done and agent.rejected["run"] == 1
    assert sum("ignored a Control of run" in x for x in lines) == 1
    # run 1's round-1 global, replayed: ignored, nothing trained or resent
    _give(agent, _global(1, R1))
    assert agent.rejected["run"] == 2 and len(_sent(broker, "update")) == 1
    # a newer run: its round 1 is new work (before, round 1 == last trained: the old update
    # would have been resent into it)
    r3 = new_run_id(now=3000)
    _give(agent, _global(1, r3))
    ups = _sent(broker, "update")
    assert len(ups) == 2 and [u.run for u in ups] == [R2, r3]
    assert any(f"run {r3} started (was {R2})" in x for x in lines)
    assert [m.run for m in _sent(broker, "status") if m.hello][-1] == r3
    _give(agent, P.Control(JOB, "done", 2, 2, "s", run=r3))
    assert agent.done


def test_a_fresh_agent_obeys_a_done_only_when_its_runs_global_confirms_it() -> None:
    """A device that has just started holds no run: a replayed `done` of an earlier run must
    not end it (the current run's retained control follows), a finished job's must (its final
    global is retained beside it)."""
    broker = MemoryBroker()
    agent, _ = _agent(broker)
    _give(agent, P.Control(JOB, "done", 2, 2, "s", run=R1))  # a replay reaches it first
    assert not agent.done
    _give(agent, P.Control(JOB, "running", 0, 2, "s", run=R2))  # the current run's
    assert not agent.done and agent.job_run == R2
    _give(agent, _global(1, R2))
    assert len(_sent(broker, "update")) == 1  # it works for the current run

    finished = MemoryBroker()
    late, _ = _agent(finished)
    _give(late, P.Control(JOB, "done", 2, 2, "s", run=R2))
    assert not late.done
    _give(late, _global(3, R2))  # the final adapter (round 3 > rounds 2)
    assert late.done and late.final_state is not None and not _sent(finished, "update")
