"""Transports: in-memory semantics, chunking through a transport, and paho against mosquitto."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from support import mqtt as mh

from fedclip_edge.broker import protocol as p
from fedclip_edge.broker.transport import (
    MemoryBroker,
    MemoryTransport,
    MqttTransport,
    parse_broker_url,
)
from fedclip_edge.errors import TransportError


def test_memory_retained_wills_and_offline_loss() -> None:
    broker = MemoryBroker()
    a = MemoryTransport(broker, "a", will=("fedclip/j/status/a", b"gone", True))
    b = MemoryTransport(broker, "b")
    a.connect()
    a.publish("fedclip/j/global", b"G1", retain=True)
    b.subscribe("fedclip/j/#")
    b.connect()
    got = b.recv(1)
    assert got is not None and got.payload == b"G1" and got.retained
    b.close()
    assert a.publish("fedclip/j/update/a", b"lost").wait(0.1)  # broker took it
    b.connect()
    assert b.recv(0.2) is not None  # the retained global again on reconnect
    assert b.recv(0.05) is None  # but the update sent while b was offline is gone (as amqtt)
    assert b.epoch == 2
    broker.drop("a")
    will = b.recv(1)
    assert will is not None and will.payload == b"gone"
    assert broker.retained["fedclip/j/status/a"] == b"gone"
    assert not a.publish("fedclip/j/update/a", b"x").wait(0.1)  # offline publish: not acked


def test_chunking_through_a_transport_counts_wire_bytes() -> None:
    broker = MemoryBroker()
    a = MemoryTransport(broker, "a", max_payload=2048)
    b = MemoryTransport(broker, "b")
    b.subscribe("t/#")
    a.connect()
    b.connect()
    payload = os.urandom(20_000)
    d = a.publish("t/x", payload)
    assert d.wait(1) and d.wire_bytes > len(payload)
    got = b.recv(1)
    assert got is not None and got.payload == payload and got.wire_bytes == d.wire_bytes
    assert a.counters.bytes_up == d.wire_bytes == b.counters.bytes_down
    assert a.counters.messages_up == -(-20_000 // (2048 - 512))


def test_chunked_retained_publish_clears_the_stale_retained_message() -> None:
    broker = MemoryBroker()
    a = MemoryTransport(broker, "a", max_payload=2048)
    a.connect()
    a.publish("t/g", b"old", retain=True)
    a.publish("t/g", os.urandom(5000), retain=True)
    assert "t/g" not in broker.retained  # never a lone last chunk retained


def test_corrupt_chunk_is_counted_not_delivered() -> None:
    broker = MemoryBroker()
    b = MemoryTransport(broker, "b")
    b.subscribe("t/#")
    b.connect()
    chunks = p.split_payload(b"z" * 5000, 1024)
    header, body = p.decode_envelope(chunks[0])
    chunks[0] = p.encode_envelope(header, b"Y" * len(body))
    for c in chunks:
        broker.publish("evil", "t/x", c, False)
    assert b.recv(0.1) is None
    assert b.rejected["chunk_hash"] == 1


def test_broker_url_parsing() -> None:
    assert parse_broker_url("mqtt://127.0.0.1:1884") == ("127.0.0.1", 1884, False, None, None)
    assert parse_broker_url("mqtts://u:p%40@h") == ("h", 8883, True, "u", "p@")
    with pytest.raises(TransportError):
        parse_broker_url("http://h")


# ----------------------------------------------------------------------------- mosquitto


@contextmanager
def _mosquitto(tmp: Path, port: int | None = None) -> Iterator[str]:
    """mosquitto on a free loopback port (skips with the reason where the binary is missing,
    fails instead with FEDCLIP_REQUIRE_MOSQUITTO=1)."""
    with mh.start_mosquitto(tmp, port=port) as (_, bound):
        yield f"mqtt://127.0.0.1:{bound}"


def _free_port() -> int:
    return mh.free_port()


@pytest.mark.mosquitto
def test_mqtt_chunked_round_trip_retained_and_will(tmp_path: Path) -> None:
    with _mosquitto(tmp_path) as url:
        a = MqttTransport(url, "a", will=("fedclip/j/status/a", b"gone", True), max_payload=4096)
        b = MqttTransport(url, "b")
        try:
            a.connect(5)
            a.publish("fedclip/j/global", b"G", retain=True).wait(5)
            b.subscribe("fedclip/j/#")
            b.connect(5)
            got = b.recv(5)
            assert got is not None and got.payload == b"G" and got.retained
            payload = os.urandom(50_000)
            d = a.publish("fedclip/j/update/a", payload)
            assert d.wait(5)
            got = b.recv(5)
            assert got is not None and got.payload == payload
            assert got.wire_bytes == d.wire_bytes
            assert a.counters.bytes_up == 1 + d.wire_bytes
            # ungraceful end of a: the socket closes without DISCONNECT, the will goes out
            a.client.socket().close()
            deadline = time.monotonic() + 10
            will = None
            while time.monotonic() < deadline and will is None:
                m = b.recv(0.5)
                if m is not None and m.payload == b"gone":
                    will = m
            assert will is not None
        finally:
            a.close()
            b.close()


@pytest.mark.mosquitto
def test_mqtt_refused_or_unreachable_broker_is_one_clear_error() -> None:
    t = MqttTransport(f"mqtt://127.0.0.1:{_free_port()}", "x")
    with pytest.raises(TransportError, match="not reachable"):
        t.connect(1.5)


@pytest.mark.mosquitto
def test_mqtt_reconnects_after_broker_restart_and_sends_queued(tmp_path: Path) -> None:
    port = _free_port()
    with _mosquitto(tmp_path, port) as url:
        a = MqttTransport(url, "a", reconnect_min_s=1, reconnect_max_s=1)
        b = MqttTransport(url, "b", reconnect_min_s=1, reconnect_max_s=1)
        a.connect(5)
        b.subscribe("t/#")
        b.connect(5)
    try:
        # broker down: a publish is queued by paho, not acknowledged
        d = a.publish("t/x", b"queued")
        assert not d.wait(0.3)
        with _mosquitto(tmp_path, port):
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and not (a.epoch >= 2 and b.epoch >= 2):
                time.sleep(0.1)
            assert a.epoch >= 2 and b.epoch >= 2
            if not d.wait(5):  # paho resends in-flight messages after reconnecting
                pytest.fail("queued publish never acknowledged")
            a.publish("t/x", b"after").wait(5)
            seen = set()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and "after" not in seen:
                m = b.recv(0.5)
                if m is not None:
                    seen.add(m.payload.decode())
            assert "after" in seen  # b resubscribed on its own
    finally:
        a.close()
        b.close()


def test_tls_options_from_cli_options():
    from pathlib import Path

    from fedclip_edge.broker.transport import TlsOptions

    assert TlsOptions.from_options() is None
    tls = TlsOptions.from_options(Path("/ca.pem"), None, None, False)
    assert tls == TlsOptions("/ca.pem", None, None, False)
    assert TlsOptions.from_options(insecure=True) == TlsOptions(None, None, None, True)
