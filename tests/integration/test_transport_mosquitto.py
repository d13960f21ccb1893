"""MqttTransport (paho) against a real mosquitto process: chunked round trip, retained
messages and wills, one clear error for an unreachable broker, reconnect after a restart.

Integration, not unit: each test starts mosquitto (skips with the reason where the binary is
missing, fails instead with FEDCLIP_REQUIRE_MOSQUITTO=1).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from support import mqtt as mh

from fedclip_edge.broker.transport import MqttTransport
from fedclip_edge.errors import TransportError

pytestmark = pytest.mark.integration


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


@pytest.mark.mosquitto
def test_manual_ack_a_crash_loses_nothing_unacknowledged(tmp_path: Path) -> None:
    """What the aggregator acknowledged is gone from the broker; what it had received but not
    acknowledged (held in its inbox when it died) is delivered again to its next session."""
    with _mosquitto(tmp_path) as url:
        sender = MqttTransport(url, "sender")
        sender.connect(10)
        agg = MqttTransport(url, "agg", manual_ack=True)
        agg.subscribe("fedclip/j/update/+")
        agg.connect(10)
        # the subscription is active once a message through it comes back (SUBACK ordering)
        assert agg.publish("fedclip/j/update/probe", b"probe").wait(10)
        probe = agg.recv(10)
        assert probe is not None and probe.payload == b"probe"
        agg.ack(probe)
        for i in range(3):
            assert sender.publish(f"fedclip/j/update/d{i}", f"u{i}".encode()).wait(10)
        got = [agg.recv(10) for _ in range(3)]
        assert all(m is not None for m in got)
        by_payload = {m.payload: m for m in got if m is not None}
        agg.ack(by_payload[b"u1"])  # only u1 was validated before the "crash"
        # a barrier, not a sleep: packets go out in order on one connection, so once the broker
        # acknowledged this publish it has processed the PUBACK written before it
        assert agg.publish("fedclip/j/barrier", b"b").wait(10)
        agg.client.loop_stop()  # a crash: no more acks, no clean shutdown
        agg.client.socket().close()
        again = MqttTransport(url, "agg", manual_ack=True)
        again.subscribe("fedclip/j/update/+")
        again.connect(10)
        redelivered = set()
        while True:
            m = again.recv(3)
            if m is None:
                break
            redelivered.add(m.payload)
            again.ack(m)
        again.close()
        sender.close()
        assert redelivered == {b"u0", b"u2"}


@pytest.mark.mosquitto
def test_private_broker_with_persistence_keeps_a_queued_message_across_a_restart(
    tmp_path: Path,
) -> None:
    """The soak restarts its broker to test that QoS 1 messages queued for an offline
    persistent session survive; the launcher never created the persistence folder, so every
    save failed and the soak tested a broker that forgot everything (seen as a message missing
    from the soak's recorder after a restart)."""
    from fedclip_edge.broker.mosquitto import run_mosquitto

    binary = mh.require_mosquitto()
    db = tmp_path / "not" / "yet" / "db"
    port = _free_port()
    with run_mosquitto(tmp_path / "run1", port=port, persistence_dir=db, binary=binary) as b:
        url = f"mqtt://127.0.0.1:{b.port}"
        sub = MqttTransport(url, "sub")  # persistent session (clean_session False)
        sub.subscribe("t/#")
        sub.connect(5)
        sub.close()  # offline: what is published now is queued for it
        pub = MqttTransport(url, "pub")
        pub.connect(5)
        assert pub.publish("t/x", b"queued while offline").wait(5)
        pub.close()
    assert "Error saving" not in (tmp_path / "run1" / f"mosquitto-{port}.log").read_text()
    assert any(db.iterdir())
    with run_mosquitto(tmp_path / "run2", port=port, persistence_dir=db, binary=binary):
        sub = MqttTransport(url, "sub")
        sub.connect(5)
        try:
            m = sub.recv(10)
            assert m is not None and m.payload == b"queued while offline"
        finally:
            sub.close()
