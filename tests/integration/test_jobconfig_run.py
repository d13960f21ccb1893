"""A federation driven by one job file: examples/job.toml, copied into a job folder (its relative
paths then point there), runs the aggregator and two agents as separate processes over the
embedded broker for the file's 2 rounds. The broker's port is only known at run time, so each
command passes `--broker URL`: a flag overriding the file, as documented.

Also here (it needs the same exported artifact): the agent's feature cache defaults to
$FEDCLIP_EDGE_CACHE, and Ctrl-C in a waiting agent is one `interrupted` line and exit 130.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support import keys
from support import mqtt as mh
from support.signals import ctrl_c_enabled

from fedclip_edge.signing import sign_artifact

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PY = sys.executable
CLI = [PY, "-m", "fedclip_edge.cli"]
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "job.toml"
AGENTS = {"dev-a": "cartoon", "dev-b": "art_painting"}


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example job file in a folder with its data and artifact where the file says."""
    root = tmp_path_factory.mktemp("job")
    shutil.copy(EXAMPLE, root / "job.toml")
    for cmd in (
        ["data", "synth", "--out", str(root / "data"), "--per-class", "6"],
        ["export", "--out", str(root / "artifact"), "--classes", str(root / "data"),
         "--pretrained", "none"],  # random init: what is tested is the wiring, not accuracy
    ):
        r = subprocess.run([*CLI, *cmd], capture_output=True, text=True, env=_env(), timeout=600)
        assert r.returncode == 0, r.stderr
    # the keys where the file says: devices' public keys, the aggregator's and the exporter's
    keys.key_files(root / "keys", [*AGENTS, "dev-x"])
    sign_artifact(root / "artifact", keys.key("exporter"))
    return root


def test_config_driven_federation(job_dir: Path, tmp_path: Path) -> None:
    config = str(job_dir / "job.toml")
    cache_root = tmp_path / "cache-home"
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: dict[str, subprocess.Popen[bytes]] = {}
    with mh.embedded_broker() as broker:
        try:
            for name, cmd in [
                ("aggregator", [*CLI, "aggregate", "--config", config, "--broker", broker.url]),
                *[
                    (client, [*CLI, "agent", "--config", config, "--broker", broker.url,
                              "--client-id", client, "--domain", domain,
                              "--key", str(job_dir / "keys" / f"{client}.key"),
                              # dev-a's gate admits anything: the run must leave a current
                              # model there (the gate itself: tests/unit/serving)
                              *(["--promote-margin", "0.99"] if client == "dev-a" else [])])
                    for client, domain in AGENTS.items()
                ],
            ]:
                with open(logs / f"{name}.log", "wb") as log:
                    procs[name] = subprocess.Popen(
                        cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                        env=_env(FEDCLIP_EDGE_CACHE=str(cache_root)),
                    )
            codes = {name: p.wait(timeout=600) for name, p in procs.items()}
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
                    p.wait(10)
    text = "\n".join(f"--- {n}\n{(logs / f'{n}.log').read_text()}" for n in procs)
    assert codes == {"aggregator": 0, "dev-a": 0, "dev-b": 0}, text
    # what came from the file: job id, rounds, seed, training preset, the run folder
    out = job_dir / "runs" / "aggregator"
    state = json.loads((out / "state.json").read_text())
    assert state["job"] == "shapes-demo" and state["seed"] == 1
    assert state["completed_round"] == 2 and state["rounds"] == 2
    assert state["train"]["lr"] == pytest.approx(1e-3) and state["train"]["loss"] == "ce"
    assert set(state["devices"]) == set(AGENTS)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["client_rounds"] == 4
    # the agents' feature caches: under $FEDCLIP_EDGE_CACHE (no --cache given)
    caches = list((cache_root / "agent-features").iterdir())
    assert caches, text
    assert str(cache_root / "agent-features") in (logs / "dev-a.log").read_text()
    # each device kept the final global and its personalized copy (default store: models/<id>
    # under the cache folder), measured and gated; dev-a's was promoted
    from fedclip_edge.serving.store import ModelStore, resolve_model

    for client in AGENTS:
        store = ModelStore(cache_root / "models" / client)
        names = [v.name for v in store.versions()]
        assert names == ["v0001-global", "v0002-personal"], text
        g = store.version("v0001-global").manifest
        assert (g["job"], g["round"], g["client_id"], g["signature_checked"]) == (
            "shapes-demo", 2, client, True)
        assert g["artifact"]["path"] == str((job_dir / "artifact").resolve())
        log = (logs / f"{client}.log").read_text()
        assert f"model v0001-global: {g['gate']}" in log
    current = resolve_model(cache_root / "models" / "dev-a")
    assert current.name in ("v0001-global", "v0002-personal")
    assert current.manifest["promoted"] is True
    r = subprocess.run([*CLI, "models", "list", "--models", str(cache_root / "models" / "dev-a")],
                       capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 0 and f"* {current.name}" in r.stdout, r.stdout + r.stderr


def test_flags_override_and_unknown_keys(job_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text((job_dir / "job.toml").read_text().replace("min_clients", "min_client"))
    r = subprocess.run([*CLI, "aggregate", "--config", str(bad)], capture_output=True,
                       text=True, env=_env(), timeout=120)
    assert r.returncode == 6 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("error:") == 1
    assert "unknown key 'min_client' in [aggregator] (did you mean 'min_clients'?)" in r.stderr


def test_agent_sigint_while_waiting_for_the_aggregator(job_dir: Path, tmp_path: Path) -> None:
    with mh.embedded_broker() as broker:
        cmd = [*CLI, "agent", "--config", str(job_dir / "job.toml"), "--broker", broker.url,
               "--job", "nobody-runs-this", "--client-id", "dev-x", "--domain", "sketch",
               "--key", str(job_dir / "keys" / "dev-x.key"),
               "--cache", str(tmp_path / "cache")]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=_env(), stdin=subprocess.DEVNULL, preexec_fn=ctrl_c_enabled)
        try:
            lines = []
            assert p.stdout is not None
            for line in p.stdout:  # the agent waits (idle timeout 120 s) once connected
                lines.append(line)
                if "features of sketch" in line:
                    break
            else:
                pytest.fail("".join(lines))
            p.send_signal(signal.SIGINT)
            rest, _ = p.communicate(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    text = "".join(lines) + rest
    assert p.returncode == 130, text
    assert "Traceback" not in text
    assert sum(1 for line in text.splitlines() if line.startswith("interrupted")) == 1, text
