"""Issue 21, point 3: a wrong TLS setting is named (certificate verify failed: pass --ca-certs;
protocol mismatch) at once, not reported as "not reachable within 30s"."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from support import mqtt as mh
from support.pki import credentials, make_pki, tls_mosquitto

from fedclip_edge.broker.transport import MqttTransport, TlsOptions
from fedclip_edge.errors import TransportError

pytestmark = [pytest.mark.integration, pytest.mark.mosquitto]
TIMEOUT = 20.0


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("tls")
    pki = make_pki(base / "pki", "dev-a", port=mh.free_port(), extra=("--no-keys",))
    other = make_pki(base / "other", "dev-a", port=1, extra=("--no-keys",))
    with tls_mosquitto(pki, base / "run") as b:
        yield b, other / "ca.crt"


def _connect_error(url: str, tls: TlsOptions | None, password: str | None) -> tuple[str, float]:
    t = MqttTransport(url, "dev-a", username="dev-a", password=password, tls=tls,
                      clean_session=True)
    t0 = time.monotonic()
    with pytest.raises(TransportError) as err:
        t.connect(TIMEOUT)
    t.close()
    return str(err.value), time.monotonic() - t0


def test_mqtts_without_ca_certs_says_certificate_verify_failed(broker) -> None:
    b, _ = broker
    pw = credentials(b.pki, "dev-a")["FEDCLIP_MQTT_PASSWORD"]
    msg, took = _connect_error(b.url, None, pw)
    assert "certificate verify failed" in msg and "pass --ca-certs" in msg, msg
    assert "not reachable" not in msg and took < TIMEOUT / 2, (msg, took)


def test_another_ca_is_named(broker) -> None:
    b, other_ca = broker
    pw = credentials(b.pki, "dev-a")["FEDCLIP_MQTT_PASSWORD"]
    msg, took = _connect_error(b.url, TlsOptions(ca_certs=str(other_ca)), pw)
    assert "certificate verify failed" in msg and str(other_ca) in msg, msg
    assert took < TIMEOUT / 2


def test_plain_mqtt_to_the_tls_port_is_a_protocol_mismatch(broker) -> None:
    b, _ = broker
    pw = credentials(b.pki, "dev-a")["FEDCLIP_MQTT_PASSWORD"]
    msg, took = _connect_error(f"mqtt://localhost:{b.port}", None, pw)
    assert "protocol mismatch" in msg and "use mqtts://" in msg, msg
    assert took < TIMEOUT / 2, (msg, took)


def test_mqtts_to_a_plain_port_is_a_protocol_mismatch(tmp_path: Path) -> None:
    with mh.start_mosquitto(tmp_path) as (_, port):
        msg, took = _connect_error(f"mqtts://127.0.0.1:{port}", None, None)
    assert "protocol mismatch" in msg and "mqtt://" in msg, msg
    assert took < TIMEOUT / 2, (msg, took)


def test_the_right_settings_connect(broker) -> None:
    b, _ = broker
    pw = credentials(b.pki, "dev-a")["FEDCLIP_MQTT_PASSWORD"]
    t = MqttTransport(b.url, "dev-a", username="dev-a", password=pw,
                      tls=TlsOptions(ca_certs=str(b.ca)), clean_session=True)
    try:
        t.connect(TIMEOUT)
        assert t.connected
    finally:
        t.close()


def test_doctor_reads_the_credentials_file_it_documents(broker, tmp_path: Path) -> None:
    """credentials/<user>.env sets FEDCLIP_MQTT_USERNAME, _PASSWORD and _CA_FILE: with that
    file in the environment, doctor checks TLS with that CA and logs in as that user."""
    import json
    import os
    import subprocess
    import sys

    b, _ = broker
    env = {**os.environ, **credentials(b.pki, "dev-a")}
    res = subprocess.run([sys.executable, "-m", "fedclip_edge.cli", "doctor", "--broker", b.url,
                          "--cache", str(tmp_path), "--json"], capture_output=True, text=True,
                         timeout=180, env=env)
    rows = {r["name"]: r for r in json.loads(res.stdout)["checks"]}
    assert rows["broker tls"]["status"] == "ok", rows["broker tls"]
    assert rows["broker login"]["status"] == "ok", rows["broker login"]
    assert "as dev-a" in rows["broker login"]["detail"]
