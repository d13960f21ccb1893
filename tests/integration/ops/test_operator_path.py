"""Issue 21, done when: the operator's path end to end on real TLS mosquittos.

A central broker and a site broker, each the production mosquitto configuration made by
make-dev-pki.sh (the site's on another port, `--port`). The central aggregator and one device
(dev-a) run from the shipped units' ExecStart lines (env from their .env.example, keys from the
PKI); a site aggregator (site-a, registered at the central like a device) serves a device of
its own (dev-b), signing the globals it passes down with its own key. Checked on the way: the
metrics endpoint after round 1, a SIGTERM of the central (systemctl stop: the state of the last
committed round is kept), the unit's restart (--resume) finishing the job with the site and
both devices, `status --out`, one log line per round and no box tables in the log file.
"""

from __future__ import annotations

import re
import shutil
import signal
import time
import urllib.request
from pathlib import Path

import pytest
from support import mqtt as mh
from support import tiny_artifact
from support.pki import credentials, fedclip, make_pki, script_env, tls_mosquitto
from support.units import Proc, env_example, exec_start, unit_environment

from fedclip_edge.exporters.signature import sign_exported_artifact

pytestmark = [pytest.mark.integration, pytest.mark.mosquitto]
AGG_UNIT, AGENT_UNIT = "fedclip-edge-aggregator.service", "fedclip-edge-agent.service"


def _unit(unit: str, values: dict[str, str], state: Path) -> Proc:
    example = env_example(unit.removeprefix("fedclip-edge-").removesuffix(".service"))
    assert set(values) <= set(example), set(values) - set(example)
    env = {**example, **values}
    unit_env = {k: v.replace("/var/lib/fedclip-edge", str(state))
                for k, v in unit_environment(unit).items()}
    return Proc(exec_start(unit, env, state), {**script_env(), **unit_env, **env})


def _cli(*args: str, env: dict[str, str]) -> Proc:
    import sys

    return Proc([sys.executable, "-m", "fedclip_edge.cli", *args], {**script_env(), **env})


ROUND_S = 180  # the central's round deadline: round 2 is held open by pausing dev-b instead


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def _gauge(text: str, name: str) -> float | None:
    m = re.search(rf"^{name} (\S+)", text, re.M)
    return float(m.group(1)) if m else None


def test_a_central_a_site_two_devices_stop_and_resume(tmp_path_factory) -> None:
    base = tmp_path_factory.mktemp("operator")
    central = make_pki(base / "central", "dev-a", port=mh.free_port(), extra=("--site", "site-a"))
    site = make_pki(base / "site", "dev-b", port=mh.free_port())
    bundle = base / "ca-both.crt"  # --ca-certs serves both brokers of a site
    bundle.write_text((central / "ca.crt").read_text() + (site / "ca.crt").read_text())
    data, artifact = tiny_artifact.shared_artifact(tmp_path_factory)
    signed = base / "artifact"
    shutil.copytree(artifact, signed)
    sign_exported_artifact(signed, central / "keys" / "exporter.key")
    ck, sk = central / "keys", site / "keys"
    metrics_port = mh.free_port()
    job = env_example("aggregator")["FEDCLIP_JOB"]
    procs: list[Proc] = []
    with tls_mosquitto(central, base / "b1") as cb, tls_mosquitto(site, base / "b2") as sb:
        agg_values = {
            "FEDCLIP_BROKER": cb.url, "FEDCLIP_MQTT_CA_FILE": str(cb.ca), "FEDCLIP_ROUNDS": "3",
            "FEDCLIP_DEVICE_KEYS": str(ck / "devices"),
            "FEDCLIP_SIGNING_KEY": str(ck / "aggregator.key"),
            "FEDCLIP_AGGREGATOR_ARGS": f"--min-clients 2 --round-timeout {ROUND_S} "
                                       f"--wait-clients 180 --metrics-port {metrics_port} "
                                       f"--site-keys {ck / 'sites'}",
            **credentials(central, "aggregator"),
        }
        agg_state = base / "central-state"
        dev_b: Proc | None = None
        try:
            agg = _unit(AGG_UNIT, agg_values, agg_state)
            procs.append(agg)
            procs.append(_unit(AGENT_UNIT, {
                "FEDCLIP_BROKER": cb.url, "FEDCLIP_MQTT_CA_FILE": str(cb.ca),
                "FEDCLIP_DATA": str(data), "FEDCLIP_ARTIFACTS": str(signed),
                "FEDCLIP_KEY": str(ck / "dev-a.key"),
                "FEDCLIP_AGGREGATOR_KEY": str(ck / "aggregator.pub"),
                "FEDCLIP_ARTIFACT_KEY": str(ck / "exporter.pub"),
                **credentials(central, "dev-a"),
            }, base / "dev-a-state"))
            site_agg = _cli(
                "aggregate", "--broker", sb.url, "--ca-certs", str(bundle), "--job", job,
                "--out", str(base / "site-run"), "--upstream", cb.url, "--site", "site-a",
                "--min-clients", "1", "--round-timeout", "60", "--wait-clients", "180",
                "--device-keys", str(sk / "devices"), "--signing-key", str(ck / "site-a.key"),
                "--upstream-key", str(ck / "aggregator.pub"),
                env={"FEDCLIP_MQTT_PASSWORD": credentials(site, "aggregator")[
                    "FEDCLIP_MQTT_PASSWORD"],
                     "FEDCLIP_UPSTREAM_PASSWORD": credentials(central, "site-a")[
                         "FEDCLIP_MQTT_PASSWORD"]})
            procs.append(site_agg)
            dev_b = _cli(
                "agent", "--broker", sb.url, "--ca-certs", str(sb.ca), "--job", job,
                "--client-id", "dev-b", "--data", str(data), "--domain", "photo",
                "--artifacts", str(signed), "--cache", str(base / "dev-b-cache"),
                "--key", str(sk / "dev-b.key"), "--aggregator-key", str(ck / "site-a.pub"),
                "--artifact-key", str(ck / "exporter.pub"),
                env={"FEDCLIP_MQTT_PASSWORD": credentials(site, "dev-b")[
                    "FEDCLIP_MQTT_PASSWORD"]})
            procs.append(dev_b)
            # The site committed its round 1, so dev-b's update is in; no round-2 global can
            # exist yet (it needs the site's partial, then the central's commit). Pausing dev-b
            # now holds the central's round 2 open for certain (site-a cannot answer it).
            site_agg.wait_for("round 1/3 | clients 1/1", 400)
            dev_b.p.send_signal(signal.SIGSTOP)
            agg.wait_for("round 1/3 | clients 2/2", 400)
            scraped = _metrics(metrics_port)
            deadline = time.monotonic() + 60
            while _gauge(scraped, "fedclip_round_current") != 2:  # round 2 opens after reports
                assert agg.p.poll() is None and time.monotonic() < deadline, agg.lines
                time.sleep(0.2)  # polling a condition, bounded: not a wait for a moment
                scraped = _metrics(metrics_port)
            assert _gauge(scraped, "fedclip_round_committed") == 1, scraped[:3000]
            assert _gauge(scraped, "fedclip_devices_online") == 2
            # systemctl stop: SIGTERM; the unit's SuccessExitStatus=130
            assert agg.stop() == 130, "\n".join(agg.lines)
            assert any("is kept; re-run with --resume" in ln for ln in agg.lines), agg.lines
            dev_b.p.send_signal(signal.SIGCONT)
            again = _unit(AGG_UNIT, agg_values, agg_state)  # Restart=: the same ExecStart
            procs.append(again)
            again.wait_for(f"job {job} done: 3 rounds", 400)
            assert again.p.wait(60) == 0
            for p in procs[1:4]:
                assert p.p.wait(120) == 0, "\n".join(p.lines)
        finally:
            for p in procs:
                p.stop()
            if dev_b is not None:
                dev_b.p.send_signal(signal.SIGCONT)
    log = "\n".join(agg.lines + again.lines)
    assert "resuming job" in log
    rounds = [ln for ln in log.splitlines() if re.match(r"round \d/3 \| clients 2/2", ln)]
    assert len(rounds) == 3, log  # one line per round: dev-a and site-a answered
    assert not any(ch in log for ch in "┏┃━"), "a per-client box table in a log file"
    assert "rejected (job)" not in log
    assert any("site site-a: round" in ln and "sent upstream" in ln for ln in site_agg.lines)
    status = fedclip("status", "--out", str(agg_state / "jobs" / job))
    assert status.returncode == 0, status.stderr
    assert f"job {job}: done" in status.stdout and "site-a" in status.stdout, status.stdout
