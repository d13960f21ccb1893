"""The slim device install: the agent runs from an exported artifact without open_clip,
torchvision or matplotlib (deploy/requirements-agent.txt + `pip install --no-deps`).

Each check runs in a fresh interpreter where those modules are blocked (sys.modules[name] = None
makes any import of them raise ImportError), so an import of them anywhere on the agent's path
fails the test, however deep it hides.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from support import tiny_artifact

ROOT = Path(__file__).resolve().parents[3]
BLOCKED = ("open_clip", "torchvision", "matplotlib")
PRELUDE = textwrap.dedent(
    f"""
    import sys
    for name in {BLOCKED!r}:
        sys.modules[name] = None  # import raises ImportError
    """
)

# One round of the agent's own loop over the in-memory broker: the artifact opened and its golden
# set checked (onnxruntime), features extracted into the cache, a global adapter received, local
# training, the update published and decodable.
AGENT_ROUND = textwrap.dedent(
    """
    import json, threading
    from pathlib import Path
    import torch
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from fedclip_edge.adapter import AttentionAdapter
    from fedclip_edge.broker import authn
    from fedclip_edge.broker import protocol as P
    from fedclip_edge.device_agent.agent import Agent, AgentConfig, load_local_features
    from fedclip_edge.broker.transport import MemoryBroker, MemoryTransport
    from fedclip_edge.wire import decode_frame, encode_frame

    data, artifact, cache = (Path(a) for a in sys.argv[1:4])
    logs = []
    local = load_local_features(data, artifact, backend="onnxruntime", cache=cache,
                                log=logs.append)
    broker = MemoryBroker()
    job, client = "slim", "dev-a"
    agg_key = Ed25519PrivateKey.generate()  # the agent signs and checks, as on a device
    agent = Agent(MemoryTransport(broker, client), AgentConfig(job, client, poll_s=0.02,
                  idle_timeout_s=60, key=Ed25519PrivateKey.generate(),
                  aggregator_key=agg_key.public_key()), local, log=logs.append)
    start = AttentionAdapter(local.dim).state_dict()
    frame = encode_frame(start, job=job, round=1, client="aggregator")
    train = {"lr": 1e-2, "weight_decay": 0.0, "loss": "ce", "batch_size": 8, "epochs": 1,
             "betas": [0.9, 0.98], "eps": 1e-6, "logit_scale": None}
    g = P.GlobalModel(job, 1, frame, seed=0, train=train, session="s1", rounds=1)
    broker.publish("aggregator", P.global_topic(job), authn.sign(g, agg_key).encode(), True)
    th = threading.Thread(target=agent.run, daemon=True)
    th.start()
    topic = P.update_topic(job, client)
    import time
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(t == topic for _, t, _, _ in broker.log):
        time.sleep(0.02)
    done = authn.sign(P.Control(job, "done", 1, 1), agg_key)
    broker.publish("aggregator", P.control_topic(job), done.encode(), True)
    th.join(30)
    upd = [p for _, t, p, _ in broker.log if t == topic]
    assert upd, "no update published: " + " | ".join(logs)
    m = P.decode_message(upd[0])
    tensors = decode_frame(m.frame).tensors
    changed = sum(float((tensors[k].float() - start[k].float()).abs().max()) for k in start)
    print(json.dumps({
        "backend": local.backend, "n": int(local.labels.shape[0]), "samples": m.samples,
        "changed": changed, "alive": th.is_alive(), "steps": m.metrics.get("steps"),
        "blocked_loaded": [n for n in sys.modules if n.split(".")[0] in BLOCKED_NAMES
                           and sys.modules[n] is not None],
    }))
    """
)


def _run(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PRELUDE + f"BLOCKED_NAMES = {BLOCKED!r}\n" + code, *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


def test_the_block_really_blocks() -> None:
    """Guard for the tests below: an import of a blocked module must fail in the child."""
    res = _run("import open_clip")
    assert res.returncode != 0 and "import of open_clip halted" in res.stderr, res.stderr


def test_agent_cli_modules_import_without_the_heavy_packages() -> None:
    """The agent module, its runtime and the `fedclip-edge` CLI (all commands registered: the
    slim device runs `fedclip-edge agent`) load with the three packages blocked."""
    res = _run(
        "import fedclip_edge.device_agent.agent, fedclip_edge.exporters.runtimes\n"
        "from fedclip_edge.cli import main\n"
        "sys.exit(main(['agent', '--help']))\n"
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "--artifacts" in res.stdout


@pytest.mark.integration
@pytest.mark.slow
def test_one_agent_round_from_an_artifact_without_the_heavy_packages(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    data, artifact = tiny_artifact.shared_artifact(tmp_path_factory)
    res = _run(AGENT_ROUND, str(data), str(artifact), str(tmp_path / "cache"))
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["backend"].startswith("onnxruntime[CPU]")
    assert out["n"] == 8 * 3  # every image of the one domain extracted
    assert out["samples"] > 0 and out["steps"] > 0
    assert out["changed"] > 0, "the update equals the global adapter: no training happened"
    assert out["alive"] is False, "the agent did not end on the job's done message"
    assert out["blocked_loaded"] == []
    assert any((tmp_path / "cache").rglob("*")), "the feature cache was not written"
