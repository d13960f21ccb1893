"""Secure aggregation end to end: `aggregate --secure-aggregation` and three `agent
--secure-aggregation` processes over a real broker end with the global adapter a plain FedAvg
run of the same job ends with (within the fixed-point error); an aggregator killed mid-run and
resumed discards the open round's masked state and the devices redo it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support import mqtt as mh
from test_federation import (  # noqa: F401  (fed: the session's data, artifact and keys)
    DOMAINS,
    agent_cmd,
    agg_cmd,
    fed,
    processes,
    rows,
    wait_round,
)

pytestmark = pytest.mark.integration

SECURE = ("--secure-aggregation",)


def run(paths: dict[str, Path], url: str, folder: Path, job: str, secure: bool,
        rounds: int = 2) -> Path:
    out = folder / "out"
    extra = SECURE if secure else ("--strategy", "fedavg")
    with processes(folder) as procs:
        procs.start("aggregator", agg_cmd(paths, url, job, out, rounds, extra=extra))
        for c in DOMAINS:
            procs.start(c, agent_cmd(paths, url, job, c) + (list(SECURE) if secure else []))
        assert procs.wait("aggregator", 600) == 0, procs.logs()
        for c in DOMAINS:
            assert procs.wait(c, 120) == 0, procs.logs()
        if secure:
            assert "secure aggregation: the sum of 3 masked updates" in procs.log("aggregator")
    return out


def same_global(a: Path, b: Path, atol: float = 1e-5) -> None:
    x, y = load_file(str(a / "global.safetensors")), load_file(str(b / "global.safetensors"))
    assert x.keys() == y.keys()
    for k in x:
        assert torch.allclose(x[k], y[k], atol=atol), (k, float((x[k] - y[k]).abs().max()))


def test_secure_run_ends_with_the_plain_fedavg_global(fed, tmp_path: Path) -> None:  # noqa: F811
    with mh.embedded_broker() as broker:
        plain = run(fed, broker.url, tmp_path / "plain", "plain", secure=False)
        secure = run(fed, broker.url, tmp_path / "secure", "secure", secure=True)
    same_global(secure, plain)
    clients = [r for r in rows(secure) if r["kind"] == "client"]
    assert len(clients) == 6 and {r["update_codec"] for r in clients} == {"secagg"}
    assert all(r["secagg_clipped"] == 0 for r in clients)
    assert json.loads((secure / "state.json").read_text())["strategy"]["name"] == "fedavg"


@pytest.mark.mosquitto
def test_secure_aggregator_killed_and_resumed(fed, tmp_path: Path) -> None:  # noqa: F811
    """Killed (-9) once round 1 is committed, while a later round is open at whatever phase:
    the resumed aggregator starts that round again with a new attempt and fresh keys, and the
    run ends with the plain run's global."""
    with mh.start_mosquitto(tmp_path / "broker") as (_, port):
        url = f"mqtt://127.0.0.1:{port}"
        plain = run(fed, url, tmp_path / "plain", "plain3", secure=False, rounds=3)
        job, out = "sresume", tmp_path / "crash" / "out"
        with processes(tmp_path / "crash") as procs:
            procs.start("aggregator", agg_cmd(fed, url, job, out, 3, extra=SECURE))
            for c in DOMAINS:
                procs.start(c, agent_cmd(fed, url, job, c) + list(SECURE))
            wait_round(out, 1, procs)
            procs.procs["aggregator"].kill()
            procs.procs["aggregator"].wait(10)
            done = json.loads((out / "state.json").read_text())["completed_round"]
            assert done < 3, "the run ended before the kill: nothing to resume"
            procs.start("aggregator2", agg_cmd(fed, url, job, out, 3,
                                               extra=(*SECURE, "--resume")))
            assert procs.wait("aggregator2", 600) == 0, procs.logs()
            for c in DOMAINS:
                assert procs.wait(c, 120) == 0, procs.logs()
            assert f"resuming job {job} after round {done}" in procs.log("aggregator2")
    same_global(out, plain)
    client_rows = [(r["round"], r["client"]) for r in rows(out) if r["kind"] == "client"]
    assert sorted(client_rows) == sorted(set(client_rows)) and len(client_rows) == 9


@pytest.mark.mosquitto
def test_secure_run_survives_a_broker_restart(fed, tmp_path: Path) -> None:  # noqa: F811
    """mosquitto stopped (persistence off: retained messages and sessions gone) once round 1
    is committed, while a later round is open at whatever phase, and started again: both ends
    reconnect and send their last step again, and the run ends with the plain run's global."""
    with mh.embedded_broker() as broker:
        plain = run(fed, broker.url, tmp_path / "plain", "plainr", secure=False, rounds=3)
    port = mh.free_port()
    url, job, out = f"mqtt://127.0.0.1:{port}", "srestart", tmp_path / "run" / "out"
    with processes(tmp_path / "run") as procs:
        with mh.start_mosquitto(tmp_path / "b1", port=port):
            procs.start("aggregator", agg_cmd(fed, url, job, out, 3, extra=SECURE))
            for c in DOMAINS:
                procs.start(c, agent_cmd(fed, url, job, c) + list(SECURE))
            wait_round(out, 1, procs)
        done = json.loads((out / "state.json").read_text())["completed_round"]
        assert done < 3, "the run ended before the restart"
        with mh.start_mosquitto(tmp_path / "b2", port=port):
            assert procs.wait("aggregator", 600) == 0, procs.logs()
            for c in DOMAINS:
                assert procs.wait(c, 120) == 0, procs.logs()
        assert "connection 2" in procs.log("aggregator")
    same_global(out, plain)


def test_aggregate_refuses_median_with_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    p = subprocess.run(
        [sys.executable, "-m", "fedclip_edge.cli", "aggregate", "--broker", "mqtt://127.0.0.1:1",
         "--job", "j", "--rounds", "1", "--min-clients", "3", "--out", str(tmp_path),
         "--insecure-unsigned", "--secure-aggregation", "--strategy", "median"],
        capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --secure-aggregation: strategy "
                                                   "median is refused"), p.stderr
    assert "Traceback" not in p.stderr + p.stdout
