"""`status` and `aggregate --metrics-port` against mosquitto, with the aggregator as its own
process (the command line, as an operator starts it) and real agents over paho.

The moment checked mid-run is made certain, not waited for by sleeping: a third device says
hello and never answers, so round 1 stays open (its deadline is minutes away) until the test
publishes that device's last will itself.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import keys
from support import mqtt as mh
from support.fleet import local_data

from fedclip_edge.broker import authn
from fedclip_edge.broker import protocol as P
from fedclip_edge.broker.transport import MqttTransport
from fedclip_edge.device_agent.agent import Agent, AgentConfig

pytestmark = [pytest.mark.integration, pytest.mark.mosquitto]

JOB = "watch"
PY = sys.executable
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    return {
        s.name + (json.dumps(s.labels, sort_keys=True) if s.labels else ""): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def until(what: str, check, timeout: float = 60.0, logs=lambda: ""):  # type: ignore[no-untyped-def]
    """Poll `check()` (a condition, not a guess at a duration) until it returns truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = check()
        except OSError:  # the endpoint is not up yet
            got = None
        if got:
            return got
        time.sleep(0.1)
    pytest.fail(f"{what} not within {timeout}s\n{logs()}")


def status_json(*args: str) -> dict:
    res = subprocess.run(
        [PY, "-m", "fedclip_edge.broker.cli", "status", "--json", *args],
        capture_output=True, text=True, timeout=120, env=ENV,
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_status_and_metrics_of_a_live_job(tmp_path: Path) -> None:
    with mh.start_mosquitto(tmp_path / "broker") as (_, port):
        url = f"mqtt://127.0.0.1:{port}"
        # the silent device: a hello, then nothing
        silent = mh.connect_client(port, "dev-silent")
        first = P.Status("dev-silent", "online", {"train": 5}, "tensorrt", 8, hello=True,
                         session="s")
        hello = authn.sign(first, keys.key("dev-silent"), job=JOB)
        mh.publish(silent, P.status_topic(JOB, "dev-silent"), hello.encode(), retain=True)
        kdir = keys.key_files(tmp_path / "keys", ["dev-a", "dev-b", "dev-silent"])
        agents = []
        for c in ("dev-a", "dev-b"):
            cfg = AgentConfig(JOB, c, idle_timeout_s=90, poll_s=0.05, key=keys.key(c),
                              aggregator_key=keys.aggregator_public())
            will = authn.signed_will(c, JOB, cfg.session, cfg.key)
            t = MqttTransport(url, c, will=(P.status_topic(JOB, c), will, True))
            a = Agent(t, cfg, local_data(c), log=lambda line: None)
            th = threading.Thread(target=a.run, daemon=True)
            th.start()
            agents.append((a, th))
        # every hello is retained before the aggregator starts: round 1 expects all three
        until("the agents' hellos", lambda: status_json("--broker", url, "--job", JOB)[
            "devices_online"] == 3)

        out, mport = tmp_path / "out", mh.free_port()
        log = open(tmp_path / "aggregator.log", "wb")  # noqa: SIM115
        agg = subprocess.Popen(
            [PY, "-m", "fedclip_edge.cli", "aggregate", "--broker", url, "--job", JOB,
             "--rounds", "2", "--out", str(out), "--min-clients", "2", "--round-timeout", "300",
             "--dim", "8", "--preset", "learning", "--wait-clients", "30",
             "--metrics-port", str(mport), "--device-keys", str(kdir / "devices"),
             "--signing-key", str(kdir / "aggregator.key")],
            stdout=log, stderr=subprocess.STDOUT, env=ENV, stdin=subprocess.DEVNULL,
        )
        log.close()

        def logs() -> str:
            return (tmp_path / "aggregator.log").read_text(errors="replace")

        # the silent device learns the job's run from the aggregator's retained control, as
        # agents do, and says hello for it: a hello for no run puts nobody online
        watch = MqttTransport(url, "dev-silent-watch", clean_session=True)
        watch.subscribe(P.control_topic(JOB))
        watch.connect(10)
        ctl, deadline = None, time.monotonic() + 60
        while ctl is None and time.monotonic() < deadline:
            got = watch.recv(0.5)
            ctl = P.decode_message(got.payload) if got is not None else None
        watch.close()
        assert isinstance(ctl, P.Control) and ctl.run, logs()
        bound = authn.sign(dataclasses.replace(first, run=ctl.run), keys.key("dev-silent"),
                           job=JOB)
        mh.publish(silent, P.status_topic(JOB, "dev-silent"), bound.encode(), retain=True)

        try:
            murl = f"http://127.0.0.1:{mport}/metrics"
            # round 1: both agents' updates handled, the silent device keeps it open
            m = until("two updates in round 1",
                      lambda: (x := metrics(murl)).get("fedclip_round_updates") == 2 and x,
                      logs=logs)
            assert m["fedclip_round_current"] == 1 and m["fedclip_devices_online"] == 3
            assert m["fedclip_updates_accepted_total"] == 2
            assert m["fedclip_round_committed"] == 0
            st = status_json("--broker", url, "--job", JOB, "--out", str(out))
            assert st["state"] == "running" and st["current_round"] == 1
            assert st["answered"] == ["dev-a", "dev-b"]
            assert st["expected"] == ["dev-a", "dev-b", "dev-silent"]
            assert st["note"] == f"no round committed in {out} yet"
            backends = {d["client"]: d["backend"] for d in st["devices"]}
            assert backends == {"dev-a": "memory", "dev-b": "memory", "dev-silent": "tensorrt"}

            # the silent device's last will: the round closes without waiting for it
            mh.publish(silent, P.status_topic(JOB, "dev-silent"),
                       authn.signed_will("dev-silent", JOB, "s", keys.key("dev-silent")),
                       retain=True)
            assert agg.wait(120) == 0, logs()
        finally:
            if agg.poll() is None:
                agg.kill()
                agg.wait(10)
            mh.disconnect_client(silent)
        for _, th in agents:
            th.join(30)
        assert "metrics for Prometheus at http://127.0.0.1:" in logs()

        st = status_json("--broker", url, "--job", JOB, "--out", str(out))
        assert st["state"] == "done" and st["completed_round"] == 2
        assert st["current_round"] is None and st["devices_online"] == 0
        assert st["last_round"]["clients"] == 2 and st["run"]["accepted"] == 4
        assert st["last_round"]["latency_s"]["p50"] > 0 and st["run"]["bytes_up"] > 0
        assert st["rejected"] == {}
        # the silent device's will carries no backend: the aggregator's roster has it
        backends = {d["client"]: d["backend"] for d in st["devices"]}
        assert backends == {"dev-a": "memory", "dev-b": "memory", "dev-silent": "tensorrt"}
    with pytest.raises(OSError):
        metrics(murl)  # the endpoint ended with the aggregator
