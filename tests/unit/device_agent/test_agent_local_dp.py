"""Local DP on the device, through the in-memory transport: the update that leaves the device
has its delta clipped to --dp-clip, and noise of std multiplier x clip on top."""

from __future__ import annotations

import math
import threading
import time

import pytest
import torch
from support import keys
from support.fleet import JOB, TRAIN, local_data

from fedclip_edge.adapter import AttentionAdapter
from fedclip_edge.broker import authn
from fedclip_edge.broker import protocol as P
from fedclip_edge.broker.transport import MemoryBroker, MemoryTransport
from fedclip_edge.device_agent.agent import Agent, AgentConfig
from fedclip_edge.errors import ConfigError
from fedclip_edge.privacy.accountant import local_epsilon
from fedclip_edge.privacy.dp import l2_norm
from fedclip_edge.wire import decode_frame, encode_frame

DIM = 32


def _one_round(clip: float, z: float) -> tuple[dict[str, torch.Tensor], P.Update, Agent,
                                               list[str]]:
    """Run one agent with local DP for round 1; return the update's delta from the global."""
    broker = MemoryBroker()
    agg = MemoryTransport(broker, "aggregator")
    agg.subscribe(P.update_filter(JOB))
    agg.connect()
    cfg = AgentConfig(JOB, "dev-a", idle_timeout_s=30, poll_s=0.02, key=keys.key("dev-a"),
                      aggregator_key=keys.aggregator_public(), dp_clip=clip,
                      dp_noise_multiplier=z)
    t = MemoryTransport(broker, "dev-a")
    lines: list[str] = []
    agent = Agent(t, cfg, local_data("dev-a", dim=DIM), log=lines.append)
    agent._dp_generator = torch.Generator().manual_seed(0)  # reproducible noise for the test
    th = threading.Thread(target=agent.run, daemon=True)
    th.start()
    torch.manual_seed(0)
    glob = AttentionAdapter(DIM).state_dict()
    g = P.GlobalModel(JOB, 1, encode_frame(glob, job=JOB, round=1, client="aggregator"),
                      seed=0, train=TRAIN, session="s", rounds=3)
    agg.publish(P.global_topic(JOB), authn.sign(g, keys.key(keys.AGGREGATOR)).encode(),
                retain=True)
    deadline = time.monotonic() + 60
    m = None
    while time.monotonic() < deadline and m is None:
        m = agg.recv(0.1)
    agent.stop.set()
    th.join(5)
    assert m is not None and m.topic.endswith("/update/dev-a")
    up = P.decode_message(m.payload)
    assert isinstance(up, P.Update)
    assert authn.verify(up, keys.registry(["dev-a"])) == "dev-a"  # signed after the noise
    sent = decode_frame(up.frame).tensors
    return {k: sent[k] - glob[k] for k in glob}, up, agent, lines


def test_sent_delta_is_clipped_to_c() -> None:
    """z = 0: the sent delta is the trained delta scaled to norm C (training moves the adapter
    much further than 1e-4, so clipping is active and the norm is C, not below)."""
    delta, up, agent, lines = _one_round(1e-4, 0.0)
    norm = l2_norm(delta)
    assert norm <= 1e-4 * (1 + 1e-3)
    assert norm >= 1e-4 * 0.99
    assert up.metrics["dp_clip"] == 1e-4 and "dp_clipped" not in up.metrics  # not noised: kept
    assert "dp_epsilon" not in up.metrics and agent.dp_epsilon == math.inf  # no noise: no DP
    assert any("local DP clip 0.0001 z 0" in line for line in lines)


def test_sent_delta_has_noise_of_std_z_times_c() -> None:
    """C = 0.5, z = 2: noise std 1.0 per coordinate, far above the clipped delta (norm <= 0.5
    spread over thousands of coordinates), so the sent delta's std is 1.0 within a bound a
    wrong scale (z: 2.0, C: 0.5, z*C^2: 0.5) fails; the epsilon is the q = 1 Gaussian's."""
    delta, up, agent, lines = _one_round(0.5, 2.0)
    flat = torch.cat([t.flatten() for t in delta.values()])
    n = flat.numel()
    assert n > 2000
    tol = 6 / math.sqrt(2 * n) + 0.5 / math.sqrt(n)  # sampling error of the std + the signal
    assert abs(float(flat.std()) - 1.0) < tol, (float(flat.std()), tol)
    eps = local_epsilon(2.0, 1, 1e-5)
    assert up.metrics["dp_epsilon"] == pytest.approx(eps) and agent.dp_epsilon == eps
    assert up.metrics["dp_rounds"] == 1
    assert any(f"epsilon {eps:.3g} at delta 1e-05 after 1 round(s)" in line for line in lines)


def test_local_dp_options_refused_in_one_line() -> None:
    base = dict(key=keys.key("dev-a"), aggregator_key=keys.aggregator_public())
    with pytest.raises(ConfigError, match="needs --dp-clip"):
        AgentConfig(JOB, "dev-a", dp_noise_multiplier=1.0, **base)
    with pytest.raises(ConfigError, match="--dp-clip -1"):
        AgentConfig(JOB, "dev-a", dp_clip=-1.0, **base)
    with pytest.raises(ConfigError, match="--dp-delta"):
        AgentConfig(JOB, "dev-a", dp_clip=1.0, dp_delta=2.0, **base)


def test_job_file_dp_keys_reach_the_agent_and_flags_win(tmp_path, monkeypatch) -> None:
    """Through the real parser: [agent] dp_* keys fill the options, a flag overrides."""
    import fedclip_edge.device_agent.agent as agent_mod
    from fedclip_edge.device_agent.cli import main

    seen: dict[str, object] = {}

    def fake_run_agent(**kwargs: object) -> int:
        seen.update(kwargs)
        return 0

    monkeypatch.setattr(agent_mod, "run_agent", fake_run_agent)
    cfg = tmp_path / "job.toml"
    cfg.write_text('[broker]\nurl = "mqtt://127.0.0.1:1"\n[job]\nid = "j"\n'
                   '[agent]\ndata = "d"\nartifacts = "a"\ndp_clip = 0.5\n'
                   'dp_noise_multiplier = 3.0\n')
    assert main(["--config", str(cfg), "--client-id", "dev-a", "--insecure-unsigned",
                 "--dp-noise-multiplier", "4"]) == 0
    assert seen["dp_clip"] == 0.5 and seen["dp_noise_multiplier"] == 4.0
    assert seen["dp_delta"] == 1e-5


def test_noise_without_clip_is_one_error_line(tmp_path, capsys) -> None:
    from fedclip_edge.device_agent.cli import main

    code = main(["--broker", "mqtt://127.0.0.1:1", "--job", "j", "--client-id", "dev-a",
                 "--data", str(tmp_path), "--artifacts", str(tmp_path), "--insecure-unsigned",
                 "--dp-noise-multiplier", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert [line for line in err if line.startswith("error:")] == [
        "error: --dp-noise-multiplier needs --dp-clip: noise is scaled to the clip norm "
        "(std = multiplier x clip)"]
    assert not any("Traceback" in line for line in err)
