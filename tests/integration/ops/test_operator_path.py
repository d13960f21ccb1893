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


ROUND_S = 12  # the central's round deadline (dev-c never answers: each round lasts this long)


def _dim(artifact: Path) -> int:
    import json

    return int(json.loads((artifact / "manifest.json").read_text())["model"]["embed_dim"])


def _silent_device(b, pki: Path, job: str, dim: int):  # noqa: ANN202 - a paho client
    """dev-c: registered, signs its hello, stays online and never trains."""
    from fedclip_edge.broker import authn
    from fedclip_edge.broker import protocol as P
    from fedclip_edge.signing import load_private_key

    key = load_private_key(pki / "keys" / "dev-c.key")
    client = mh.connect_client(b.port, "dev-c", username="dev-c", ca_file=b.ca,
                               password=credentials(pki, "dev-c")["FEDCLIP_MQTT_PASSWORD"])
    hello = P.Status("dev-c", "online", {"train": 10}, "test", dim, hello=True, session="c1")
    mh.publish(client, P.status_topic(job, "dev-c"), authn.sign(hello, key, job=job).encode(),
               retain=True)
    return client


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def _gauge(text: str, name: str) -> float | None:
    m = re.search(rf"^{name} (\S+)", text, re.M)
    return float(m.group(1)) if m else None


def test_a_central_a_site_two_devices_stop_and_resume(tmp_path_factory) -> None:
    base = tmp_path_factory.mktemp("operator")
    central = make_pki(base / "central", "dev-a", "site-a", "dev-c", port=mh.free_port())
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
            # dev-c (below) says hello and never answers: every round lasts ROUND_S, so round 2
            # is certainly still open when the test stops the aggregator
            "FEDCLIP_AGGREGATOR_ARGS": f"--min-clients 2 --round-timeout {ROUND_S} "
                                       f"--wait-clients 180 --metrics-port {metrics_port}",
            **credentials(central, "aggregator"),
        }
        agg_state = base / "central-state"
        silent = _silent_device(cb, central, job, _dim(signed))
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
            procs.append(_cli(
                "agent", "--broker", sb.url, "--ca-certs", str(sb.ca), "--job", job,
                "--client-id", "dev-b", "--data", str(data), "--domain", "photo",
                "--artifacts", str(signed), "--cache", str(base / "dev-b-cache"),
                "--key", str(sk / "dev-b.key"), "--aggregator-key", str(ck / "site-a.pub"),
                "--artifact-key", str(ck / "exporter.pub"),
                env={"FEDCLIP_MQTT_PASSWORD": credentials(site, "dev-b")[
                    "FEDCLIP_MQTT_PASSWORD"]}))
            agg.wait_for("round 1/3 |", 400)
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                        timeout=10) as r:
                scraped = r.read().decode()
            committed = re.search(r"^fedclip_round_committed (\S+)", scraped, re.M)
            assert committed and float(committed.group(1)) >= 1, scraped[:2000]
            # systemctl stop: SIGTERM; the unit's SuccessExitStatus=130
            assert agg.stop() == 130, "\n".join(agg.lines)
            assert any("is kept; re-run with --resume" in ln for ln in agg.lines), agg.lines
            again = _unit(AGG_UNIT, agg_values, agg_state)  # Restart=: the same ExecStart
            procs.append(again)
            again.wait_for(f"job {job} done: 3 rounds", 400)
            assert again.p.wait(60) == 0
            for p in procs[1:4]:
                assert p.p.wait(120) == 0, "\n".join(p.lines)
        finally:
            for p in procs:
                p.stop()
            mh.disconnect_client(silent)
    log = "\n".join(agg.lines + again.lines)
    assert "resuming job" in log
    rounds = [ln for ln in log.splitlines() if re.match(r"round \d/3 \| clients 2/3", ln)]
    assert len(rounds) == 3, log  # one line per round: dev-a and site-a of 3 online answered
    assert not any(ch in log for ch in "┏┃━"), "a per-client box table in a log file"
    assert "rejected (job)" not in log
    assert any("site site-a: round" in ln and "sent upstream" in ln for ln in site_agg.lines)
    status = fedclip("status", "--out", str(agg_state / "jobs" / job))
    assert status.returncode == 0, status.stderr
    assert f"job {job}: done" in status.stdout and "site-a" in status.stdout, status.stdout
