"""Secure aggregation through the real aggregator and agents over the in-memory broker: the
unmasked sum is plain FedAvg of the same updates within the fixed-point error, with a device
dropping after its masked vector and before it; a masked vector alone says nothing; strategies
that need individual updates are refused in one line."""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from support import keys
from support.federation import CLIENTS, make_federation
from support.fleet import JOB, TRAIN, start_agents

from fedclip_edge.adapter import AttentionAdapter
from fedclip_edge.broker import secagg_wire as W
from fedclip_edge.broker.aggregator import Aggregator, AggregatorConfig
from fedclip_edge.broker.transport import MemoryBroker, MemoryTransport
from fedclip_edge.errors import ConfigError


def secure_federation(out: Path, *, rounds: int = 1, weighting: str = "uniform",
                      stop_after: dict[str, str] | None = None, **cfg: Any
                      ) -> tuple[Aggregator, list[Any], list[threading.Thread]]:
    """Three agents and an aggregator with --secure-aggregation, as make_federation builds
    them otherwise. `stop_after`: client -> the step after whose sending that agent stops
    (its offline status follows: the certain moment of a dropout)."""
    broker = MemoryBroker()
    running = start_agents(broker, CLIENTS, secure_aggregation=True)
    for agent, _ in running:
        step = (stop_after or {}).get(agent.cfg.client_id)
        if step is not None:
            inner = agent._secagg.publish

            def publish(payload: bytes, agent=agent, inner=inner, step=step) -> Any:
                d = inner(payload)
                if W.decode(payload).step == step:
                    agent.stop.set()
                return d

            agent._secagg.publish = publish
    options: dict[str, Any] = {"round_timeout_s": 20.0, **cfg}
    config = AggregatorConfig(
        job=JOB, rounds=rounds, out=out, min_clients=3, dim=8, wait_clients_s=10.0,
        upload_grace_s=2.0, train=TRAIN, seed=3, weighting=weighting,
        registry=keys.registry(CLIENTS), signing_key=keys.key(keys.AGGREGATOR),
        secure_aggregation=True, **options)
    agg = Aggregator(MemoryTransport(broker, "aggregator"), config, log=lambda line: None)
    return agg, [a for a, _ in running], [th for _, th in running]


def plain_final(out: Path, rounds: int, weighting: str = "uniform") -> dict[str, torch.Tensor]:
    _, agg, threads = make_federation(out, rounds=rounds)
    agg.cfg.weighting = weighting
    agg.engine.strategy = agg.cfg.make_strategy()
    final = agg.run()
    for th in threads:
        th.join(30)
    return final


def record_deltas(agents: list[Any]) -> dict[str, np.ndarray]:
    """Each agent's own round-1 delta (local - global, flat), as its secure side got it."""
    got: dict[str, np.ndarray] = {}
    for agent in agents:
        inner = agent._secagg.trained

        def trained(rnd, glob, local, *rest, c=agent.cfg.client_id, inner=inner, **kw):  # type: ignore[no-untyped-def]
            if rnd == 1:
                got[c] = W.flatten(local) - W.flatten(glob)
            return inner(rnd, glob, local, *rest, **kw)

        agent._secagg.trained = trained
    return got


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> float:
    assert set(a) == set(b)
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= atol, worst
    return worst


@pytest.mark.parametrize("weighting", ["uniform", "samples"])
def test_secure_rounds_give_plain_fedavg(tmp_path: Path, weighting: str) -> None:
    plain = plain_final(tmp_path / "plain", 2, weighting)
    agg, agents, threads = secure_federation(tmp_path / "secure", rounds=2, weighting=weighting)
    secure = agg.run()
    for th in threads:
        th.join(30)
    # 62-bit fixed point: the sum is exact to ~1e-15 here; float32 rounding of the two
    # paths differs by a few ulps, which a second round of training carries on
    close(secure, plain, 1e-5)
    assert [r["clients"] for r in agg.history] == [CLIENTS, CLIENTS]
    assert all(a._secagg.sent == 2 for a in agents)
    assert agg.counters["accepted"] == 6


def initial_global() -> dict[str, torch.Tensor]:
    torch.manual_seed(3)  # the aggregator's seed: its round-1 global
    return AttentionAdapter(8).state_dict()


def expected(deltas: dict[str, np.ndarray], who: list[str]) -> dict[str, torch.Tensor]:
    """By hand: round 1's global plus the uniform mean of `who`'s own deltas."""
    glob = initial_global()
    return W.unflatten(W.flatten(glob) + np.mean([deltas[c] for c in who], axis=0), glob)


def run(agg: Aggregator, threads: list[threading.Thread]) -> dict[str, torch.Tensor]:
    final = agg.run()
    for th in threads:
        th.join(30)
    return final


def test_sum_is_the_mean_of_the_devices_deltas(tmp_path: Path) -> None:
    agg, agents, threads = secure_federation(tmp_path)
    deltas = record_deltas(agents)
    final = run(agg, threads)
    close(final, expected(deltas, CLIENTS), 1e-6)
    fp = W.fixed_point(1.0, 1.0, 3)
    assert fp.error_bound(3) < 1e-17  # the fixed point's share of that error
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    clients = [r for r in rows if r.get("kind") == "client"]
    assert sorted(r["client"] for r in clients) == CLIENTS
    assert {r["update_codec"] for r in clients} == {"secagg"}
    assert all(r["secagg_clipped"] == 0 for r in clients)


def test_a_device_dropping_after_its_masked_vector_still_counts(tmp_path: Path) -> None:
    agg, agents, threads = secure_federation(tmp_path, stop_after={"dev-c": "masked"})
    deltas = record_deltas(agents)
    final = run(agg, threads)
    close(final, expected(deltas, CLIENTS), 1e-6)
    sa = agg._secagg
    assert sa.u3 == CLIENTS and sorted(sa.reveals) == ["dev-a", "dev-b"]  # c never revealed
    assert agg.history[0]["clients"] == CLIENTS


def test_a_device_dropping_before_masking_is_left_out(tmp_path: Path) -> None:
    agg, agents, threads = secure_federation(tmp_path, stop_after={"dev-c": "shares"})
    deltas = record_deltas(agents)
    final = run(agg, threads)
    close(final, expected(deltas, ["dev-a", "dev-b"]), 1e-6)
    sa = agg._secagg
    assert sa.u2 == CLIENTS and sa.u3 == ["dev-a", "dev-b"]  # c's pairwise masks removed
    assert agg.history[0]["clients"] == ["dev-a", "dev-b"]


def test_a_masked_vector_alone_says_nothing(tmp_path: Path) -> None:
    agg, agents, threads = secure_federation(tmp_path)
    deltas = record_deltas(agents)
    run(agg, threads)
    fp = W.fixed_point(1.0, 1.0, 3)
    for c in CLIENTS:
        masked = agg._secagg.masked[c]
        plain = deltas[c]
        assert masked.size == plain.size == 144
        # decoded alone, a masked vector is uniform noise over the whole range, not the delta
        alone = fp.decode(masked)
        assert np.abs(alone - plain).mean() > 0.2  # the deltas are ~1e-2
        assert abs(np.corrcoef(alone, plain)[0, 1]) < 0.35  # ~4 sigma for 144 coordinates
        # distance to 0 in the group (x or 2**62 - x) over 2**62: uniform values average 1/4
        # (sd 0.012 for 144), the unmasked encoding of a small delta stays near 0
        def spread(v: np.ndarray) -> float:
            return float(np.mean(np.minimum(v, 2**62 - v) / 2.0**62))

        assert abs(spread(masked) - 0.25) < 0.06
        assert spread(fp.encode(plain)) < 0.02


@pytest.mark.parametrize("strategy", ["median", "trimmed-mean", "clip", "fedavg-clip"])
def test_strategies_that_need_each_update_are_refused(tmp_path: Path, strategy: str) -> None:
    with pytest.raises(ConfigError) as e:
        AggregatorConfig(job=JOB, rounds=1, out=tmp_path, min_clients=4, strategy=strategy,
                         insecure_unsigned=True, secure_aggregation=True)
    assert "\n" not in str(e.value) and strategy in str(e.value)
    assert "--secure-aggregation" in str(e.value)


def test_two_devices_and_non_fp32_codecs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="min-clients >= 3"):
        AggregatorConfig(job=JOB, rounds=1, out=tmp_path, min_clients=2,
                         insecure_unsigned=True, secure_aggregation=True)
    from fedclip_edge.device_agent.agent import AgentConfig
    with pytest.raises(ConfigError, match="update-codec int8"):
        AgentConfig(JOB, "dev-a", insecure_unsigned=True, update_codec="int8",
                    secure_aggregation=True)


def test_a_failed_attempt_is_retried_with_fresh_keys(tmp_path: Path) -> None:
    """dev-b's and dev-c's first reveals are lost: one reveal is below the threshold (2), the
    attempt fails at its deadline, the round's global goes out again and the devices redo the
    round with fresh keys; the sum is still the mean of the three deltas."""
    agg, agents, threads = secure_federation(tmp_path, round_timeout_s=4.0)
    deltas = record_deltas(agents)
    keys_sent: dict[str, list[str]] = {c: [] for c in CLIENTS}
    for agent in agents:
        c, inner = agent.cfg.client_id, agent._secagg.publish
        lost = [c in ("dev-b", "dev-c")]

        def publish(payload: bytes, c=c, inner=inner, lost=lost) -> Any:
            m = W.decode(payload)
            if m.step == "keys":
                keys_sent[c].append(m.data["s"])
            if m.step == "reveal" and lost[0]:
                lost[0] = False
                return None  # never published
            return inner(payload)

        agent._secagg.publish = publish
    final = run(agg, threads)
    close(final, expected(deltas, CLIENTS), 1e-6)
    assert all(len(set(k)) == len(k) == 2 for k in keys_sent.values()), keys_sent
    assert agg.history[0]["clients"] == CLIENTS


def test_a_device_message_of_another_run_is_refused(tmp_path: Path) -> None:
    """A device's secure-aggregation keys signed for another run of the job (a replay) are a
    counted `run` rejection; the round still ends with the three devices of this run."""
    agg, agents, threads = secure_federation(tmp_path)
    deltas = record_deltas(agents)
    replayed: list[str] = []
    agent = agents[0]
    inner = agent._secagg.publish

    def publish(payload: bytes) -> Any:
        m = W.decode(payload)
        if m.step == "keys" and not replayed:  # first, the same keys "from" an earlier run
            other = W.sign(replace(m, run="0000000001-0123456789abcdef", sig=""), agent.cfg.key)
            replayed.append(other.run)
            inner(other.encode())
        return inner(payload)

    agent._secagg.publish = publish
    final = run(agg, threads)
    close(final, expected(deltas, CLIENTS), 1e-6)
    assert replayed and agg.counters["rejected_run"] >= 1, dict(agg.counters)


def test_garbage_and_a_plain_update_are_refused_for_what_they_are(tmp_path: Path) -> None:
    """In a secure job, bytes that are no envelope are `envelope` (they were counted as a plain
    update, `secagg`, with advice about --secure-aggregation); a well-formed plain update is
    `secagg`. The round still ends with the three devices' sum."""
    from fedclip_edge.broker import protocol as P

    agg, agents, threads = secure_federation(tmp_path)
    deltas = record_deltas(agents)
    agent = agents[0]
    inner = agent._secagg.publish
    sent: list[bool] = []

    def publish(payload: bytes) -> Any:
        if not sent:
            sent.append(True)
            inner(b"FCMQ\x01" + bytes(range(64)))
            plain = P.Update(JOB, 1, agent.cfg.client_id, 10, {"loss": 1.0}, b"frame")
            inner(plain.encode())
        return inner(payload)

    agent._secagg.publish = publish
    final = run(agg, threads)
    close(final, expected(deltas, CLIENTS), 1e-6)
    assert agg.counters["rejected_envelope"] == 1, dict(agg.counters)
    assert agg.counters["rejected_secagg"] >= 1, dict(agg.counters)
