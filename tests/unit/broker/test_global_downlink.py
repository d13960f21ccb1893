"""The compressed global over MQTT (issue 19), real agents on the in-memory broker: every device
trains from exactly the aggregator's global, whether it derived round 1's from the seed, applied
the delta, joined late, failed the digest or outlived an aggregator crash; and the downlink
bytes are counted per round.

The aggregator's global of round r is `rounds/global_r{r-1}` (round 1's: the seeded initial
adapter); a device's is recorded by wrapping its `globals_in.rebuild`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from support import keys
from support.fleet import JOB, TRAIN, start_agents

from fedclip_edge.broker import protocol as P
from fedclip_edge.broker.aggregator import Aggregator, AggregatorConfig, AggregatorHooks
from fedclip_edge.broker.transport import MemoryBroker, MemoryTransport
from fedclip_edge.global_codec import derive_initial, state_digest

DEVICES = ("dev-a", "dev-b", "dev-c", "dev-late")


def make_agg(broker: MemoryBroker, out: Path, hooks: AggregatorHooks | None = None,
             **kw) -> Aggregator:
    cfg = AggregatorConfig(
        job=JOB, rounds=kw.pop("rounds", 4), out=out, min_clients=kw.pop("min_clients", 3),
        round_timeout_s=10.0, dim=8, wait_clients_s=5.0, upload_grace_s=0.0, train=TRAIN,
        seed=3, registry=keys.registry(DEVICES), signing_key=keys.key(keys.AGGREGATOR),
        global_codec=kw.pop("global_codec", "int8"), **kw,
    )
    lines: list[str] = []
    agg = Aggregator(MemoryTransport(broker, "aggregator"), cfg, log=lines.append, hooks=hooks)
    agg.lines = lines  # type: ignore[attr-defined]
    return agg


def how(g: P.GlobalModel) -> str:
    """How a global came: "dense", "delta" or "derived" (round 1, made from the seed)."""
    return "dense" if not g.delta else "derived" if g.delta["codec"] == "derived" else "delta"


def record(agent) -> dict[int, tuple[str, str]]:
    """round -> (digest of the global the agent rebuilt, how it came: `how`)."""
    seen: dict[int, tuple[str, str]] = {}
    rebuild = agent.globals_in.rebuild

    def spy(g: P.GlobalModel):
        state = rebuild(g)
        if state is not None:
            seen[g.round] = (state_digest(state), how(g))
        return state

    agent.globals_in.rebuild = spy
    return seen


def server_globals(out: Path, rounds: int) -> dict[int, str]:
    """round -> digest of the global the aggregator published for it (round rounds+1: final)."""
    got = {1: state_digest(derive_initial(3, 8))}
    for r in range(2, rounds + 2):
        got[r] = state_digest(safetensors.torch.load_file(
            str(out / "rounds" / f"global_r{r - 1:04d}.safetensors")))
    return got


def summaries(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["round"]: r for r in rows if "bytes_down_per_client" in r}


def published(agg: Aggregator) -> list[tuple[int, int, P.GlobalModel]]:
    """Every global the aggregator publishes: (round, envelope bytes, the message decoded)."""
    out: list[tuple[int, int, P.GlobalModel]] = []
    real = agg.t.publish

    def spy(topic: str, payload: bytes, **kw):
        if topic == P.global_topic(JOB):
            g = P.decode_message(payload)
            out.append((g.round, len(payload), g))
        return real(topic, payload, **kw)

    agg.t.publish = spy  # type: ignore[method-assign]
    return out


def finish(agents) -> None:
    for _, th in agents:
        th.join(10)
    assert all(not th.is_alive() for _, th in agents)


def test_devices_rebuild_every_compressed_global_bit_for_bit(tmp_path: Path) -> None:
    broker = MemoryBroker()
    agents = start_agents(broker, ["dev-a", "dev-b", "dev-c"])
    seen = [record(a) for a, _ in agents]
    agg = make_agg(broker, tmp_path)
    pubs = published(agg)
    final = agg.run()
    finish(agents)
    want = server_globals(tmp_path, 4)
    for (a, _), s in zip(agents, seen, strict=True):
        assert {r: d for r, (d, _) in s.items()} == want, a.cfg.client_id
        assert [s[r][1] for r in range(1, 6)] == ["derived", "delta", "delta", "delta", "dense"]
        assert a.globals_in.dense_asked == 0 and a.rounds_trained == 4
        assert state_digest(a.final_state) == state_digest(final)
    rows = summaries(tmp_path)
    assert [rows[r]["globals_derived"] for r in range(1, 5)] == [1, 0, 0, 0]
    assert [rows[r]["globals_dense"] for r in range(1, 5)] == [0, 0, 0, 0]
    assert [rows[r]["globals_delta"] for r in range(1, 5)] == [0, 1, 1, 1]
    # round 1: one signed envelope with no frame, counted at its real size
    first = [(n, g) for r, n, g in pubs if r == 1]
    assert len(first) == 1 and first[0][1].frame == b""
    assert first[0][1].delta == {"codec": "derived", "base_round": 0, "digest": want[1]}
    assert rows[1]["bytes_down_per_client"] == first[0][0]
    assert all(0 < first[0][0] < rows[r]["bytes_down_per_client"] for r in (2, 3, 4))
    assert all(rows[r]["bytes_down_per_client"] == sum(n for q, n, _ in pubs if q == r)
               for r in range(1, 5))
    clients = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    ones = [c["bytes_down"] for c in clients if c.get("kind") == "client" and c["round"] == 1]
    assert ones == [first[0][0]] * 3  # each device's round-1 downlink: the derived envelope
    # the residual went with each commit
    saved = json.loads((tmp_path / "state.json").read_text())["plugins"][-1]
    assert saved["codec"] == "int8" and saved["last"]["round"] == 5


def test_keyframes_go_dense_every_k_rounds(tmp_path: Path) -> None:
    broker = MemoryBroker()
    agents = start_agents(broker, ["dev-a", "dev-b", "dev-c"])
    agg = make_agg(broker, tmp_path, keyframe_every=2)
    agg.run()
    finish(agents)
    rows = summaries(tmp_path)
    assert [rows[r]["globals_dense"] for r in range(1, 5)] == [0, 0, 1, 0]
    assert rows[1]["globals_derived"] == 1  # round 1 is a keyframe, made on the devices


def test_a_device_that_joins_late_gets_a_dense_global(tmp_path: Path) -> None:
    broker = MemoryBroker()
    agents = start_agents(broker, ["dev-a", "dev-b", "dev-c"])
    late: list = []

    class Join(AggregatorHooks):
        def after_commit(self, agg, rnd, commit_s, reports_s) -> None:
            if rnd == 2:  # round 3's global (a delta on round 2's) is published next
                late.extend(start_agents(broker, ["dev-late"]))
                late.append(record(late[0][0]))

    agg = make_agg(broker, tmp_path, hooks=Join())
    agg.run()
    finish(agents + late[:1])
    want = server_globals(tmp_path, 4)
    agent, seen = late[0][0], late[1]
    assert agent.globals_in.dense_asked >= 1
    assert seen and all(want[r] == d for r, (d, _) in seen.items())
    assert agent.rounds_trained >= 1 and state_digest(agent.final_state) == want[5]
    assert summaries(tmp_path)[3]["globals_dense"] >= 1


def test_a_digest_mismatch_asks_for_a_dense_copy(tmp_path: Path) -> None:
    broker = MemoryBroker()
    agents = start_agents(broker, ["dev-a", "dev-b", "dev-c"])
    seen = record(agents[0][0])

    class Corrupt(AggregatorHooks):
        def after_commit(self, agg, rnd, commit_s, reports_s) -> None:
            if rnd == 1:  # the agent waits for round 2's global: its base goes one ulp off
                gi = agents[0][0].globals_in
                w = dict(gi.state)
                name = sorted(w)[0]
                w[name] = w[name].clone()
                w[name].view(-1)[0] = torch.nextafter(w[name].view(-1)[0], torch.tensor(9.0))
                gi.state = w

    agg = make_agg(broker, tmp_path, hooks=Corrupt())
    agg.run()
    finish(agents)
    want = server_globals(tmp_path, 4)
    a = agents[0][0]
    assert a.globals_in.dense_asked == 1
    assert seen[2] == (want[2], "dense")  # round 2 came dense after the delta failed
    assert seen[3] == (want[3], "delta")  # and the deltas work again from there
    assert summaries(tmp_path)[2]["globals_dense"] == 1
    assert all(b.globals_in.dense_asked == 0 for b, _ in agents[1:])


@pytest.mark.parametrize("codec", ["topk-int8"])
def test_after_a_resume_devices_still_hold_the_servers_global(tmp_path: Path, codec: str) -> None:
    """The aggregator crashes before committing round 3; resumed, it has the residual and the
    delta of round 3 from round 2's commit: the devices that lived on apply its deltas (no dense
    copy) and end with the same global as an uninterrupted run."""
    def run(out: Path, crash_at: int | None) -> tuple[dict, list]:
        broker = MemoryBroker()
        agents = start_agents(broker, ["dev-a", "dev-b", "dev-c"])
        agg = make_agg(broker, out, global_codec=codec)
        if crash_at is not None:
            real = agg._commit

            def crash(rnd, *args, **kw):
                if rnd == crash_at:
                    raise RuntimeError("simulated crash")
                return real(rnd, *args, **kw)

            agg._commit = crash  # type: ignore[method-assign]
            with pytest.raises(RuntimeError, match="simulated crash"):
                agg.run()
            agg.t.close()
            agg = make_agg(broker, out, global_codec=codec, resume=True)
        final = agg.run()
        finish(agents)
        return final, [a for a, _ in agents]

    full, _ = run(tmp_path / "full", None)
    resumed, devices = run(tmp_path / "crashed", 3)
    assert state_digest(full) == state_digest(resumed)
    for a in devices:
        assert a.globals_in.dense_asked == 0
        assert state_digest(a.final_state) == state_digest(resumed)
    assert server_globals(tmp_path / "full", 4) == server_globals(tmp_path / "crashed", 4)


def test_the_envelope_carries_signed_delta_fields() -> None:
    import dataclasses

    from fedclip_edge import codecs, global_fields
    from fedclip_edge.broker import authn
    from fedclip_edge.signing import KeyRegistry

    assert global_fields.CODECS == codecs.CODECS
    fields = {"codec": "topk-int8", "base_round": 2, "digest": "ab" * 32}
    g = authn.sign(P.GlobalModel(JOB, 3, b"frame", rounds=4, delta=fields),
                   keys.key(keys.AGGREGATOR))
    back = P.decode_message(g.encode())
    assert back.delta == fields
    reg = KeyRegistry({P.AGGREGATOR_ID: keys.aggregator_public()})
    assert authn.verify(back, reg, key_id=P.AGGREGATOR_ID) == P.AGGREGATOR_ID
    forged = dataclasses.replace(back, delta={**fields, "digest": "cd" * 32})
    with pytest.raises(P.MessageRejected):
        authn.verify(P.decode_message(forged.encode()), reg, key_id=P.AGGREGATOR_ID)
    dense = P.decode_message(P.GlobalModel(JOB, 3, b"frame").encode())
    assert dense.delta == {} and b'"delta"' not in P.GlobalModel(JOB, 3, b"frame").encode()
    for bad in ({"codec": "fp32", "base_round": 2, "digest": "ab" * 32},
                {"codec": "zip", "base_round": 2, "digest": "ab" * 32},
                {"codec": "int8", "base_round": -1, "digest": "ab" * 32},
                {"codec": "int8", "base_round": 2, "digest": "AB" * 32},
                {"codec": "int8", "base_round": 2}, [1, 2]):
        raw = P.GlobalModel(JOB, 3, b"frame", delta=bad).encode()  # type: ignore[arg-type]
        with pytest.raises(P.MessageRejected, match="delta"):
            P.decode_message(raw)
