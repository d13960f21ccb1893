"""The MQTT broker: the embedded amqtt broker and the production mosquitto configuration.

Embedded: real MQTT over TCP with paho 2.x (QoS 1, retained, large payloads, last will) and the
`broker run` command. Production: the config, ACL and dev PKI made by make-dev-pki.sh, run by a
real mosquitto on free loopback ports: TLS, no anonymous access, passwords, per-device topics.
"""

from __future__ import annotations

import hashlib
import os
import select
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import mqtt as mh

from fedclip_edge.broker.embedded import EmbeddedBroker
from fedclip_edge.errors import TransportError

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PKI_SCRIPT = REPO / "broker" / "scripts" / "make-dev-pki.sh"
MB = 1_000_000


def _payload(n: int, seed: int = 0) -> bytes:
    """n bytes that are not all alike (so truncation or reordering would show)."""
    block = hashlib.sha256(str(seed).encode()).digest() * 32  # 1 KiB
    return (block * (n // len(block) + 1))[:n]


def _kill_abruptly(client) -> None:
    """Drop the TCP connection without DISCONNECT, as a crashed or unplugged device would."""
    client.loop_stop()  # first: paho's loop would otherwise reconnect
    sock = client.socket()
    if sock is not None:
        sock.close()


# ---------------------------------------------------------------------------------------------
# Embedded broker (amqtt)


@pytest.fixture
def embedded() -> Iterator[EmbeddedBroker]:
    with mh.embedded_broker() as broker:
        yield broker


def test_embedded_broker_basics():
    broker = EmbeddedBroker()
    with pytest.raises(TransportError, match="not started"):
        _ = broker.port
    with broker:
        assert broker.running
        assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
        with socket.create_connection(("127.0.0.1", broker.port), timeout=2):
            pass
        with pytest.raises(TransportError, match="already in use"):
            EmbeddedBroker(port=broker.port).start()
    assert not broker.running
    broker.stop()  # idempotent


def test_embedded_qos1_round_trip(embedded):
    inbox = mh.Inbox()
    agg = mh.connect_client(embedded.port, "aggregator", inbox=inbox)
    dev = mh.connect_client(embedded.port, "dev-a")
    try:
        assert mh.subscribe(agg, "fedclip/job1/update/+", qos=1) == [1]
        mh.publish(dev, "fedclip/job1/update/dev-a", b"frame-1", qos=1)
        msg = inbox.wait_for("fedclip/job1/update/dev-a", timeout=10)
        assert msg.payload == b"frame-1"
        assert msg.qos == 1
    finally:
        mh.disconnect_client(agg)
        mh.disconnect_client(dev)


def test_embedded_retained_2mb_reaches_late_subscriber(embedded):
    body = _payload(2 * MB + 123, seed=1)
    agg = mh.connect_client(embedded.port, "aggregator")
    try:
        mh.publish(agg, "fedclip/job1/global", body, qos=1, retain=True)
    finally:
        mh.disconnect_client(agg)
    inbox = mh.Inbox()
    dev = mh.connect_client(embedded.port, "dev-late", inbox=inbox)
    try:
        mh.subscribe(dev, "fedclip/job1/global", qos=1)
        msg = inbox.wait_for("fedclip/job1/global", timeout=10)
        assert msg.retain
        assert msg.payload == body
    finally:
        mh.disconnect_client(dev)


def test_embedded_20mb_message(embedded):
    body = _payload(20 * MB, seed=2)
    inbox = mh.Inbox()
    agg = mh.connect_client(embedded.port, "aggregator", inbox=inbox)
    dev = mh.connect_client(embedded.port, "dev-a")
    try:
        mh.subscribe(agg, "fedclip/job1/update/dev-a", qos=1)
        mh.publish(dev, "fedclip/job1/update/dev-a", body, qos=1, timeout=30)
        msg = inbox.wait_for("fedclip/job1/update/dev-a", timeout=30)
        assert len(msg.payload) == len(body)
        assert msg.payload == body
    finally:
        mh.disconnect_client(agg)
        mh.disconnect_client(dev)


def test_embedded_last_will_is_delivered(embedded):
    inbox = mh.Inbox()
    agg = mh.connect_client(embedded.port, "aggregator", inbox=inbox)
    will = ("fedclip/job1/status/dev-a", b'{"state":"lost"}', 1, False)
    dev = mh.connect_client(embedded.port, "dev-a", will=will, keepalive=30)
    try:
        mh.subscribe(agg, "fedclip/job1/status/+", qos=1)
        _kill_abruptly(dev)
        msg = inbox.wait_for("fedclip/job1/status/dev-a", timeout=10)
        assert msg.payload == b'{"state":"lost"}'
    finally:
        mh.disconnect_client(agg)


def test_embedded_stop_disconnects_clients():
    broker = EmbeddedBroker().start()
    client = mh.connect_client(broker.port, "dev-a")
    try:
        broker.stop(timeout=10)
        deadline = time.monotonic() + 10
        while client.is_connected() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not client.is_connected()
    finally:
        mh.disconnect_client(client)
        broker.stop()


# ---------------------------------------------------------------------------------------------
# `fedclip-edge broker run`


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    """One line of the child's stdout, waiting at most `timeout` s."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise AssertionError(f"no output within {timeout:g} s")
    return proc.stdout.readline()


def test_cli_broker_run_prints_ready_and_stops_on_sigterm():
    port = mh.free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedclip_edge.broker.cli", "run", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = _read_line(proc, timeout=20)
        assert line.strip() == f"broker listening on mqtt://127.0.0.1:{port}", (
            line,
            proc.stderr.read() if proc.poll() is not None else "",
        )
        inbox = mh.Inbox()
        client = mh.connect_client(port, "probe", inbox=inbox)
        try:
            mh.subscribe(client, "fedclip/probe/global")
            mh.publish(client, "fedclip/probe/global", b"hello")
            assert inbox.wait_for("fedclip/probe/global").payload == b"hello"
        finally:
            mh.disconnect_client(client)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)


def test_cli_broker_run_port_in_use_is_one_clear_line():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "fedclip_edge.broker.cli", "run", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == TransportError.exit_code
    assert result.stderr.strip().splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port}: the port is already in use "
        "(another broker running? choose another --port)"
    ]


# ---------------------------------------------------------------------------------------------
# Production configuration with mosquitto

DEVICES = ("dev-a", "dev-b")


class Prod:
    """The generated PKI and a running mosquitto: ports, credentials, the CA file."""

    def __init__(self, pki: Path, plain_port: int, tls_port: int, proc: subprocess.Popen):
        self.pki = pki
        self.plain_port = plain_port
        self.tls_port = tls_port
        self.proc = proc
        self.ca = pki / "ca.crt"
        self.passwords = {}
        for env in (pki / "credentials").glob("*.env"):
            values = dict(line.split("=", 1) for line in env.read_text().splitlines() if line)
            self.passwords[values["FEDCLIP_MQTT_USERNAME"]] = values["FEDCLIP_MQTT_PASSWORD"]

    def connect(self, user: str, *, tls: bool = False, **kwargs):
        """A client logged in as `user` (client id = username), plain or over TLS."""
        port = self.tls_port if tls else self.plain_port
        return mh.connect_client(
            port,
            user,
            username=user,
            password=self.passwords[user],
            ca_file=self.ca if tls else None,
            **kwargs,
        )


def _test_config(pki: Path, plain_port: int, tls_port: int) -> str:
    """The generated production config with its listeners moved to free loopback ports and the
    optional plain loopback listener switched on (for speed); everything else as shipped."""
    text = (pki / "mosquitto.conf").read_text()
    replacements = {
        "\nlistener 8883\n": f"\nlistener {tls_port} 127.0.0.1\n",
        "\n#listener 1883 127.0.0.1\n#use_username_as_clientid true\n": (
            f"\nlistener {plain_port} 127.0.0.1\nuse_username_as_clientid true\n"
        ),
    }
    for old, new in replacements.items():
        assert text.count(old) == 1, f"mosquitto.conf no longer contains {old!r}"
        text = text.replace(old, new)
    return text


@pytest.fixture(scope="module")
def prod(tmp_path_factory) -> Iterator[Prod]:
    mh.require_mosquitto("mosquitto_passwd", "openssl")
    base = tmp_path_factory.mktemp("mosquitto-prod")
    pki = base / "pki"
    made = subprocess.run(
        ["bash", str(PKI_SCRIPT), "--out", str(pki), *DEVICES],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    assert f"development PKI written to {pki}" in made.stdout
    plain_port, tls_port = mh.free_port(), mh.free_port()
    while tls_port == plain_port:
        tls_port = mh.free_port()
    conf = _test_config(pki, plain_port, tls_port)
    with mh.start_mosquitto(base, conf, port=plain_port) as (proc, _):
        mh.wait_for_port("127.0.0.1", tls_port, timeout=10)
        yield Prod(pki, plain_port, tls_port, proc)


@pytest.mark.mosquitto
def test_make_dev_pki_refuses_to_overwrite(prod):
    again = subprocess.run(
        ["bash", str(PKI_SCRIPT), "--out", str(prod.pki), "dev-a"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert again.returncode != 0
    assert "refusing to overwrite" in again.stderr
    assert set(prod.passwords) == {"aggregator", *DEVICES}
    assert (prod.pki / "ca.key").stat().st_mode & 0o077 == 0


@pytest.mark.mosquitto
def test_tls_connection_with_dev_ca(prod):
    inbox = mh.Inbox()
    dev = prod.connect("dev-a", tls=True, inbox=inbox)
    try:
        assert dev.is_connected()
    finally:
        mh.disconnect_client(dev)
    # Without the dev CA the broker's certificate is not trusted.
    ctx = ssl.create_default_context()
    with socket.create_connection(("127.0.0.1", prod.tls_port), timeout=5) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            ctx.wrap_socket(raw, server_hostname="localhost")
    # With it, the certificate is valid for localhost and 127.0.0.1.
    ctx = ssl.create_default_context(cafile=str(prod.ca))
    for name in ("localhost", "127.0.0.1"):
        with socket.create_connection(("127.0.0.1", prod.tls_port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname=name) as tls:
                assert tls.version() in ("TLSv1.2", "TLSv1.3")


@pytest.mark.mosquitto
def test_anonymous_and_wrong_password_are_refused(prod):
    with pytest.raises(mh.ConnectRefused):
        mh.connect_client(prod.plain_port, "anon")
    with pytest.raises(mh.ConnectRefused):
        mh.connect_client(prod.plain_port, "dev-a", username="dev-a", password="wrong")
    with pytest.raises(mh.ConnectRefused):
        mh.connect_client(
            prod.tls_port, "dev-a", username="dev-a", password="wrong", ca_file=prod.ca
        )
    with pytest.raises(mh.ConnectRefused):
        mh.connect_client(prod.plain_port, "nobody", username="nobody", password="x")


@pytest.mark.mosquitto
def test_device_cannot_publish_another_devices_update(prod):
    inbox = mh.Inbox()
    agg = prod.connect("aggregator", inbox=inbox)
    dev = prod.connect("dev-a")
    try:
        mh.subscribe(agg, "fedclip/job1/update/+", qos=1)
        # MQTT 3.1.1: the broker acknowledges the forbidden publish and drops it.
        mh.publish(dev, "fedclip/job1/update/dev-b", b"forged", qos=1)
        mh.publish(dev, "fedclip/job1/update/dev-a", b"own", qos=1)
        msg = inbox.get(timeout=10)  # in order: the forged one would have come first
        assert (msg.topic, msg.payload) == ("fedclip/job1/update/dev-a", b"own")
        inbox.assert_nothing(within=0.3)
    finally:
        mh.disconnect_client(agg)
        mh.disconnect_client(dev)


@pytest.mark.mosquitto
def test_device_cannot_read_another_devices_update(prod):
    spy_inbox, agg_inbox = mh.Inbox(), mh.Inbox()
    spy = prod.connect("dev-b", inbox=spy_inbox)
    agg = prod.connect("aggregator", inbox=agg_inbox)
    dev = prod.connect("dev-a")
    try:
        mh.subscribe(spy, "fedclip/job2/update/dev-a", qos=1)
        mh.subscribe(spy, "fedclip/#", qos=1)
        mh.subscribe(agg, "fedclip/job2/update/+", qos=1)
        mh.publish(dev, "fedclip/job2/update/dev-a", b"secret", qos=1)
        assert agg_inbox.wait_for("fedclip/job2/update/dev-a", timeout=10).payload == b"secret"
        # a sentinel the spy may read, published after the broker handled the secret: had the
        # secret reached the spy, it would be first in the spy's (ordered) stream
        mh.publish(agg, "fedclip/job2/control", b"sentinel", qos=1)
        first = spy_inbox.get(timeout=10)
        assert (first.topic, first.payload) == ("fedclip/job2/control", b"sentinel")
    finally:
        for c in (spy, agg, dev):
            mh.disconnect_client(c)


@pytest.mark.mosquitto
def test_aggregator_publishes_global_devices_read_but_cannot_forge_it(prod):
    body = _payload(2 * MB, seed=3)
    agg_inbox = mh.Inbox()
    agg = prod.connect("aggregator", inbox=agg_inbox)
    try:
        mh.publish(agg, "fedclip/job3/global", body, qos=1, retain=True)
        mh.publish(agg, "fedclip/job3/control", b'{"round":1}', qos=1, retain=True)
        # A device may not overwrite the global model (the forged publish is dropped).
        mh.subscribe(agg, "fedclip/job3/global", qos=1)
        assert agg_inbox.wait_for("fedclip/job3/global").payload == body  # retained copy
        mh.subscribe(agg, "fedclip/job3/status/dev-b", qos=1)
        dev = prod.connect("dev-b", tls=True)
        try:
            mh.publish(dev, "fedclip/job3/global", b"forged", qos=1, retain=True)
            # then a message dev-b may publish: the broker handles one client's publishes in
            # order, so a forged global that got through would reach the aggregator first
            mh.publish(dev, "fedclip/job3/status/dev-b", b"sentinel", qos=1)
        finally:
            mh.disconnect_client(dev)
        first = agg_inbox.get(timeout=10)
        assert (first.topic, first.payload) == ("fedclip/job3/status/dev-b", b"sentinel")
    finally:
        mh.disconnect_client(agg)
    inbox = mh.Inbox()
    dev = prod.connect("dev-a", tls=True, inbox=inbox)
    try:
        mh.subscribe(dev, "fedclip/job3/global", qos=1)
        mh.subscribe(dev, "fedclip/job3/control", qos=1)
        msgs = {m.topic: m for m in (inbox.get(timeout=10), inbox.get(timeout=10))}
        assert msgs["fedclip/job3/global"].payload == body
        assert msgs["fedclip/job3/global"].retain
        assert msgs["fedclip/job3/control"].payload == b'{"round":1}'
    finally:
        mh.disconnect_client(dev)


@pytest.mark.mosquitto
def test_device_last_will_on_own_status_reaches_aggregator(prod):
    inbox = mh.Inbox()
    agg = prod.connect("aggregator", inbox=inbox)
    try:
        mh.subscribe(agg, "fedclip/job4/status/+", qos=1)
        dev = prod.connect(
            "dev-a", will=("fedclip/job4/status/dev-a", b"offline", 1, False), keepalive=30
        )
        # A will on another device's status topic is accepted at CONNECT but never delivered.
        forger = prod.connect(
            "dev-b", will=("fedclip/job4/status/dev-a", b"forged", 1, False), keepalive=30
        )
        _kill_abruptly(forger)
        _kill_abruptly(dev)
        msg = inbox.wait_for("fedclip/job4/status/dev-a", timeout=10)
        assert msg.payload == b"offline"
        inbox.assert_nothing(within=0.5)
    finally:
        mh.disconnect_client(agg)


@pytest.mark.mosquitto
def test_packet_size_limit_allows_64mib_chunk_and_disconnects_bigger(prod):
    chunk = 64 * 1024 * 1024
    inbox = mh.Inbox()
    agg = prod.connect("aggregator", inbox=inbox)
    try:
        mh.subscribe(agg, "fedclip/job5/update/dev-a", qos=1)
        dev = prod.connect("dev-a")
        try:
            mh.publish(dev, "fedclip/job5/update/dev-a", b"\x01" * (chunk + 4096), timeout=60)
            msg = inbox.wait_for("fedclip/job5/update/dev-a", timeout=60)
            assert len(msg.payload) == chunk + 4096
            del msg
            too_big = b"\x02" * (68_222_976 + 1)
            dev.publish("fedclip/job5/update/dev-a", too_big, qos=1)
            deadline = time.monotonic() + 30
            while dev.is_connected() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not dev.is_connected(), "an oversized packet should get the client disconnected"
        finally:
            mh.disconnect_client(dev)
        inbox.assert_nothing(within=0.3)
    finally:
        mh.disconnect_client(agg)


@pytest.mark.mosquitto
def test_persistence_keeps_retained_global_and_queued_updates_across_restart(prod, tmp_path):
    """The production config persists: a restarted broker still holds the retained global model
    and the QoS 1 updates queued for the (offline, persistent-session) aggregator."""
    data = tmp_path / "data"
    data.mkdir()
    plain, tls = mh.free_port(), mh.free_port()
    conf = _test_config(prod.pki, plain, tls)
    conf = conf.replace(f"persistence_location {prod.pki}/data", f"persistence_location {data}")
    assert f"persistence_location {data}" in conf  # not the running fixture broker's database
    restarted = Prod(prod.pki, plain, tls, prod.proc)

    with mh.start_mosquitto(tmp_path / "first", conf, port=plain):
        agg = restarted.connect("aggregator", clean_session=False)
        try:
            mh.subscribe(agg, "fedclip/job6/update/+", qos=1)
            mh.publish(agg, "fedclip/job6/global", b"model-v1", qos=1, retain=True)
        finally:
            mh.disconnect_client(agg)
        dev = restarted.connect("dev-a")
        try:
            mh.publish(dev, "fedclip/job6/update/dev-a", b"update-while-away", qos=1)
        finally:
            mh.disconnect_client(dev)
    assert (data / "mosquitto.db").is_file()

    with mh.start_mosquitto(tmp_path / "second", conf, port=plain):
        inbox = mh.Inbox()
        agg = restarted.connect("aggregator", clean_session=False, inbox=inbox)
        try:
            queued = inbox.wait_for("fedclip/job6/update/dev-a", timeout=10)
            assert queued.payload == b"update-while-away"
        finally:
            mh.disconnect_client(agg)
        inbox = mh.Inbox()
        dev = restarted.connect("dev-b", inbox=inbox)
        try:
            mh.subscribe(dev, "fedclip/job6/global", qos=1)
            assert inbox.wait_for("fedclip/job6/global", timeout=10).payload == b"model-v1"
        finally:
            mh.disconnect_client(dev)


@pytest.mark.mosquitto
def test_start_mosquitto_helper_default_config(tmp_path):
    mh.require_mosquitto()
    with mh.start_mosquitto(tmp_path) as (proc, port):
        inbox = mh.Inbox()
        client = mh.connect_client(port, "anon", inbox=inbox)
        try:
            mh.subscribe(client, "t")
            mh.publish(client, "t", b"x")
            assert inbox.wait_for("t").payload == b"x"
        finally:
            mh.disconnect_client(client)
    assert proc.poll() is not None


def test_require_mosquitto_fails_when_ci_demands_it(monkeypatch):
    monkeypatch.setattr(mh, "_find_tool", lambda name: None)
    monkeypatch.delenv(mh.REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception):
        mh.require_mosquitto()
    monkeypatch.setenv(mh.REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception):
        mh.require_mosquitto()
    assert os.environ[mh.REQUIRE_ENV] == "1"
