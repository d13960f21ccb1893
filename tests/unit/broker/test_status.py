"""`fedclip-edge status`: the status dict from retained messages (in-memory broker) and from the
run folder of a real short federation, the bounded collection, the table and the command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.federation import CLIENTS, make_federation
from support.fleet import JOB

from fedclip_edge.broker import protocol as P
from fedclip_edge.broker import report as M
from fedclip_edge.broker.status import (
    build_status,
    collect_retained,
    format_status,
    status_from_messages,
    status_from_run_folder,
)
from fedclip_edge.broker.transport import MemoryBroker, MemoryTransport, Received
from fedclip_edge.cli import main
from fedclip_edge.errors import ConfigError
from fedclip_edge.wire import encode_frame


def _device(broker: MemoryBroker, client: str, backend: str, state: str = "online", rnd: int = -1):
    t = MemoryTransport(
        broker, client, will=(P.status_topic(JOB, client), P.offline_status(client), True)
    )
    t.connect()
    st = P.Status(client, state, {"train": 6, "val": 2, "test": 2}, backend, 8, round=rnd)
    t.publish(P.status_topic(JOB, client), st.encode(), retain=True)
    return t


def _global(rnd: int, rounds: int, have: tuple[str, ...] = ()) -> bytes:
    import torch

    frame = encode_frame({"w": torch.zeros(4)}, job=JOB, round=rnd, client=P.AGGREGATOR_ID)
    return P.GlobalModel(JOB, rnd, frame, rounds=rounds, have=have).encode()


def _mid_round_broker() -> tuple[MemoryBroker, int]:
    """Round 2 of 3 in progress: a answered it, b has not, c dropped (its will went out)."""
    broker = MemoryBroker()
    _device(broker, "a", "tensorrt", "uploaded", rnd=2)
    _device(broker, "b", "onnxruntime", "uploaded", rnd=1)
    _device(broker, "c", "onnxruntime")
    broker.drop("c")
    agg = MemoryTransport(broker, "aggregator")
    agg.connect()
    payload = _global(2, 3)
    agg.publish(P.global_topic(JOB), payload, retain=True)
    agg.publish(P.control_topic(JOB), P.Control(JOB, "running", 0, 3).encode(), retain=True)
    # another job's retained topics on the same broker are not this job's
    other = P.Status("x", "online", {}, "torch", 8)
    agg.publish(P.status_topic("other", "x"), other.encode(), retain=True)
    return broker, len(payload)


def test_retained_topics_say_devices_round_and_who_answered() -> None:
    broker, global_bytes = _mid_round_broker()
    messages = collect_retained(MemoryTransport(broker, "status-1"), JOB, quiet_s=0.05)
    assert set(messages) == {P.status_topic(JOB, c) for c in "abc"} | {
        P.global_topic(JOB),
        P.control_topic(JOB),
    }
    st = status_from_messages(JOB, messages)
    assert st["state"] == "running"
    assert (st["current_round"], st["rounds"], st["completed_round"]) == (2, 3, 1)
    assert st["answered"] == ["a"] and st["expected"] == ["a", "b"]
    assert st["devices_online"] == 2
    by = {d["client"]: d for d in st["devices"]}
    assert (by["a"]["backend"], by["b"]["backend"]) == ("tensorrt", "onnxruntime")
    assert by["c"]["online"] is False and by["c"]["state"] == "offline"
    assert by["a"]["samples"] == 10 and by["a"]["last_round"] == 2
    assert st["global_bytes"] == global_bytes
    text = format_status(build_status(JOB, messages, broker="mqtt://x"))
    assert "round 2/3 in progress" in text and "answered 1/2 (waiting for b)" in text
    assert "pass --out" in text


def test_the_global_have_list_counts_as_answered_and_done_jobs_have_no_round() -> None:
    msgs = {
        P.global_topic(JOB): _global(2, 3, have=("b",)),
        P.status_topic(JOB, "b"): P.Status("b", "online", {}, "torch", 8, round=1).encode(),
    }
    assert status_from_messages(JOB, msgs)["answered"] == ["b"]
    msgs[P.global_topic(JOB)] = _global(4, 3)  # the final adapter stays retained
    msgs[P.control_topic(JOB)] = P.Control(JOB, "done", 3, 3).encode()
    st = status_from_messages(JOB, msgs)
    assert st["state"] == "done" and st["current_round"] is None and st["completed_round"] == 3
    msgs[P.control_topic(JOB)] = b"FCMQ\x01junk"
    assert status_from_messages(JOB, msgs)["unreadable_topics"] == [P.control_topic(JOB)]


class _Chatty(MemoryTransport):
    """A topic that changes faster than the quiet period: collection must still end."""

    def __init__(self, broker: MemoryBroker, clock: list[float]) -> None:
        super().__init__(broker, "status-chatty")
        self.clock = clock

    def recv(self, timeout: float) -> Received | None:
        self.clock[0] += 0.1
        return Received(P.status_topic(JOB, "a"), b"x")


def test_collection_ends_after_max_wait_even_when_messages_keep_coming() -> None:
    now = [0.0]
    t = _Chatty(MemoryBroker(), now)
    got = collect_retained(t, JOB, quiet_s=1.0, max_wait_s=3.0, clock=lambda: now[0])
    assert got == {P.status_topic(JOB, "a"): b"x"}
    assert 3.0 <= now[0] <= 3.2


# ----------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[MemoryBroker, Path]:
    out = tmp_path_factory.mktemp("status") / "out"
    broker, agg, threads = make_federation(out, rounds=2)
    agg.run()
    for th in threads:  # each agent's "offline" status is out once its thread ended
        th.join(30)
    assert not any(th.is_alive() for th in threads)
    return broker, out


def test_the_run_folder_gives_accuracy_latency_bytes_and_rejections(run) -> None:
    _, out = run
    st = status_from_run_folder(out)
    records = M.read_metrics(out / "metrics.jsonl")
    last = [r for r in records if r["kind"] == "round" and r["round"] == 2][0]
    rows = [r for r in records if r["kind"] == "client" and r["round"] == 2]
    lat = sorted(r["update_latency_s"] for r in rows)
    assert st["job"] == JOB and st["completed_round"] == 2 and st["state"] == "done"
    lr = st["last_round"]
    assert lr["round"] == 2 and lr["clients"] == 3
    assert lr["heldout_acc"] == last["heldout_acc"]
    assert lr["personalization_acc"] == pytest.approx(last["personalization_acc"])
    assert lr["latency_s"]["p50"] == lat[1] and lr["latency_s"]["max"] == lat[2]
    assert lat[1] <= lr["latency_s"]["p95"] <= lat[2]
    assert lr["bytes_up"] == sum(r["bytes_up"] for r in rows) > 0
    assert lr["bytes_down_per_client"] == pytest.approx(lr["bytes_down"] / 3)
    every = [r for r in records if r["kind"] == "client"]
    assert st["run"]["bytes_down"] == sum(r["bytes_down"] for r in every)
    assert st["run"]["accepted"] == 6
    assert st["rejected"] == {"envelope": 1}  # the rogue's garbage in round 1
    assert [d["client"] for d in st["devices"]] == CLIENTS
    assert {d["backend"] for d in st["devices"]} == {"memory"}
    assert all(d["last_round"] == 2 for d in st["devices"])


def test_broker_and_folder_together_after_the_run(run) -> None:
    broker, out = run
    messages = collect_retained(MemoryTransport(broker, "status-2"), JOB, quiet_s=0.05)
    st = build_status(JOB, messages, out, broker="mem")
    assert st["state"] == "done" and st["current_round"] is None
    assert st["completed_round"] == 2 and st["rounds"] == 2
    assert st["devices_online"] == 0  # agents said "offline" when the job ended
    assert st["rejected"] == {"envelope": 1} and st["last_round"]["clients"] == 3
    assert st["devices_as_of"] is None  # live, from the broker
    text = format_status(st)
    assert "rejected: envelope 1" in text and "devices: 0 online of 3" in text
    assert "held-out" in text and "p95" in text
    # a last will carries no description: the run folder's roster fills it in
    messages[P.status_topic(JOB, "dev-a")] = P.offline_status("dev-a")
    del messages[P.status_topic(JOB, "dev-b")]
    by = {d["client"]: d for d in build_status(JOB, messages, out)["devices"]}
    assert by["dev-a"]["backend"] == "memory" and by["dev-a"]["last_round"] == 2
    assert by["dev-b"]["state"] == "no retained status" and by["dev-b"]["online"] is False
    assert status_from_messages(JOB, messages)["devices"][0]["backend"] is None


def test_status_command_table_and_json(run, capsys: pytest.CaptureFixture[str]) -> None:
    _, out = run
    assert main(["status", "--out", str(out), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["schema"] == "fedclip-edge/status/v1" and st["completed_round"] == 2
    assert st["sources"] == {"broker": None, "out": str(out)}
    assert main(["status", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"job {JOB}: done") and "dev-a" in text and "memory" in text
    assert "devices (as the aggregator saw them at its round 2 commit): 3 online of 3" in text


@pytest.mark.parametrize(
    "args, needle",
    [
        ([], "give --broker URL --job J, --out DIR, or both"),
        (["--broker", "mqtt://127.0.0.1:1"], "--broker needs --job"),
        (["--broker", "mqtt://127.0.0.1:1", "--job", "my job"], "job 'my job' must be"),
        (["--out", "/nonexistent/run"], "is not a folder"),
    ],
)
def test_status_mistakes_are_one_line(args, needle, capsys) -> None:
    assert main(["status", *args]) == ConfigError.exit_code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]


def test_a_folder_without_a_committed_round_or_of_another_job(run, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no state.json"):
        status_from_run_folder(tmp_path)
    with pytest.raises(ConfigError, match="belongs to job 'j1', not 'other'"):
        status_from_run_folder(run[1], "other")
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is not JSON"):
        status_from_run_folder(tmp_path)
