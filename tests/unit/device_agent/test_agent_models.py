"""The agent keeps what it learned: a real federation through the in-memory transport (three
agents, the real aggregator, 2 rounds); at the job's end each agent writes the final global
adapter and its personalized copy to its model store and the gate promotes one."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from support import keys
from support.fleet import JOB, TRAIN, start_agents

from fedclip_edge.adapter import AttentionAdapter
from fedclip_edge.broker.aggregator import Aggregator, AggregatorConfig
from fedclip_edge.broker.transport import MemoryBroker, MemoryTransport
from fedclip_edge.serving.gate import decide
from fedclip_edge.serving.store import ModelStore
from fedclip_edge.train import accuracy

CLIENTS = ["dev-a", "dev-b", "dev-c"]


def _run(tmp_path: Path, name: str, models: Path, rounds: int = 2):
    broker = MemoryBroker()
    agents = start_agents(broker, CLIENTS, models=models)
    logs: dict[str, list[str]] = {}
    for agent, _ in agents:
        logs[agent.cfg.client_id] = lines = []
        agent.log = lines.append
    cfg = AggregatorConfig(
        job=JOB, rounds=rounds, out=tmp_path / name, min_clients=3, round_timeout_s=20.0,
        dim=8, wait_clients_s=10.0, upload_grace_s=2.0, train=TRAIN, seed=3,
        registry=keys.registry(CLIENTS), signing_key=keys.key(keys.AGGREGATOR),
    )
    final = Aggregator(MemoryTransport(broker, "aggregator"), cfg, log=lambda _: None).run()
    for _, th in agents:
        th.join(60)
        assert not th.is_alive()
    return {a.cfg.client_id: a for a, _ in agents}, logs, final


def test_a_finished_job_leaves_gated_versions_in_each_store(tmp_path: Path) -> None:
    models = tmp_path / "models"
    agents, logs, final = _run(tmp_path, "agg1", models)
    for client, agent in agents.items():
        store = ModelStore(models / client)
        g, p = store.versions()
        assert (g.name, p.name) == ("v0001-global", "v0002-personal")
        # the global version is the aggregator's final adapter, bit for bit
        state, text, scale = g.load()
        assert all(torch.equal(state[k], final[k].float()) for k in final)
        assert torch.allclose(text, torch.nn.functional.normalize(agent.data.text_features, dim=-1))
        m = g.manifest
        assert (m["job"], m["round"], m["client_id"]) == (JOB, 2, client)
        assert m["signature_checked"] is True and m["split_seed"] == 3
        assert m["global_sha256"] == hashlib.sha256(agent.final_global.frame).hexdigest()
        assert p.manifest["personalize_epochs"] == 5
        # the accuracies are the stored adapters' on the agent's val split (seed 3)
        val = agent.data.split(3)["val"]
        for v, key in ((g, "global"), (p, "personal")):
            a = AttentionAdapter(8)
            a.load_state_dict(v.load()[0])
            assert v.accuracy[key] == accuracy(a, *val, agent.data.text_features)
        assert g.accuracy["zero_shot"] == accuracy(None, *val, agent.data.text_features)
        # the decision is the gate's on those numbers; one line per version in the log
        d = decide(zero_shot=g.accuracy["zero_shot"], global_acc=g.accuracy["global"],
                   personal_acc=g.accuracy["personal"], margin=0.0)
        assert agent.kept.decision == d
        expected_current = {"global": g.name, "personal": p.name, None: None}[d.promote]
        assert store.current_name() == expected_current
        assert f"model {g.name}: {d.reasons['global']}" in logs[client]
        assert f"model {p.name}: {d.reasons['personal']}" in logs[client]


def test_a_second_job_is_gated_against_the_current_version(tmp_path: Path) -> None:
    models = tmp_path / "models"
    _run(tmp_path, "agg1", models)
    before = {c: ModelStore(models / c).current_name() for c in CLIENTS}
    agents, logs, _ = _run(tmp_path, "agg2", models)
    for client, agent in agents.items():
        store = ModelStore(models / client)
        assert [v.name for v in store.versions()][2:] == ["v0003-global", "v0004-personal"]
        g = store.version("v0003-global")
        if before[client] is not None:  # same classes: the current one is measured and a bar
            assert g.manifest["compared_with"]["name"] == before[client]
            cur = store.version(before[client])
            a = AttentionAdapter(8)
            a.load_state_dict(cur.load()[0])
            val = agent.data.split(3)["val"]
            assert g.manifest["compared_with"]["val_accuracy"] == accuracy(
                a, *val, agent.data.text_features)
        d = agent.kept.decision
        assert store.current_name() == (
            {"global": "v0003-global", "personal": "v0004-personal"}.get(d.promote)
            or before[client]
        )


def test_no_store_no_models(tmp_path: Path) -> None:
    """Without cfg.models (the in-memory tests' default) nothing is written or attempted."""
    broker = MemoryBroker()
    [(agent, th)] = start_agents(broker, ["dev-a"])
    assert agent.cfg.models is None
    agent.stop.set()
    th.join(10)
    assert agent.kept is None
