"""MQTT test helpers shared by the broker, device-agent and aggregator tests.

Why: every MQTT test needs a broker on a free loopback port, bounded waits and a guaranteed
cleanup. Brokers here listen on 127.0.0.1 only.

- `embedded_broker()`: the in-process amqtt broker (fast; anonymous; no ACL).
- `start_mosquitto(tmp_path, conf_text)`: a real mosquitto process (ACL, TLS, persistence),
  started by the library's launcher (`fedclip_edge.broker.mosquitto.run_mosquitto`).
- `require_mosquitto()`: skip without the binary, or fail when CI sets FEDCLIP_REQUIRE_MOSQUITTO=1.
- `connect_client(...)`, `Inbox`: paho 2.x clients with timeouts instead of sleeps.
"""

from __future__ import annotations

import contextlib
import os
import queue
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fedclip_edge.broker import mosquitto as _lib
from fedclip_edge.broker.embedded import EmbeddedBroker

HOST = "127.0.0.1"
REQUIRE_ENV = "FEDCLIP_REQUIRE_MOSQUITTO"

# the library's helpers, under the names the tests have always used
free_port = _lib.free_port


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Block until host:port accepts a TCP connection; TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not _lib.accepts(host, port, timeout=0.5):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"nothing accepts connections on {host}:{port}")
        time.sleep(0.02)


def _find_tool(name: str) -> str | None:
    """The library's `find_tool`; a module-level name so tests can monkeypatch it."""
    return _lib.find_tool(name)


def mosquitto_binary() -> str | None:
    """Path of the mosquitto broker binary, or None."""
    return _find_tool("mosquitto")


def mosquitto_available() -> bool:
    """True when the mosquitto broker binary is installed."""
    return mosquitto_binary() is not None


def require_mosquitto(*tools: str) -> str:
    """Return the mosquitto binary's path; skip the test without it (and without any of the extra
    `tools`, e.g. "mosquitto_passwd", "openssl"). With FEDCLIP_REQUIRE_MOSQUITTO=1 (CI) a missing
    binary fails the test instead, so CI cannot go green by skipping."""
    missing = [t for t in ("mosquitto", *tools) if _find_tool(t) is None]
    if missing:
        msg = (
            f"mosquitto binary not found ({', '.join(missing)} missing; Debian/Ubuntu: apt install "
            "mosquitto mosquitto-clients)"
        )
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{msg}; {REQUIRE_ENV}=1 requires it", pytrace=False)
        pytest.skip(msg)
    binary = mosquitto_binary()
    assert binary is not None
    return binary


@contextlib.contextmanager
def embedded_broker(host: str = HOST, port: int = 0) -> Iterator[EmbeddedBroker]:
    """An in-process amqtt broker on a free port (or `port`), stopped at exit. Use `.port`."""
    with EmbeddedBroker(host, port, start_timeout=10.0) as broker:
        yield broker


@contextlib.contextmanager
def start_mosquitto(
    tmp_path: Path,
    conf_text: str | None = None,
    port: int | None = None,
    *,
    timeout: float = 10.0,
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`broker/mosquitto.py`'s `run_mosquitto` as the tests use it: yields `(proc, port)` once
    `port` accepts connections and stops the broker (terminate, then kill) at exit.

    conf_text None: an anonymous plain listener on 127.0.0.1:`port`. Otherwise the text is used as
    is, with the token `{port}` replaced (root gets `user root`, as the library does). The log is
    tmp_path/mosquitto-PORT.log (see `mosquitto_log`); a broker that exits or never listens
    raises TransportError with it.
    """
    binary = require_mosquitto()
    if conf_text is None:
        conf_text = "listener {port} 127.0.0.1\nallow_anonymous true\n"
    with _lib.run_mosquitto(tmp_path, conf_text, port=port, timeout=timeout,
                            binary=binary) as broker:
        _RUNNING[broker.pid] = broker
        try:
            yield broker.proc, broker.port
        finally:
            _RUNNING.pop(broker.pid, None)


_RUNNING: dict[int, _lib.Mosquitto] = {}


def mosquitto_log(proc: subprocess.Popen[bytes]) -> str:
    """The log of a mosquitto started by start_mosquitto (for assertion messages)."""
    info = _RUNNING.get(proc.pid)
    return info.log() if info is not None else ""


# ---------------------------------------------------------------------------------------------
# paho 2.x clients with bounded waits


class Inbox:
    """Collects messages from a paho client's on_message so tests can wait with a timeout."""

    def __init__(self) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()

    def on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        self.messages.put(msg)

    def get(self, timeout: float = 10.0) -> mqtt.MQTTMessage:
        """The next message; `queue.Empty` after `timeout` s."""
        return self.messages.get(timeout=timeout)

    def wait_for(self, topic: str, timeout: float = 10.0) -> mqtt.MQTTMessage:
        """The next message on `topic` (others are dropped); AssertionError after `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no message on {topic!r} within {timeout:g} s")
            try:
                msg = self.messages.get(timeout=left)
            except queue.Empty:
                continue
            if msg.topic == topic:
                return msg

    def assert_nothing(self, within: float, topic: str | None = None) -> None:
        """Fail if a message (on `topic`, or any) arrives within `within` s."""
        deadline = time.monotonic() + within
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = self.messages.get(timeout=left)
            except queue.Empty:
                return
            if topic is None or msg.topic == topic:
                raise AssertionError(f"unexpected message on {msg.topic!r} ({len(msg.payload)} B)")


class ConnectRefused(Exception):
    """The broker answered CONNECT with a failure reason code (bad credentials, ...)."""

    def __init__(self, reason: object) -> None:
        super().__init__(f"connection refused: {reason}")
        self.reason = reason


def connect_client(
    port: int,
    client_id: str,
    *,
    username: str | None = None,
    password: str | None = None,
    ca_file: str | Path | None = None,
    will: tuple[str, bytes, int, bool] | None = None,
    clean_session: bool = True,
    keepalive: int = 60,
    inbox: Inbox | None = None,
    timeout: float = 10.0,
    host: str = HOST,
) -> mqtt.Client:
    """A connected paho 2.x client (MQTT 3.1.1) with its network loop running.

    Raises ConnectRefused when the broker refuses the CONNECT and TimeoutError when it does not
    answer within `timeout`. `will` is (topic, payload, qos, retain). `ca_file` turns on TLS with
    hostname checking. Stop it with `disconnect_client`."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv311,
        clean_session=clean_session,
    )
    if username is not None:
        client.username_pw_set(username, password)
    if ca_file is not None:
        client.tls_set(ca_certs=str(ca_file), tls_version=ssl.PROTOCOL_TLS_CLIENT)
    if will is not None:
        topic, payload, qos, retain = will
        client.will_set(topic, payload, qos=qos, retain=retain)
    if inbox is not None:
        client.on_message = inbox.on_message
    done = threading.Event()
    result: dict[str, object] = {}

    def on_connect(c: mqtt.Client, u: object, flags: object, reason: object, props: object) -> None:
        result["reason"] = reason
        done.set()

    def on_disconnect(
        c: mqtt.Client, u: object, flags: object, reason: object, props: object
    ) -> None:
        result.setdefault("reason", reason)
        done.set()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.connect(host, port, keepalive=keepalive)
    client.loop_start()
    if not done.wait(timeout):
        disconnect_client(client)
        raise TimeoutError(f"no CONNACK from {host}:{port} within {timeout:g} s")
    reason = result.get("reason")
    if getattr(reason, "is_failure", True):
        disconnect_client(client)
        raise ConnectRefused(reason)
    return client


def disconnect_client(client: mqtt.Client, timeout: float = 5.0) -> None:
    """Disconnect cleanly (no last will) and stop the network loop; never hangs."""
    with contextlib.suppress(Exception):
        client.disconnect()
    stopper = threading.Thread(target=client.loop_stop, daemon=True)
    stopper.start()
    stopper.join(timeout)


def subscribe(client: mqtt.Client, topic: str, qos: int = 1, timeout: float = 10.0) -> list[int]:
    """Subscribe and wait for the SUBACK; return the granted QoS values (128 = refused)."""
    done = threading.Event()
    granted: list[int] = []

    def on_subscribe(c: mqtt.Client, u: object, mid: int, codes: list, props: object) -> None:
        granted.extend(int(getattr(rc, "value", rc)) for rc in codes)
        done.set()

    client.on_subscribe = on_subscribe
    client.subscribe(topic, qos)
    if not done.wait(timeout):
        raise TimeoutError(f"no SUBACK for {topic!r} within {timeout:g} s")
    return granted


def publish(
    client: mqtt.Client,
    topic: str,
    payload: bytes,
    qos: int = 1,
    retain: bool = False,
    timeout: float = 30.0,
) -> None:
    """Publish and, for QoS > 0, wait for the broker's acknowledgement."""
    info = client.publish(topic, payload, qos=qos, retain=retain)
    info.wait_for_publish(timeout)
    if not info.is_published():
        raise TimeoutError(f"publish to {topic!r} not acknowledged within {timeout:g} s")


class Presence:
    """Watches a job's status topics (retained hellos, statuses, wills) so a fault test can wait
    for the moment it needs (every device online, one announced offline) instead of sleeping.

    Use as a context manager: `with Presence(port, job) as seen: seen.wait("dev-a", "online")`.
    """

    def __init__(self, port: int, job: str, host: str = HOST) -> None:
        self.port, self.job, self.host = port, job, host
        self.states: dict[str, list[str]] = {}  # client -> every state seen, in order
        self.bound: set[str] = set()  # clients seen saying hello for a job run
        self._cond = threading.Condition()
        self._client: mqtt.Client | None = None

    def __enter__(self) -> Presence:
        self._client = connect_client(self.port, f"presence-{self.job}", host=self.host)
        self._client.on_message = self._on_message
        subscribe(self._client, f"fedclip/{self.job}/status/+", qos=1)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._client is not None:
            disconnect_client(self._client)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        from fedclip_edge.broker import protocol as P

        try:
            st = P.decode_message(msg.payload)
        except P.MessageRejected:
            return
        if isinstance(st, P.Status):
            with self._cond:
                self.states.setdefault(st.client, []).append(st.state)
                if st.run and st.state != "offline":
                    self.bound.add(st.client)  # said hello for a run (docs/protocol.md "Runs")
                self._cond.notify_all()

    def wait(self, client: str, state: str, timeout: float = 60.0, *, after: int = 0) -> int:
        """Until `client` has announced `state` (at index >= `after` of its history); returns
        how many states it had announced then. AssertionError after `timeout` s."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                seen = self.states.get(client, [])
                if state in seen[after:]:
                    return len(seen)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"{client} did not announce {state!r} within {timeout:g} s "
                        f"(seen: {seen})"
                    )
                self._cond.wait(left)

    def wait_bound(self, client: str, timeout: float = 60.0) -> None:
        """Until `client` has said hello for a run (what the aggregator counts online)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while client not in self.bound:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{client} said hello for no run within {timeout:g} s")
                self._cond.wait(left)

    def count(self, client: str) -> int:
        with self._cond:
            return len(self.states.get(client, []))
