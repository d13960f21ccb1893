"""Federation end to end: agents and the aggregator as separate processes over a real broker.

Synthetic data (4 domains, 10 images per class), one exported artifact per session; three
agents (art_painting, cartoon, photo) and the held-out sketch domain for the aggregator's
evaluation. Faults: a malformed payload and a redelivered update, an agent killed mid-run and
one stopped with SIGTERM, the aggregator killed and resumed, the broker restarted mid-run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support import mqtt as mh

from fedclip_edge.broker import protocol as P

pytestmark = pytest.mark.integration

DOMAINS = {"dev-a": "art_painting", "dev-b": "cartoon", "dev-c": "photo"}
PY = sys.executable


@pytest.fixture(scope="session")
def fed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Data, artifact, per-agent feature caches and the held-out evaluation cache, made once."""
    root = tmp_path_factory.mktemp("fed")
    data, art = root / "data", root / "artifact"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run([PY, "-m", "fedclip_edge.cli", "data", "synth", "--out", str(data),
                    "--per-class", "10"], check=True, env=env, timeout=120,
                   capture_output=True)
    subprocess.run([PY, "-m", "fedclip_edge.cli", "export", "--out", str(art), "--classes",
                    str(data)], check=True, env=env, timeout=300, capture_output=True)
    from fedclip_edge.device_agent.agent import load_local_features

    load_local_features(data, art, backend="onnxruntime", domain="sketch",
                        cache=root / "cache" / "sketch", log=lambda line: None)
    return {"data": data, "artifact": art, "cache": root / "cache", "root": root}


def agent_cmd(fed: dict[str, Path], url: str, job: str, client: str) -> list[str]:
    return [PY, "-m", "fedclip_edge.device_agent.cli", "--broker", url, "--job", job,
            "--client-id", client, "--data", str(fed["data"]), "--domain", DOMAINS[client],
            "--artifacts", str(fed["artifact"]), "--backend", "onnxruntime", "--cache",
            str(fed["cache"] / DOMAINS[client]), "--idle-timeout", "90",
            "--connect-timeout", "20"]


def agg_cmd(fed: dict[str, Path], url: str, job: str, out: Path, rounds: int = 3,
            min_clients: int = 3, timeout: float = 30, extra: tuple[str, ...] = ()) -> list[str]:
    return [PY, "-m", "fedclip_edge.cli", "aggregate", "--broker", url, "--job", job, "--rounds",
            str(rounds), "--min-clients", str(min_clients), "--round-timeout", str(timeout),
            "--out", str(out), "--preset", "learning", "--seed", "1", "--wait-clients", "60",
            "--eval-features", str(fed["cache"] / "sketch"), "--eval-domain", "sketch",
            "--connect-timeout", "20", *extra]


class Procs:
    """Child processes with logs in files; every one is ended at exit (bounded waits)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.folder / f"{name}.log", "ab")  # noqa: SIM115  (closed with the process)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                             stdin=subprocess.DEVNULL)
        log.close()
        self.procs[name] = p
        return p

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{self.log(n)[-3000:]}" for n in self.procs)

    def wait(self, name: str, timeout: float) -> int:
        try:
            return self.procs[name].wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} did not finish within {timeout}s\n{self.logs()}")

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(10)


@contextmanager
def processes(folder: Path) -> Iterator[Procs]:
    folder.mkdir(parents=True, exist_ok=True)
    procs = Procs(folder)
    try:
        yield procs
    finally:
        procs.stop_all()


def wait_round(out: Path, rnd: int, procs: Procs, timeout: float = 90) -> None:
    """Until OUT/state.json says round `rnd` is committed (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if json.loads((out / "state.json").read_text())["completed_round"] >= rnd:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    pytest.fail(f"round {rnd} not committed within {timeout}s\n{procs.logs()}")


def wait_log(procs: Procs, names: list[str], text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(text in procs.log(n) for n in names):
            return
        time.sleep(0.1)
    pytest.fail(f"{text!r} not in the logs of {names} within {timeout}s\n{procs.logs()}")


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def run_federation(fed: dict[str, Path], url: str, folder: Path, job: str,
                   rounds: int = 3) -> Path:
    out = folder / "out"
    with processes(folder) as procs:
        procs.start("aggregator", agg_cmd(fed, url, job, out, rounds))
        for c in DOMAINS:
            procs.start(c, agent_cmd(fed, url, job, c))
        assert procs.wait("aggregator", 150) == 0, procs.logs()
        for c in DOMAINS:
            assert procs.wait(c, 30) == 0, procs.logs()
    return out


def check_complete_run(out: Path, rounds: int) -> None:
    state = json.loads((out / "state.json").read_text())
    assert state["completed_round"] == rounds
    rr = rows(out)
    clients = [r for r in rr if r["kind"] == "client"]
    assert len(clients) == 3 * rounds
    for r in clients:
        assert r["bytes_down"] > 0 and r["bytes_up"] > 0
        assert r["train_s"] >= 0 and r["update_latency_s"] > 0
    assert all("extract_s" in r for r in clients if r["round"] == 1)
    assert all(r["heldout_acc"] is not None for r in rr if r["kind"] == "round")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == rounds and summary["totals"]["bytes_up"] > 0
    assert (out / "latency.png").stat().st_size > 1000
    assert load_file(str(out / "global.safetensors"))


@pytest.mark.mosquitto
def test_mosquitto_run_with_malformed_and_redelivered_updates(fed, tmp_path: Path) -> None:
    """A full run; meanwhile a rogue client publishes garbage and redelivers a real update."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    with mh.start_mosquitto(tmp_path / "broker") as (_, port):
        url = f"mqtt://127.0.0.1:{port}"
        job = "e2e"
        sent = {"dup": 0}
        rogue = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="rogue")

        def on_message(client, userdata, msg) -> None:
            if sent["dup"] == 0 and msg.topic.startswith(f"fedclip/{job}/update/"):
                sent["dup"] = 1
                client.publish(msg.topic, msg.payload, qos=1)  # a QoS 1 redelivery
                client.publish(msg.topic, b"FCMQ\x01garbage", qos=1)  # malformed

        rogue.on_message = on_message
        rogue.connect("127.0.0.1", port)
        rogue.subscribe(f"fedclip/{job}/update/+", qos=1)
        rogue.loop_start()
        try:
            out = run_federation(fed, url, tmp_path / "run", job)
        finally:
            rogue.loop_stop()
            rogue.disconnect()
    check_complete_run(out, 3)
    counters = json.loads((out / "state.json").read_text())["counters"]
    assert counters["accepted"] == 9
    # counted once: a duplicate while its round is open, stale if the round closed first
    assert counters.get("rejected_duplicate", 0) + counters.get("rejected_stale", 0) == 1
    assert counters.get("rejected_envelope") == 1
    agent_log = (tmp_path / "run" / "dev-a.log").read_text()
    assert "round 3 | samples" in agent_log and "loss" in agent_log


def test_embedded_broker_run(fed, tmp_path: Path) -> None:
    with mh.embedded_broker() as broker:
        out = run_federation(fed, broker.url, tmp_path / "run", "emb", rounds=2)
    check_complete_run(out, 2)


@pytest.mark.mosquitto
def test_agent_killed_and_agent_stopped_the_run_goes_on(fed, tmp_path: Path) -> None:
    with mh.start_mosquitto(tmp_path / "broker") as (_, port), \
            processes(tmp_path / "run") as procs:
        url, job, out = f"mqtt://127.0.0.1:{port}", "faults", tmp_path / "run" / "out"
        for c in DOMAINS:
            procs.start(c, agent_cmd(fed, url, job, c))
        wait_log(procs, list(DOMAINS), "features of")  # all three online before round 1
        time.sleep(0.5)
        procs.start("aggregator", agg_cmd(fed, url, job, out, rounds=6, min_clients=1,
                                          timeout=15))
        wait_round(out, 1, procs)
        procs.procs["dev-c"].kill()  # kill -9: no goodbye, the broker sends its will
        wait_round(out, 2, procs)
        procs.procs["dev-b"].send_signal(signal.SIGTERM)
        assert procs.wait("dev-b", 20) == 0, procs.log("dev-b")
        assert procs.wait("aggregator", 90) == 0, procs.logs()
        assert procs.wait("dev-a", 30) == 0, procs.logs()
    rr = [r for r in rows(out) if r["kind"] == "round"]
    assert len(rr) == 6
    assert [sorted(r["clients"]) for r in rr][0] == ["dev-a", "dev-b", "dev-c"]
    # rounds take tens of milliseconds, so dev-c may still answer the round that was open when
    # the test saw round 1 committed; the later rounds go on without it (its will marks it
    # offline); dev-b's clean stop ends the test's run without an error
    assert all("dev-c" not in r["clients"] and "dev-a" in r["clients"] for r in rr[-2:])
    assert "finishing cleanly" in (tmp_path / "run" / "dev-b.log").read_text()


@pytest.mark.mosquitto
def test_aggregator_killed_and_resumed_matches_uninterrupted(fed, tmp_path: Path) -> None:
    with mh.start_mosquitto(tmp_path / "broker") as (_, port):
        url = f"mqtt://127.0.0.1:{port}"
        full = run_federation(fed, url, tmp_path / "full", "full")
        job, out = "resume", tmp_path / "crash" / "out"
        with processes(tmp_path / "crash") as procs:
            procs.start("aggregator", agg_cmd(fed, url, job, out))
            for c in DOMAINS:
                procs.start(c, agent_cmd(fed, url, job, c))
            wait_round(out, 1, procs)
            procs.procs["aggregator"].kill()  # mid-run: round 2 is under way
            procs.procs["aggregator"].wait(10)
            procs.start("aggregator2", agg_cmd(fed, url, job, out, extra=("--resume",)))
            assert procs.wait("aggregator2", 120) == 0, procs.logs()
            for c in DOMAINS:
                assert procs.wait(c, 30) == 0, procs.logs()
            assert "resuming job resume after round" in procs.log("aggregator2")
            assert ": 0 encoded, 80 reused" in procs.log("dev-a")  # the feature cache
    a = load_file(str(full / "global.safetensors"))
    b = load_file(str(out / "global.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    client_rows = [(r["round"], r["client"]) for r in rows(out) if r["kind"] == "client"]
    assert sorted(client_rows) == sorted(set(client_rows)) and len(client_rows) == 9


@pytest.mark.mosquitto
def test_broker_restarted_mid_run(fed, tmp_path: Path) -> None:
    port = mh.free_port()
    url, job = f"mqtt://127.0.0.1:{port}", "restart"
    out = tmp_path / "run" / "out"
    with processes(tmp_path / "run") as procs:
        with mh.start_mosquitto(tmp_path / "b1", port=port):
            procs.start("aggregator", agg_cmd(fed, url, job, out, rounds=6, timeout=40))
            for c in DOMAINS:
                procs.start(c, agent_cmd(fed, url, job, c))
            wait_round(out, 1, procs)
            # rounds take tens of milliseconds: freeze the devices so the job is still running
            # (the aggregator waits for their updates) when the broker goes down
            for c in DOMAINS:
                procs.procs[c].send_signal(signal.SIGSTOP)
        time.sleep(1.0)  # broker down: retained messages and sessions are gone
        with mh.start_mosquitto(tmp_path / "b2", port=port):
            for c in DOMAINS:
                procs.procs[c].send_signal(signal.SIGCONT)
            assert procs.wait("aggregator", 120) == 0, procs.logs()
            for c in DOMAINS:
                assert procs.wait(c, 30) == 0, procs.logs()
    check_complete_run(out, 6)
    assert "connection 2" in procs.log("aggregator")


def test_status_topics_are_the_acl_ones() -> None:
    """The topics the broker ACL is written against (a cheap guard for renames)."""
    assert P.status_topic("j", "d") == "fedclip/j/status/d"
    assert P.update_topic("j", "d") == "fedclip/j/update/d"
