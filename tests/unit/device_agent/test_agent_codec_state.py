"""The agent's error-feedback state file (issue 11): saved before the update is published,
loaded after a restart, a saved update re-sent byte for byte, a bad file a warning and a zero
residual.

The agent is driven by hand (recv + _on_message, no thread), so every step is deterministic:
local training is seeded by (seed, round, client), so two agents given the same global and the
same residual produce the same frame, bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support import keys
from support.fleet import JOB, TRAIN, local_data

from fedclip_edge.adapter import AttentionAdapter
from fedclip_edge.broker import authn
from fedclip_edge.broker import protocol as P
from fedclip_edge.broker.transport import MemoryBroker, MemoryTransport
from fedclip_edge.device_agent.agent import Agent, AgentConfig
from fedclip_edge.device_agent.codec_state import CodecState, default_state_path
from fedclip_edge.errors import ConfigError
from fedclip_edge.wire import decode_update, encode_frame, expected_shapes

CLIENT = "dev-a"
SHAPES = expected_shapes(AttentionAdapter(8).state_dict())


class Fleet:
    """One broker, an aggregator-side transport that publishes globals and collects updates."""

    def __init__(self) -> None:
        self.broker = MemoryBroker()
        self.agg = MemoryTransport(self.broker, "aggregator")
        self.agg.subscribe(P.update_filter(JOB))
        self.agg.connect()

    def agent(self, state_file: Path | None, codec: str = "topk-int8") -> Agent:
        cfg = AgentConfig(JOB, CLIENT, key=keys.key(CLIENT),
                          aggregator_key=keys.aggregator_public(), update_codec=codec,
                          topk_fraction=0.1, state_file=state_file)
        t = MemoryTransport(self.broker, CLIENT)
        t.subscribe(P.global_topic(JOB))
        t.connect()
        lines: list[str] = []
        a = Agent(t, cfg, local_data(CLIENT), log=lines.append)
        a.lines = lines  # type: ignore[attr-defined]
        # as after a restart: the retained global (if any) arrives first
        while (msg := t.recv(0.2)) is not None:
            a._on_message(msg)
        a.startup = self.updates()  # type: ignore[attr-defined]
        return a

    def updates(self) -> list[bytes]:
        out = []
        while (got := self.agg.recv(0.3)) is not None:
            out.append(got.payload)
        return out

    def publish(self, rnd: int, state: dict[str, torch.Tensor], have: tuple[str, ...] = ()
                ) -> None:
        frame = encode_frame(state, job=JOB, round=rnd, client="aggregator")
        g = P.GlobalModel(JOB, rnd, frame, seed=0, train=TRAIN, have=have, session="s",
                          rounds=5)
        self.agg.publish(P.global_topic(JOB), authn.sign(g, keys.key(keys.AGGREGATOR)).encode(),
                         retain=True)

    def global_round(self, agent: Agent, rnd: int, state: dict[str, torch.Tensor],
                     have: tuple[str, ...] = ()) -> bytes | None:
        """Publish round rnd's global, let the agent handle it; its update payload, if any."""
        self.publish(rnd, state, have)
        msg = agent.t.recv(5.0)
        assert msg is not None
        agent._on_message(msg)
        got = self.updates()
        assert len(got) <= 1
        return got[0] if got else None


def glob(value: float = 0.0) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v + value for k, v in AttentionAdapter(8).state_dict().items()}


def frame_of(payload: bytes | None) -> bytes:
    assert payload is not None
    up = P.decode_message(payload)
    assert isinstance(up, P.Update)
    return up.frame


def load(path: Path, codec: str = "topk-int8") -> CodecState:
    return CodecState.load(path, job=JOB, client=CLIENT, codec=codec, shapes=SHAPES,
                           log=lambda line: None)


def test_state_is_saved_before_the_update_is_published(tmp_path: Path) -> None:
    f = Fleet()
    path = tmp_path / "state.safetensors"
    agent = f.agent(path)
    seen: list[CodecState] = []
    real = agent.t.publish

    def publish(topic: str, payload: bytes, *a: object, **kw: object):  # noqa: ANN202
        if "/update/" in topic:
            seen.append(load(path))  # what is on disk at the moment the update leaves
            assert seen[-1].update == payload
        return real(topic, payload, *a, **kw)

    agent.t.publish = publish  # type: ignore[method-assign]
    for rnd in (1, 2):
        assert f.global_round(agent, rnd, glob(0.01 * rnd)) is not None
    assert [s.round for s in seen] == [1, 2]
    # a top-k codec leaves most of the delta behind: the residual is real and finite
    residual = seen[-1].residual
    assert residual and all(bool(torch.isfinite(r).all()) for r in residual.values())
    assert sum(float(r.abs().sum()) for r in residual.values()) > 0


def test_a_restarted_agent_continues_from_the_saved_residual(tmp_path: Path) -> None:
    # uninterrupted: rounds 1 and 2 in one process
    f = Fleet()
    one = f.agent(tmp_path / "one.safetensors")
    f.global_round(one, 1, glob(0.0))
    want = frame_of(f.global_round(one, 2, glob(0.01)))
    # restarted between rounds 1 and 2: a new process with the same state file
    f2 = Fleet()
    path = tmp_path / "two.safetensors"
    first = f2.agent(path)
    f2.global_round(first, 1, glob(0.0))
    first.t.close()
    again = f2.agent(path)
    assert len(again.startup) == 1  # type: ignore[attr-defined]  # round 1's, saved, re-sent
    got = frame_of(f2.global_round(again, 2, glob(0.01)))
    assert got == want
    assert any("residual after round 1" in line for line in again.lines)  # type: ignore
    # without the file the residual is lost, and round 2's frame differs (the device comes
    # back while round 2's global is the retained one)
    f3 = Fleet()
    path3 = tmp_path / "three.safetensors"
    lost = f3.agent(path3)
    f3.global_round(lost, 1, glob(0.0))
    lost.t.close()
    path3.unlink()
    f3.publish(2, glob(0.01))
    fresh = f3.agent(path3)
    [lost_frame] = fresh.startup  # type: ignore[attr-defined]
    assert frame_of(lost_frame) != want


def test_a_restart_within_a_round_resends_the_saved_bytes(tmp_path: Path) -> None:
    f = Fleet()
    path = tmp_path / "state.safetensors"
    first = f.agent(path)
    sent = f.global_round(first, 1, glob(0.0))
    after_first = load(path)
    first.t.close()
    again = f.agent(path)  # the retained global of round 1 (have = ()): the aggregator lacks it
    [resent] = again.startup  # type: ignore[attr-defined]
    assert resent == sent  # byte for byte: envelope, metrics and signature included
    assert any("re-sending the update saved" in line for line in again.lines)  # type: ignore
    after = load(path)
    assert after.round == 1 and after.update == sent  # the residual was not applied again
    for k, r in after_first.residual.items():
        assert torch.equal(after.residual[k], r)
    # listed in `have`: the aggregator holds it, nothing goes out
    again.t.close()
    f.publish(1, glob(0.0), have=(CLIENT,))
    third = f.agent(path)
    assert third.startup == []  # type: ignore[attr-defined]
    assert any("the aggregator has it" in line for line in third.lines)  # type: ignore
    # the next round trains and encodes as usual
    assert f.global_round(third, 2, glob(0.01)) is not None and load(path).round == 2


@pytest.mark.parametrize("bad", ["garbage", "truncated", "other-codec", "other-job",
                                 "other-global"])
def test_a_bad_state_file_is_one_warning_and_a_zero_residual(tmp_path: Path, bad: str) -> None:
    # the reference: an agent that starts with no state file at all
    f0 = Fleet()
    clean = frame_of(f0.global_round(f0.agent(tmp_path / "clean.safetensors"), 1, glob(0.0)))
    path = tmp_path / "state.safetensors"
    f = Fleet()
    rnd_glob = glob(0.0)
    if bad == "garbage":
        path.write_bytes(b"\x00not a safetensors file at all")
    else:
        seeded = Fleet()
        codec = "int8" if bad == "other-codec" else "topk-int8"
        seeded.global_round(seeded.agent(path, codec=codec), 1, glob(0.05))
        if bad == "truncated":
            path.write_bytes(path.read_bytes()[:-100])
        if bad == "other-job":
            st = load(path)
            st.job = "another-job"
            st.save(path)
    agent = f.agent(path)
    got = frame_of(f.global_round(agent, 1, rnd_glob))
    warnings = [x for x in agent.lines if x.startswith("warning:")]  # type: ignore[attr-defined]
    assert len(warnings) == 1, warnings
    assert "zero residual" in warnings[0]
    assert got == clean  # trained and encoded from a zero residual
    assert load(path).round == 1  # and the file is this agent's again
    decoded = decode_update(got, rnd_glob).tensors
    assert all(bool(torch.isfinite(v).all()) for v in decoded.values())


def test_codec_options_are_checked_and_the_state_sits_beside_the_feature_cache(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError, match="update codec"):
        AgentConfig(JOB, CLIENT, insecure_unsigned=True, update_codec="zip")
    with pytest.raises(ConfigError, match="not both"):
        AgentConfig(JOB, CLIENT, insecure_unsigned=True, update_codec="int8",
                    update_dtype="float16")
    with pytest.raises(ConfigError, match="fraction"):
        AgentConfig(JOB, CLIENT, insecure_unsigned=True, update_codec="topk", topk_fraction=0)
    assert AgentConfig(JOB, CLIENT, insecure_unsigned=True, update_dtype="float16").codec == "fp16"
    with pytest.raises(ConfigError, match="signed"):  # the codec options keep the key check
        AgentConfig(JOB, CLIENT, update_codec="topk-int8")
    path = default_state_path(tmp_path / "features", JOB, CLIENT)
    assert path == tmp_path.resolve() / "agent-state" / f"{JOB}-{CLIENT}.safetensors"
