"""Signed messages are bound to a run of their job (issue 22, item 2).

Red team: a second run of the same job id (fresh --out, another seed) committed rounds with a
device that was not running: its signed hello and updates were replays from the first run; and
replaying the first run's signed `done` made an agent exit. Each test below runs a real first
run on an in-memory broker, keeps what went over it (`MemoryBroker.log`), and replays it into
a second run at a moment a hook makes certain.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import keys
from support.fleet import JOB, TRAIN, start_agents

from fedclip_edge.broker import protocol as P
from fedclip_edge.broker.aggregator import Aggregator, AggregatorConfig, AggregatorHooks
from fedclip_edge.broker.runbind import NEWER, OLDER, SAME, compare, is_run_id, new_run_id
from fedclip_edge.broker.transport import MemoryBroker, MemoryTransport

DEVICES = ("a", "b")


def _agg(broker: MemoryBroker, out: Path, *, seed: int, rounds: int = 1, min_clients: int = 2,
         hooks: AggregatorHooks | None = None, resume: bool = False) -> Aggregator:
    cfg = AggregatorConfig(
        job=JOB, rounds=rounds, out=out, min_clients=min_clients, round_timeout_s=20.0, dim=8,
        wait_clients_s=20.0, upload_grace_s=0.0, train=TRAIN, seed=seed, resume=resume,
        registry=keys.registry(DEVICES), signing_key=keys.key(keys.AGGREGATOR))
    lines: list[str] = []
    agg = Aggregator(MemoryTransport(broker, "aggregator"), cfg, hooks=hooks, log=lines.append)
    agg.lines = lines  # type: ignore[attr-defined]
    return agg


def _first_run(tmp: Path) -> tuple[MemoryBroker, Aggregator]:
    """Run 1 of the job with devices a and b, to its end (both agents exit on its `done`)."""
    broker = MemoryBroker()
    agg = _agg(broker, tmp / "run1", seed=1)
    agents = start_agents(broker, list(DEVICES))
    agg.run()
    for _, th in agents:
        th.join(20)
    assert all(a.rounds_trained == 1 and a.job_run == agg.run_id for a, _ in agents)
    return broker, agg


def _sent(broker: MemoryBroker, sender: str, kind: str) -> list[bytes]:
    """What `sender` published on its `kind` topic (status or update), in order."""
    return [p for s, t, p, _ in broker.log if s == sender and f"/{kind}/" in t]


def _start_devices_when_run_is_retained(broker: MemoryBroker, agg: Aggregator,
                                        clients: list[str]):  # noqa: ANN202
    """Agents for run 2, started once run 2's `running` control is the retained one (before
    it, the retained control is run 1's genuine `done`, which a fresh agent obeys)."""
    watch = MemoryTransport(broker, "watch")
    watch.subscribe(P.control_topic(JOB))
    watch.connect()
    for _ in range(400):  # each recv waits for the next message: no sleep
        m = watch.recv(0.1)
        if m is not None and P.decode_message(m.payload).run == agg.run_id:
            break
    else:
        raise AssertionError("run 2 never published its control")
    watch.close()
    return start_agents(broker, clients)


def _run_in_thread(agg: Aggregator):  # noqa: ANN202
    import threading

    result: dict = {}

    def go() -> None:
        try:
            result["final"] = agg.run()
        except BaseException as exc:  # noqa: BLE001 - asserted by the caller
            result["error"] = exc

    th = threading.Thread(target=go, daemon=True)
    th.start()
    return th, result


def test_run_ids_are_random_and_ordered_by_start() -> None:
    a, b = new_run_id(now=1000), new_run_id(now=1000)
    assert is_run_id(a) and a != b  # 64 random bits each
    later = new_run_id(now=1001)
    assert compare(a, later) == NEWER and compare(later, a) == OLDER
    assert compare(a, a) == SAME
    assert compare("", a) == NEWER and compare(a, "") == OLDER  # no run: older than any
    assert compare(a, "not-a-run") == OLDER


def test_a_first_runs_hello_and_updates_replayed_into_a_second_run_are_refused(
        tmp_path: Path) -> None:
    """Before: b (not running) came online from its replayed hello and its replayed round-1
    update was accepted; a's replayed run-1 update took a's place (a's own was a duplicate)."""
    broker, first = _first_run(tmp_path)
    replays = [*_sent(broker, "b", "status"), *_sent(broker, "b", "update"),
               *_sent(broker, "a", "update")]
    assert any(P.decode_message(p).run == "" for p in _sent(broker, "b", "status"))  # 1st hello
    assert sum(1 for p in replays if P.decode_message(p).run == first.run_id) >= 3
    attacker = MemoryTransport(broker, "attacker")
    attacker.connect()

    class Replay(AggregatorHooks):
        def round_started(self, agg: Aggregator, rnd: int) -> None:
            # before round 1's global goes out: in the inbox before a can answer it
            for p in replays:
                m = P.decode_message(p)
                topic = (P.update_topic if isinstance(m, P.Update) else P.status_topic)(JOB,
                                                                                        m.client)
                attacker.publish(topic, p)

    second = _agg(broker, tmp_path / "run2", seed=2, min_clients=1, hooks=Replay())
    assert second.run_id != first.run_id
    th, result = _run_in_thread(second)
    agents = _start_devices_when_run_is_retained(broker, second, ["a"])
    th.join(60)
    assert "final" in result, (result, second.lines)
    c = second.counters
    # b's run-1 hello/statuses and a's run-1 update: refused for their run; b's first hello
    # (no run) put nobody online; b's update: b never came online
    assert c["rejected_run"] >= 3, (dict(c), second.lines)
    assert second.hellos_unbound >= 1
    assert c["rejected_unknown_client"] == 1
    assert c["accepted"] == 1 and c["rejected_duplicate"] == 0
    assert not second.roster.get("b")
    assert any(f"rejected (run) on fedclip/{JOB}/update/a: update signed for run "
               f"{first.run_id}, this job's run is {second.run_id} (a replay from another run)"
               in line for line in second.lines), second.lines
    rows = [json.loads(x) for x in (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()]
    assert {r["client"] for r in rows if r["kind"] == "client"} == {"a"}
    for _, t in agents:
        t.join(20)


def test_a_first_runs_done_replayed_stops_neither_agents_nor_aggregator(tmp_path: Path) -> None:
    """Before: the replayed `done` of run 1 made the agents exit after round 1 of run 2, and
    run 2's round 2 got no update."""
    broker, first = _first_run(tmp_path)
    done = broker.retained[P.control_topic(JOB)]
    old = P.decode_message(done)
    assert isinstance(old, P.Control) and old.state == "done" and old.run == first.run_id
    attacker = MemoryTransport(broker, "attacker")
    attacker.connect()

    class ReplayDone(AggregatorHooks):
        def after_commit(self, agg: Aggregator, rnd: int, commit_s: float,
                         reports_s: float) -> None:
            if rnd == 1:  # before round 2's global: the agents get it first
                attacker.publish(P.control_topic(JOB), done, retain=True)

    second = _agg(broker, tmp_path / "run2", seed=2, rounds=2, hooks=ReplayDone())
    th, result = _run_in_thread(second)
    agents = _start_devices_when_run_is_retained(broker, second, list(DEVICES))
    th.join(90)
    assert "final" in result, (result, second.lines)
    assert second.completed == 2
    for a, t in agents:
        t.join(20)
        assert a.rounds_trained == 2 and a.job_run == second.run_id
        assert a.rejected["run"] >= 1  # the replayed done, ignored with one line
    rows = [json.loads(x) for x in (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()]
    assert sorted((r["round"], r["client"]) for r in rows if r["kind"] == "client") == [
        (1, "a"), (1, "b"), (2, "a"), (2, "b")]


def test_resume_keeps_the_run_and_its_devices_are_accepted(tmp_path: Path) -> None:
    """An aggregator stopped after round 1 and resumed goes on as the same run: the devices'
    statuses and updates (signed for that run) count; a fresh --out makes a new run."""
    broker = MemoryBroker()

    class Crash(AggregatorHooks):
        def after_commit(self, agg: Aggregator, rnd: int, commit_s: float,
                         reports_s: float) -> None:
            if rnd == 1:
                raise KeyboardInterrupt  # stopped after round 1 was committed

    agg = _agg(broker, tmp_path / "run", seed=1, rounds=2, hooks=Crash())
    agents = start_agents(broker, list(DEVICES))
    with pytest.raises(KeyboardInterrupt):
        agg.run()
    agg.t.close()
    run = agg.run_id
    assert json.loads((tmp_path / "run" / "state.json").read_text())["run"] == run
    resumed = _agg(broker, tmp_path / "run", seed=1, rounds=2, resume=True)
    assert resumed.run_id == run
    resumed.run()
    assert resumed.completed == 2
    assert not any(k == "rejected_run" for k in resumed.counters), dict(resumed.counters)
    for a, th in agents:
        th.join(20)
        assert a.rounds_trained == 2 and a.job_run == run
    assert _agg(MemoryBroker(), tmp_path / "other", seed=1).run_id != run
