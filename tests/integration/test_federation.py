"""Federation end to end: agents and the aggregator as separate processes over a real broker.

Synthetic data (4 domains, 10 images per class), one exported artifact per session; three
agents (art_painting, cartoon, photo) and the held-out sketch domain for the aggregator's
evaluation. Faults: a malformed payload and a redelivered update, an agent killed mid-run and
one stopped with SIGTERM, the aggregator killed and resumed, the broker restarted mid-run.

Each fault lands at a moment made certain, not hoped for: a round cannot close while an active
device has not answered it, so freezing devices (SIGSTOP) holds a round open
(`hold_after_round_1`); waits are for printed lines, files and status messages (bounded).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support import mqtt as mh
from support.keys import key_files

from fedclip_edge.broker import protocol as P

pytestmark = pytest.mark.integration

DOMAINS = {"dev-a": "art_painting", "dev-b": "cartoon", "dev-c": "photo"}
PY = sys.executable


@pytest.fixture(scope="session")
def fed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Data, artifact, per-agent feature caches and the held-out evaluation cache, made once."""
    root = tmp_path_factory.mktemp("fed")
    data, art = root / "data", root / "artifact"
    keys = key_files(root / "keys", list(DOMAINS))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run([PY, "-m", "fedclip_edge.cli", "data", "synth", "--out", str(data),
                    "--per-class", "10"], check=True, env=env, timeout=120,
                   capture_output=True)
    # random weights: these tests are about delivery and faults, not accuracy (test_learning
    # covers that), and so they do not wait for the pretrained checkpoint to be built
    subprocess.run([PY, "-m", "fedclip_edge.cli", "export", "--out", str(art), "--classes",
                    str(data), "--pretrained", "none", "--sign-key",
                    str(keys / "exporter.key")], check=True, env=env, timeout=600,
                   capture_output=True)
    from fedclip_edge.device_agent.agent import load_local_features

    load_local_features(data, art, backend="onnxruntime", domain="sketch",
                        cache=root / "cache" / "sketch", log=lambda line: None)
    return {"data": data, "artifact": art, "cache": root / "cache", "root": root, "keys": keys}


def agent_cmd(fed: dict[str, Path], url: str, job: str, client: str) -> list[str]:
    # a 600 s keepalive: a device frozen by SIGSTOP sends no PINGREQ, and with the default 15 s
    # the broker would drop it (and send its will) after 22 s, ending the hold early on a loaded
    # machine; this way it stays connected and holds a round open as long as the test needs
    return [PY, "-m", "fedclip_edge.device_agent.cli", "--keepalive", "600", "--broker", url,
            "--job", job,
            "--client-id", client, "--data", str(fed["data"]), "--domain", DOMAINS[client],
            "--artifacts", str(fed["artifact"]), "--backend", "onnxruntime", "--cache",
            str(fed["cache"] / DOMAINS[client]), "--idle-timeout", "300",
            "--connect-timeout", "20", "--key", str(fed["keys"] / f"{client}.key"),
            "--aggregator-key", str(fed["keys"] / "aggregator.pub"),
            "--artifact-key", str(fed["keys"] / "exporter.pub")]


def agg_cmd(fed: dict[str, Path], url: str, job: str, out: Path, rounds: int = 3,
            min_clients: int = 3, timeout: float = 120, extra: tuple[str, ...] = ()) -> list[str]:
    return [PY, "-m", "fedclip_edge.cli", "aggregate", "--broker", url, "--job", job, "--rounds",
            str(rounds), "--min-clients", str(min_clients), "--round-timeout", str(timeout),
            "--out", str(out), "--preset", "learning", "--seed", "1", "--wait-clients", "300",
            "--eval-features", str(fed["cache"] / "sketch"), "--eval-domain", "sketch",
            "--connect-timeout", "20", "--device-keys", str(fed["keys"] / "devices"),
            "--signing-key", str(fed["keys"] / "aggregator.key"), *extra]


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


def wait_round(out: Path, rnd: int, procs: Procs, timeout: float = 300) -> None:
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


def wait_log(procs: Procs, names: list[str], text: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(text in procs.log(n) for n in names):
            return
        time.sleep(0.1)
    pytest.fail(f"{text!r} not in the logs of {names} within {timeout}s\n{procs.logs()}")


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def run_federation(fed: dict[str, Path], url: str, folder: Path, job: str,
                   rounds: int = 3, agent_extra: dict[str, list[str]] | None = None) -> Path:
    out = folder / "out"
    with processes(folder) as procs:
        procs.start("aggregator", agg_cmd(fed, url, job, out, rounds))
        for c in DOMAINS:
            procs.start(c, agent_cmd(fed, url, job, c) + (agent_extra or {}).get(c, []))
        assert procs.wait("aggregator", 600) == 0, procs.logs()
        for c in DOMAINS:
            assert procs.wait(c, 120) == 0, procs.logs()
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
        rogue.loop_start()
        try:
            mh.subscribe(rogue, f"fedclip/{job}/update/+", qos=1)  # SUBACK before the run
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
    """Also a fleet that mixes update codecs (issue 11): dev-b sends top-k int8 deltas and
    dev-c int8 ones, each with its error-feedback state file; dev-a the dense fp32 frame."""
    state = tmp_path / "state"
    extra = {"dev-b": ["--update-codec", "topk-int8", "--state-file", str(state / "b.st")],
             "dev-c": ["--update-codec", "int8", "--state-file", str(state / "c.st")]}
    with mh.embedded_broker() as broker:
        out = run_federation(fed, broker.url, tmp_path / "run", "emb", rounds=2,
                             agent_extra=extra)
    check_complete_run(out, 2)
    codecs = {(r["client"], r["update_codec"]) for r in rows(out) if r["kind"] == "client"}
    assert codecs == {("dev-a", "fp32"), ("dev-b", "topk-int8"), ("dev-c", "int8")}
    by_codec = json.loads((out / "summary.json").read_text())["totals"]["bytes_up_by_codec"]
    assert by_codec["topk-int8"] * 20 < by_codec["fp32"] and by_codec["int8"] < by_codec["fp32"]
    assert (state / "b.st").stat().st_size > 0 and (state / "c.st").stat().st_size > 0


def hold_after_round_1(procs: Procs, seen: mh.Presence,
                       start_aggregator: Callable[[], object]) -> None:
    """Bring a run to a certain moment, whatever the machine's load: round 1 committed with all
    three devices, round 2 open, dev-c has answered it and dev-a and dev-b are frozen (SIGSTOP)
    without having answered it, so round 2 cannot close until the test lets them go on.

    How: all three devices say hello, the aggregator starts, and each says hello again for the
    aggregator's run (docs/protocol.md "Runs"; the aggregator waits for these before round 1,
    so it knows all three before any update); dev-c is frozen as soon as its hello for the run
    is seen (its round-1 training takes seconds: the freeze lands first), so round 1 cannot
    close; dev-a and dev-b answer it and are frozen; dev-c goes on, answers round 1 (the round
    closes) and round 2."""
    for c in DOMAINS:
        seen.wait(c, "online", timeout=300)
    start_aggregator()
    seen.wait_bound("dev-c", timeout=300)
    procs.procs["dev-c"].send_signal(signal.SIGSTOP)
    wait_log(procs, ["dev-a", "dev-b"], "round 1 | samples", timeout=300)
    for c in ("dev-a", "dev-b"):
        procs.procs[c].send_signal(signal.SIGSTOP)
    procs.procs["dev-c"].send_signal(signal.SIGCONT)
    wait_log(procs, ["dev-c"], "round 2 | samples", timeout=300)
    for c in ("dev-a", "dev-b"):
        assert "round 2 | samples" not in procs.log(c), procs.logs()


@pytest.mark.mosquitto
def test_agent_killed_and_agent_stopped_the_run_goes_on(fed, tmp_path: Path) -> None:
    """dev-c killed with -9 and dev-b stopped with SIGTERM while round 2 is open (held there by
    freezing the others): rounds 3..6 go on with dev-a alone."""
    with mh.start_mosquitto(tmp_path / "broker") as (_, port), \
            processes(tmp_path / "run") as procs:
        url, job, out = f"mqtt://127.0.0.1:{port}", "faults", tmp_path / "run" / "out"
        with mh.Presence(port, job) as seen:
            for c in DOMAINS:
                procs.start(c, agent_cmd(fed, url, job, c))
            hold_after_round_1(procs, seen, lambda: procs.start(
                "aggregator", agg_cmd(fed, url, job, out, rounds=6, min_clients=1, timeout=120)))
            state = json.loads((out / "state.json").read_text())
            assert state["completed_round"] == 1  # round 2 is held open
            before = seen.count("dev-c")
            procs.procs["dev-c"].kill()  # kill -9: no goodbye, the broker sends its will
            procs.procs["dev-c"].wait(10)
            seen.wait("dev-c", "offline", timeout=120, after=before)
            # SIGTERM while frozen: dev-b handles it as soon as it runs again
            before = seen.count("dev-b")
            procs.procs["dev-b"].send_signal(signal.SIGTERM)
            procs.procs["dev-b"].send_signal(signal.SIGCONT)
            assert procs.wait("dev-b", 120) == 0, procs.log("dev-b")
            seen.wait("dev-b", "offline", timeout=120, after=before)  # it said goodbye
            procs.procs["dev-a"].send_signal(signal.SIGCONT)
            assert procs.wait("aggregator", 600) == 0, procs.logs()
            assert procs.wait("dev-a", 120) == 0, procs.logs()
    rr = [r for r in rows(out) if r["kind"] == "round"]
    assert [r["round"] for r in rr] == [1, 2, 3, 4, 5, 6]
    assert sorted(rr[0]["clients"]) == ["dev-a", "dev-b", "dev-c"]
    # round 2: dev-c answered before it was killed, dev-a after it went on; dev-b perhaps
    assert {"dev-a", "dev-c"} <= set(rr[1]["clients"]) <= {"dev-a", "dev-b", "dev-c"}
    assert all(sorted(r["clients"]) == ["dev-a"] for r in rr[2:]), [r["clients"] for r in rr]
    assert "finishing cleanly" in (tmp_path / "run" / "dev-b.log").read_text()


@pytest.mark.mosquitto
def test_aggregator_killed_and_resumed_matches_uninterrupted(fed, tmp_path: Path) -> None:
    """The aggregator killed with -9 while round 2 is open (held there), resumed with --resume:
    the final global equals an uninterrupted run's and no update is counted twice."""
    with mh.start_mosquitto(tmp_path / "broker") as (_, port):
        url = f"mqtt://127.0.0.1:{port}"
        full = run_federation(fed, url, tmp_path / "full", "full")
        job, out = "resume", tmp_path / "crash" / "out"
        with processes(tmp_path / "crash") as procs, mh.Presence(port, job) as seen:
            for c in DOMAINS:
                procs.start(c, agent_cmd(fed, url, job, c))
            hold_after_round_1(procs, seen,
                               lambda: procs.start("aggregator", agg_cmd(fed, url, job, out)))
            procs.procs["aggregator"].kill()  # mid-run: round 2 is open, dev-c answered it
            procs.procs["aggregator"].wait(10)
            assert json.loads((out / "state.json").read_text())["completed_round"] == 1
            for c in ("dev-a", "dev-b"):
                procs.procs[c].send_signal(signal.SIGCONT)
            procs.start("aggregator2", agg_cmd(fed, url, job, out, extra=("--resume",)))
            assert procs.wait("aggregator2", 600) == 0, procs.logs()
            for c in DOMAINS:
                assert procs.wait(c, 120) == 0, procs.logs()
            assert "resuming job resume after round 1" in procs.log("aggregator2")
            assert ": 0 encoded, 80 reused" in procs.log("dev-a")  # the feature cache
            # dev-c's round-2 update went to the killed aggregator: the resumed one lacks it
            # and dev-c sends it again
            assert "round 2: aggregator lacks my update, sending it again" in procs.log("dev-c")
    a = load_file(str(full / "global.safetensors"))
    b = load_file(str(out / "global.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    client_rows = [(r["round"], r["client"]) for r in rows(out) if r["kind"] == "client"]
    assert sorted(client_rows) == sorted(set(client_rows)) and len(client_rows) == 9


@pytest.mark.mosquitto
def test_broker_restarted_mid_run(fed, tmp_path: Path) -> None:
    """mosquitto stopped and started again while round 2 is open (held there by freezing every
    device): the aggregator reconnects, publishes the round again and the run completes."""
    port = mh.free_port()
    url, job = f"mqtt://127.0.0.1:{port}", "restart"
    out = tmp_path / "run" / "out"
    with processes(tmp_path / "run") as procs:
        with mh.start_mosquitto(tmp_path / "b1", port=port), mh.Presence(port, job) as seen:
            for c in DOMAINS:
                procs.start(c, agent_cmd(fed, url, job, c))
            hold_after_round_1(procs, seen, lambda: procs.start(
                "aggregator", agg_cmd(fed, url, job, out, rounds=6, timeout=120)))
            procs.procs["dev-c"].send_signal(signal.SIGSTOP)
        # the broker is gone (stop_process waited for it): every connection is closed, and
        # with persistence off its retained messages and sessions are gone too
        assert json.loads((out / "state.json").read_text())["completed_round"] == 1
        with mh.start_mosquitto(tmp_path / "b2", port=port):
            for c in DOMAINS:
                procs.procs[c].send_signal(signal.SIGCONT)
            assert procs.wait("aggregator", 600) == 0, procs.logs()
            for c in DOMAINS:
                assert procs.wait(c, 120) == 0, procs.logs()
    check_complete_run(out, 6)
    assert "connection 2" in procs.log("aggregator")


def test_status_topics_are_the_acl_ones() -> None:
    """The topics the broker ACL is written against (a cheap guard for renames)."""
    assert P.status_topic("j", "d") == "fedclip/j/status/d"
    assert P.update_topic("j", "d") == "fedclip/j/update/d"
