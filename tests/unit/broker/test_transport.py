"""Transports: in-memory semantics, chunking through a transport, URL and TLS options.

paho against a real mosquitto lives in tests/integration/test_transport_mosquitto.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedclip_edge.broker import protocol as p
from fedclip_edge.broker.transport import (
    MemoryBroker,
    MemoryTransport,
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


def test_tls_options_from_cli_options():

    from fedclip_edge.broker.transport import TlsOptions

    assert TlsOptions.from_options() is None
    tls = TlsOptions.from_options(Path("/ca.pem"), None, None, False)
    assert tls == TlsOptions("/ca.pem", None, None, False)
    assert TlsOptions.from_options(insecure=True) == TlsOptions(None, None, None, True)
