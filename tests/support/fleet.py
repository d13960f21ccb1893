"""An in-memory fleet shared by the aggregator and agent tests: real `Agent`s on tiny
synthetic features, each on its own thread, talking through a `MemoryBroker`.

Why here: the broker tests (tests/unit/broker) and the device-agent tests
(tests/unit/device_agent) drive the same agents; one definition keeps their data and training
settings identical.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

import torch

from fedclip_edge.broker import authn
from fedclip_edge.broker import protocol as P
from fedclip_edge.broker.transport import MemoryBroker, MemoryTransport
from fedclip_edge.device_agent.agent import Agent, AgentConfig, LocalData
from support import keys

JOB = "j1"


def _warm_up_torch() -> None:
    """The first optimizer step imports torch._dynamo (sympy and more): seconds on a busy
    machine. Paying it once here keeps it out of every test's first round and its deadlines."""
    w = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([w])
    w.sum().backward()
    opt.step()


_warm_up_torch()


def local_data(client: str, dim: int = 8, n: int = 30) -> LocalData:
    """Three separable classes; each client's noise is seeded by its name (reproducible)."""
    g = torch.Generator().manual_seed(int(hashlib.sha256(client.encode()).hexdigest()[:6], 16))
    text = torch.randn(3, dim, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(n) % 3
    feats = text[labels] + 0.8 * torch.randn(n, dim, generator=g)
    return LocalData(feats, labels, text, 10.0, backend="memory")


def start_agents(
    broker: MemoryBroker,
    clients: list[str],
    max_payload: int = P.DEFAULT_MAX_PAYLOAD,
    models: Path | None = None,
    **agent_options: Any,
) -> list[tuple[Agent, threading.Thread]]:
    """One running agent per client name (daemon threads; they end when the job is done).
    `models`: each keeps its models in models/<client> at the job's end (else none kept);
    `agent_options`: more AgentConfig fields (an update codec; `aggregator_key`: the public key
    their aggregator signs with, a site's, instead of the tests' aggregator's)."""
    out = []
    agg_key = agent_options.pop("aggregator_key", None) or keys.aggregator_public()
    for c in clients:
        cfg = AgentConfig(JOB, c, idle_timeout_s=30, poll_s=0.02, key=keys.key(c),
                          aggregator_key=agg_key,
                          models=models / c if models is not None else None, **agent_options)
        t = MemoryTransport(
            broker,
            c,
            will=(P.status_topic(JOB, c), authn.signed_will(c, JOB, cfg.session, cfg.key), True),
            max_payload=max_payload,
        )
        a = Agent(t, cfg, local_data(c), log=lambda line: None)
        th = threading.Thread(target=a.run, daemon=True)
        th.start()
        out.append((a, th))
    return out


TRAIN = {
    "lr": 1e-2,
    "weight_decay": 0.0,
    "loss": "ce",
    "batch_size": 8,
    "epochs": 1,
    "betas": [0.9, 0.98],
    "eps": 1e-6,
    "logit_scale": None,
}
