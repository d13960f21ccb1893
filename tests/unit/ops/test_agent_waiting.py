"""Issue 21, points 4 and 8: an agent that hears nothing says, every `wait_log_s`, what it waits
for and the likely cause, and its idle timeout says the same instead of only "nothing for 40s"."""

from __future__ import annotations

import pytest
from support import fleet, keys

from fedclip_edge.broker import authn
from fedclip_edge.broker import protocol as P
from fedclip_edge.broker.transport import MemoryBroker, MemoryTransport
from fedclip_edge.device_agent.agent import Agent, AgentConfig
from fedclip_edge.errors import TransportError
from fedclip_edge.wire import encode_frame


def _agent(broker: MemoryBroker, lines: list[str]) -> Agent:
    cfg = AgentConfig(fleet.JOB, "dev-1", idle_timeout_s=1.2, poll_s=0.02, key=keys.key("dev-1"),
                      aggregator_key=keys.aggregator_public())
    agent = Agent(MemoryTransport(broker, "dev-1"), cfg, fleet.local_data("dev-1"),
                  log=lines.append)
    agent.wait_log_s = 0.3
    return agent


def test_an_agent_before_its_aggregator_says_what_it_waits_for() -> None:
    lines: list[str] = []
    with pytest.raises(TransportError) as err:
        _agent(MemoryBroker(), lines).run()
    assert lines[0] == f"connected to the broker; waiting for the aggregator's global of job " \
        f"{fleet.JOB}"
    waits = [ln for ln in lines if ln.startswith("waiting (nothing for ")]
    assert waits, lines
    assert "is the aggregator running this job on this broker?" in waits[0]
    assert "dev-1.pub is in its --device-keys and this device signs with dev-1.key" in waits[0]
    msg = str(err.value)
    assert "giving up: no global of job" in msg and "rejected (unknown_key)" in msg, msg


def test_a_global_signed_by_another_key_is_named(tmp_path) -> None:
    import torch

    from fedclip_edge.adapter import AttentionAdapter

    broker = MemoryBroker()
    state = {k: v.clone() for k, v in AttentionAdapter(8).state_dict().items()}
    torch.manual_seed(0)
    frame = encode_frame(state, job=fleet.JOB, round=1, client="aggregator")
    g = P.GlobalModel(fleet.JOB, 1, frame, seed=0, train=fleet.TRAIN, session="s", rounds=1)
    forged = authn.sign(g, keys.key("not-the-aggregator")).encode()
    broker.publish("x", P.global_topic(fleet.JOB), forged, True)
    lines: list[str] = []
    with pytest.raises(TransportError) as err:
        _agent(broker, lines).run()
    assert "messages refused here: bad_signature 1" in str(err.value), str(err.value)
    assert "is --aggregator-key the aggregator's public key?" in str(err.value)
