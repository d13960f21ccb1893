"""MQTT test helpers shared by the broker, device-agent and aggregator tests.

Why: every MQTT test needs a broker on a free loopback port, bounded waits and a guaranteed
cleanup. Brokers here listen on 127.0.0.1 only.

- `embedded_broker()`: the in-process amqtt broker (fast; anonymous; no ACL).
- `start_mosquitto(tmp_path, conf_text)`: a real mosquitto process (ACL, TLS, persistence).
- `require_mosquitto()`: skip without the binary, or fail when CI sets FEDCLIP_REQUIRE_MOSQUITTO=1.
- `connect_client(...)`, `Inbox`: paho 2.x clients with timeouts instead of sleeps.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fedclip_edge.broker.embedded import EmbeddedBroker
from fedclip_edge.broker.procs import stop_process

HOST = "127.0.0.1"
REQUIRE_ENV = "FEDCLIP_REQUIRE_MOSQUITTO"
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin", "/snap/bin")


def free_port(host: str = HOST) -> int:
    """A TCP port that was free a moment ago (the OS picks it). Another process may take it before
    you bind it: prefer port 0 where the server can report what it bound (EmbeddedBroker)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Block until host:port accepts a TCP connection; TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"nothing accepts connections on {host}:{port}: {exc}") from exc
            time.sleep(0.02)


def _find_tool(name: str) -> str | None:
    """`shutil.which`, plus the sbin folders that a non-root PATH often lacks (mosquitto lives
    in /usr/sbin on Debian)."""
    found = shutil.which(name)
    if found:
        return found
    for folder in _SBIN_DIRS:
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


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


@dataclass
class MosquittoProcess:
    """A running mosquitto: the process, the port waited for, its config and log files."""

    proc: subprocess.Popen[bytes]
    port: int
    conf_path: Path
    log_path: Path

    def log(self) -> str:
        """What mosquitto wrote so far (stderr and stdout): attach it to assertion messages."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


@contextlib.contextmanager
def start_mosquitto(
    tmp_path: Path,
    conf_text: str | None = None,
    port: int | None = None,
    *,
    timeout: float = 10.0,
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """Run `mosquitto -c CONF` and yield `(proc, port)` once `port` accepts connections; terminate
    it (then kill) at exit.

    conf_text None: an anonymous plain listener on 127.0.0.1:`port`. Otherwise the text is used as
    is, with the token `{port}` replaced by the port; `port` is the one waited for (a free one when
    None). Running as root, `user root` is prepended unless the text sets `user`: mosquitto would
    otherwise drop to the `mosquitto` user, which cannot read files under pytest's private tmp
    folders. The log goes to tmp_path/mosquitto-PORT.log (see `mosquitto_log`).
    """
    binary = require_mosquitto()
    port = free_port() if port is None else port
    if conf_text is None:
        conf_text = "listener {port} 127.0.0.1\nallow_anonymous true\n"
    text = conf_text.replace("{port}", str(port))
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        if not any(line.strip().startswith("user ") for line in text.splitlines()):
            text = "user root\n" + text
    tmp_path.mkdir(parents=True, exist_ok=True)
    conf_path = tmp_path / f"mosquitto-{port}.conf"
    log_path = tmp_path / f"mosquitto-{port}.log"
    conf_path.write_text(text)
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [binary, "-c", str(conf_path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    _RUNNING[proc.pid] = MosquittoProcess(proc, port, conf_path, log_path)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"mosquitto exited with {proc.returncode} before listening on port {port}:\n"
                    + log_path.read_text(errors="replace")
                )
            try:
                wait_for_port(HOST, port, timeout=0.2)
                break
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"mosquitto did not listen on port {port} within {timeout:g} s:\n"
                        + log_path.read_text(errors="replace")
                    ) from None
        yield proc, port
    finally:
        _RUNNING.pop(proc.pid, None)
        stop_process(proc)


_RUNNING: dict[int, MosquittoProcess] = {}


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
