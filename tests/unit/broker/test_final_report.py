"""A federated run ends with its result table: real agents (in memory) report their zero-shot
accuracy with their first update, and the aggregator's last lines are the per-client table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import keys
from support.fleet import JOB, TRAIN, local_data, start_agents

from fedclip_edge.broker.aggregator import Aggregator, AggregatorConfig
from fedclip_edge.broker.transport import MemoryBroker, MemoryTransport
from fedclip_edge.train import accuracy


def test_run_ends_with_table_and_zero_shot_from_agents(tmp_path: Path) -> None:
    broker = MemoryBroker()
    start_agents(broker, ["a", "b"])
    cfg = AggregatorConfig(
        job=JOB,
        rounds=2,
        out=tmp_path,
        min_clients=2,
        round_timeout_s=20.0,
        dim=8,
        train=TRAIN,
        wait_clients_s=10.0,
        upload_grace_s=0.0,
        registry=keys.registry(["a", "b"]),
        signing_key=keys.key(keys.AGGREGATOR),
    )
    lines: list[str] = []
    Aggregator(MemoryTransport(broker, "aggregator"), cfg, log=lines.append).run()

    summary = json.loads((tmp_path / "summary.json").read_text())
    for client in ("a", "b"):
        data = local_data(client)
        test = data.split(0)["test"]
        expected = accuracy(None, *test, data.text_features)  # zero-shot on its test split
        row = summary["final"][client]
        assert row["zero_shot_acc"] == pytest.approx(expected)
        assert row["gain"] == pytest.approx(row["local_test_acc"] - expected)
        assert row["last_round"] == 2 and row["bytes_down_per_round"] > 0

    start = next(i for i, line in enumerate(lines) if line.startswith("result after round 2"))
    table = lines[start + 1 : start + 5]
    assert table[0].split()[:5] == ["client", "zero-shot", "global", "local", "gain"]
    a_row = table[2].split()
    assert a_row[0] == "a" and a_row[1] == f"{summary['final']['a']['zero_shot_acc']:.1%}"
    assert lines[-1].startswith(f"job {JOB} done: 2 rounds")
    # every round line says bytes per client and the total for both clients
    round_lines = [line for line in lines if line.startswith("round ")]
    assert len(round_lines) == 2 and all("/client (" in line for line in round_lines)
    # the accuracy plot is drawn at the end (the agents report accuracies)
    assert (tmp_path / "accuracy.png").stat().st_size > 1000
