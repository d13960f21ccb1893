"""Issue 21, point 5: two jobs in a row on a persistent broker (the production mosquitto
config: persistence, `use_username_as_clientid`, so the session is the `aggregator` account's):
the second job never sees the first one's traffic (no `rejected (job)`); the same job resumed
gets what its session queued while it was down."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import mqtt as mh
from support.pki import aggregator_args, credentials, env_of, fedclip, make_pki, tls_mosquitto

pytestmark = [pytest.mark.integration, pytest.mark.mosquitto]


def _short_job(b, job: str, out: Path, *extra: str) -> tuple[int, str]:
    """A job that ends by itself: no device answers its one round (stop policy)."""
    res = fedclip("aggregate", *aggregator_args(b), "--job", job, "--out", str(out), *extra,
                  "--rounds", "1", "--dim", "8", "--round-timeout", "1", "--max-retries", "0",
                  "--on-short", "stop", "--wait-clients", "0.5", env=env_of(b.pki, "aggregator"))
    return res.returncode, res.stdout + res.stderr


def test_a_second_job_sees_nothing_of_the_first(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki", "dev-a", port=mh.free_port())
    with tls_mosquitto(pki, tmp_path / "run") as b:
        rc, text = _short_job(b, "job-a", tmp_path / "a")
        assert rc != 0 and "stopped at round 1" in text, text
        _speak_while_down(b, pki)
        rc, text = _short_job(b, "job-b", tmp_path / "b")
    assert "stopped at round 1" in text, text
    assert "rejected (job)" not in text and "job-a" not in text, text


def _speak_while_down(b, pki) -> None:
    """A device of job A speaks while no aggregator is connected: a persistent session with job
    A's subscriptions queues this for the next login as `aggregator`."""
    dev = mh.connect_client(b.port, "dev-a", username="dev-a", ca_file=b.ca,
                            password=credentials(pki, "dev-a")["FEDCLIP_MQTT_PASSWORD"])
    try:
        mh.publish(dev, "fedclip/job-a/status/dev-a", b'{"late": true}', qos=1)
    finally:
        mh.disconnect_client(dev)


def test_a_resumed_job_gets_what_was_queued_while_it_was_down(tmp_path: Path) -> None:
    """The soak saw it: a resumed aggregator's first, clean-session connect wiped the messages
    the broker had queued for it (devices' resends covered updates; nothing else came back)."""
    pki = make_pki(tmp_path / "pki", "dev-a", port=mh.free_port())
    with tls_mosquitto(pki, tmp_path / "run") as b:
        rc, text = _short_job(b, "job-a", tmp_path / "a")
        assert rc != 0 and "stopped at round 1" in text, text
        _speak_while_down(b, pki)
        rc, text = _short_job(b, "job-a", tmp_path / "a", "--resume")
    assert "fedclip/job-a/status/dev-a" in text, text  # delivered (and refused: not a status)
