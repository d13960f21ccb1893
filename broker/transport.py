"""Transports own messages: publish, subscribe, chunking, byte counting. Nothing else.

The aggregator and the agent only see whole payloads through `Transport.recv(timeout)` (a
queue filled by the transport's own thread, so their logic stays single-threaded) and
`Transport.publish(topic, payload, retain=...)`. Two implementations:

- `MemoryBroker` + `MemoryTransport`: in-process, for unit tests (drops, wills, reconnects).
- `MqttTransport`: paho-mqtt 2.x, persistent session, reconnect with backoff, TLS, passwords.

Backpressure: the inbox is bounded in bytes (`max_inflight_bytes`), not only in messages. With
`manual_ack=True` (the aggregator) a message is acknowledged to the broker (PUBACK) only when
the consumer calls `ack(msg)` after validating and adding it, so under a burst the broker holds
what the aggregator cannot (mosquitto sends at most `max_inflight_messages` unacknowledged QoS 1
messages per client), and a crash loses nothing that was acknowledged. When the inbox is full
(in bytes or in messages) the receiving thread waits for room instead of dropping the message:
nothing is acknowledged and dropped unlogged. A flood is cut at its sender instead
(`rate_limit`, broker/ratelimit.py): messages over one sender's limit are dropped before any
decoding, acknowledged, counted (`rate_limited`) and logged as one summary line per interval, and
a registered sender over it is unsubscribed at the broker a while (`penalty`, broker/penalty.py).

Chunking lives here: a publish above `max_payload` becomes chunk envelopes
(`protocol.split_payload`) and the receiving transport reassembles them. A retained publish that
needs chunks cannot be retained as a whole (a broker keeps one message per topic): the topic's
retained message is cleared instead and the chunks go out unretained; the aggregator resends
such a global on request (see docs/protocol.md). Byte counters count the actual MQTT payload
bytes per direction, chunk envelopes included.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fedclip_edge.broker import protocol
from fedclip_edge.broker.brokerurl import TlsOptions, parse_broker_url
from fedclip_edge.broker.penalty import PenaltyBox
from fedclip_edge.broker.protocol import MessageRejected, Reassembler
from fedclip_edge.broker.ratelimit import SenderRateLimit
from fedclip_edge.errors import TransportError

# What an inbox may hold before the receiving thread waits: 64 MiB is 30 fp32 ViT-B-32 adapter
# updates (2.1 MB each), enough to keep the aggregator busy, small next to a burst of 1000.
DEFAULT_MAX_INFLIGHT_BYTES = 64 * 1024 * 1024
# topic filters per SUBSCRIBE/UNSUBSCRIBE packet: 10,000 devices' 20,000 topics in 40 packets
FILTERS_PER_PACKET = 500


@dataclass(frozen=True)
class Received:
    """A whole message: its topic, payload, whether the broker sent it as retained, the wire
    bytes it took (all chunks) and the seconds from its first chunk to the last."""

    topic: str
    payload: bytes
    retained: bool = False
    wire_bytes: int = 0
    transfer_s: float = 0.0
    # the broker's acknowledgement, sent by Transport.ack (manual_ack transports only)
    ack_token: Any = field(default=None, compare=False, repr=False)


@dataclass
class Counters:
    """Actual MQTT payload bytes and message counts per direction (chunks counted each)."""

    bytes_up: int = 0
    bytes_down: int = 0
    messages_up: int = 0
    messages_down: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def up(self, n: int) -> None:
        with self.lock:
            self.bytes_up += n
            self.messages_up += 1

    def down(self, n: int) -> None:
        with self.lock:
            self.bytes_down += n
            self.messages_down += 1

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return {
                "bytes_up": self.bytes_up,
                "bytes_down": self.bytes_down,
                "messages_up": self.messages_up,
                "messages_down": self.messages_down,
            }


class Delivery:
    """The outcome of one publish (all its chunks): `wait(timeout)` is True once every part
    was acknowledged (PUBACK for QoS 1)."""

    def __init__(self, parts: list[Callable[[float], bool]], wire_bytes: int) -> None:
        self._parts = parts
        self.wire_bytes = wire_bytes

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + max(0.0, timeout)
        return all(part(max(0.0, deadline - time.monotonic())) for part in self._parts)


def _acked(_: float) -> bool:
    return True


def _lost(_: float) -> bool:
    return False


class Transport:
    """Common part: chunking on the way out, reassembly and the inbox on the way in."""

    def __init__(
        self,
        client_id: str,
        *,
        max_payload: int = protocol.DEFAULT_MAX_PAYLOAD,
        max_message_bytes: int = protocol.MAX_MESSAGE_BYTES,
        chunk_timeout_s: float = 120.0,
        inbox_size: int = 10_000,
        max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
        manual_ack: bool = False,
        rate_limit: SenderRateLimit | None = None,
        penalty: PenaltyBox | None = None,
    ) -> None:
        self.client_id = client_id
        self.rate_limit = rate_limit
        # a registered sender over its rate limit is unsubscribed for a while (broker/penalty.py)
        self.penalty = penalty
        self.max_payload = max_payload
        self.counters = Counters()
        self.rejected: Counter[str] = Counter()  # chunk-level rejections, by reason
        self.epoch = 0  # number of successful connects: a change means "reconnected"
        self.manual_ack = manual_ack
        self.max_inflight_bytes = max(1, int(max_inflight_bytes))
        self.inflight_bytes = 0  # in the inbox, or handed out and not yet acknowledged
        self.peak_inflight_bytes = 0
        self._room = threading.Condition()
        self._closing = False
        self._filters: dict[str, None] = {}  # ordered; a dict: 20,000 per-id topics
        # bounded by `_admit` (bytes and count), so a put never finds it full
        self._inbox_size = max(1, inbox_size)
        self._inbox: queue.Queue[Received] = queue.Queue()
        self._reassembler = Reassembler(
            max_bytes=max_message_bytes,
            max_pending_bytes=2 * max_message_bytes,
            timeout_s=chunk_timeout_s,
        )
        self._rlock = threading.Lock()
        self._last_expiry = time.monotonic()

    # --- what subclasses provide
    @property
    def connected(self) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def connect(self, timeout: float = 10.0) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _send(self, topic: str, payload: bytes, retain: bool) -> Callable[[float], bool]:
        raise NotImplementedError  # pragma: no cover - abstract

    def _subscribe_raw(self, pattern: str) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _subscribe_many(self, patterns: list[str]) -> None:
        for p in patterns:
            self._subscribe_raw(p)

    def _unsubscribe_many(self, patterns: list[str]) -> None:
        """Stop the broker routing `patterns` here (the base: nothing routes by filters)."""

    # --- the interface
    def subscribe(self, *patterns: str) -> None:
        """Subscribe now and again after every reconnect (MQTT: 500 filters per SUBSCRIBE)."""
        self._filters.update(dict.fromkeys(patterns))
        if self.connected:
            self._subscribe_many(list(patterns))

    def unsubscribe(self, *patterns: str) -> None:
        """Unsubscribe now, and not again after a reconnect."""
        for p in patterns:
            self._filters.pop(p, None)
        if self.connected:
            self._unsubscribe_many(list(patterns))

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> Delivery:
        """QoS 1 publish of a whole message, chunked when above `max_payload`."""
        parts = protocol.split_payload(bytes(payload), self.max_payload)
        waits: list[Callable[[float], bool]] = []
        if retain and len(parts) > 1:
            waits.append(self._send(topic, b"", True))  # clear the stale retained message
            retain = False
        for part in parts:
            waits.append(self._send(topic, part, retain))
        return Delivery(waits, sum(len(p) for p in parts))

    def recv(self, timeout: float) -> Received | None:
        """The next whole message, or None after `timeout` seconds.

        Without manual acknowledgements the message's bytes leave the inbox bound now; with
        them, when the consumer calls `ack(msg)`.
        """
        self._expire_chunks()
        if self.penalty is not None:
            self.penalty.tick(self)  # penalties over: resubscribed (on the consumer's thread)
        try:
            msg = self._inbox.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None
        if not self.manual_ack:
            self._release(len(msg.payload))
        else:
            with self._room:
                self._room.notify_all()  # a place in the inbox's count is free
        return msg

    def _expire_chunks(self) -> None:
        """Incomplete chunked transfers older than their timeout are dropped on the consumer's
        schedule (about once a second), not only when another chunk arrives; counted."""
        now = time.monotonic()
        if now - self._last_expiry < 1.0:
            return
        self._last_expiry = now
        with self._rlock:
            self._reassembler.expire()
            expired, self._reassembler.expired = self._reassembler.expired, 0
            superseded, self._reassembler.superseded = self._reassembler.superseded, 0
        if expired:
            self.rejected["chunk_expired"] += expired
        if superseded:
            self.rejected["chunk_superseded"] += superseded

    def ack(self, msg: Received) -> None:
        """The consumer is done with `msg`: acknowledge it to the broker, free its bytes."""
        if not self.manual_ack:
            return
        self._release(len(msg.payload))
        if msg.ack_token is not None:
            self._send_ack(msg.ack_token)

    def _send_ack(self, token: Any) -> None:
        """Acknowledge one broker message (PUBACK); transports with broker acks override."""

    def _release(self, n: int) -> None:
        with self._room:
            self.inflight_bytes -= n
            self._room.notify_all()

    def _admit(self, n: int) -> bool:
        """Wait (on the receiving thread) until `n` more bytes fit; False when closing.

        A message larger than the whole bound is admitted alone, so nothing is stuck forever.
        """
        with self._room:
            while (
                self.inflight_bytes > 0 and self.inflight_bytes + n > self.max_inflight_bytes
            ) or self._inbox.qsize() >= self._inbox_size:
                if self._closing:
                    return False
                self._room.wait(0.2)
            self.inflight_bytes += n
            self.peak_inflight_bytes = max(self.peak_inflight_bytes, self.inflight_bytes)
            return True

    # --- called from the transport's receiving thread
    def _on_raw(self, topic: str, payload: bytes, retained: bool, token: Any = None) -> None:
        """One broker message. Returns having either queued it (its ack then belongs to the
        consumer) or acknowledged it here (chunks that are not the last, rejections)."""
        self.counters.down(len(payload))
        if not payload:
            self._ack_now(token)
            return  # a cleared retained message
        if self.penalty is not None and self.penalty.holds(topic):
            self.rejected["penalized"] += 1  # queued at the broker before the unsubscribe
            self._ack_now(token)
            return
        if self.rate_limit is not None and not self.rate_limit.allow(topic, len(payload)):
            self.rejected["rate_limited"] += 1  # and in the limiter's summary line, by sender
            if self.penalty is not None:
                self.penalty.tripped(self, topic)  # a registered id: unsubscribed a while
            self._ack_now(token)
            return
        if protocol.peek_type(payload) == "chunk":
            with self._rlock:
                try:
                    done = self._reassembler.feed(topic, payload)
                except MessageRejected as exc:
                    self.rejected[exc.reason] += 1
                    self._ack_now(token)
                    return
            if done is None:
                self._ack_now(token)  # held by the reassembler, bounded by its own limits
                return
            whole, wire, seconds = done
            msg = Received(topic, whole, retained, wire, seconds, token)
        else:
            msg = Received(topic, bytes(payload), retained, len(payload), 0.0, token)
        if not self._admit(len(msg.payload)):
            return  # closing: not acknowledged, so the broker delivers it again
        self._inbox.put_nowait(msg)

    def _ack_now(self, token: Any) -> None:
        if self.manual_ack and token is not None:
            self._send_ack(token)


# ----------------------------------------------------------------------------- in memory


class MemoryBroker:
    """A tiny in-process broker: retained messages, '+'/'#' filters, wills, and no queueing
    for offline clients (what amqtt does; correctness must not rely on broker queues)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.retained: dict[str, bytes] = {}
        self.clients: dict[str, MemoryTransport] = {}
        self.log: list[tuple[str, str, bytes, bool]] = []  # (sender, topic, payload, retain)

    def publish(self, sender: str, topic: str, payload: bytes, retain: bool) -> None:
        with self.lock:
            self.log.append((sender, topic, payload, retain))
            if retain:
                if payload:
                    self.retained[topic] = payload
                else:
                    self.retained.pop(topic, None)
            targets = [
                c
                for c in self.clients.values()
                if c.connected and any(protocol.topic_matches(f, topic) for f in c._filters)
            ]
        for c in targets:
            c._on_raw(topic, payload, False)

    def drop(self, client_id: str) -> None:
        """An ungraceful disconnect (network drop, kill -9): the client's will goes out."""
        with self.lock:
            c = self.clients.get(client_id)
            if c is None or not c._connected:
                return
            c._connected = False
        if c.will is not None:
            self.publish(client_id, *c.will)


class MemoryTransport(Transport):
    """A client of `MemoryBroker`; synchronous delivery into the receiver's inbox."""

    def __init__(
        self,
        broker: MemoryBroker,
        client_id: str,
        *,
        will: tuple[str, bytes, bool] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(client_id, **kwargs)
        self.broker = broker
        self.will = will
        self._connected = False

    @property
    def connected(self) -> bool:
        return self._connected

    def connect(self, timeout: float = 10.0) -> None:
        with self.broker.lock:
            old = self.broker.clients.get(self.client_id)
            if old is not None and old is not self:
                old._connected = False  # MQTT: a second connect with the same id takes over
            self.broker.clients[self.client_id] = self
            self._connected = True
            self.epoch += 1
        self._subscribe_many(list(self._filters))

    def close(self) -> None:
        with self.broker.lock:
            self._connected = False

    def unsubscribe(self, *patterns: str) -> None:
        with self.broker.lock:  # MemoryBroker.publish reads the filters under its lock
            super().unsubscribe(*patterns)

    def _subscribe_raw(self, pattern: str) -> None:
        with self.broker.lock:
            hits = [
                (t, p)
                for t, p in self.broker.retained.items()
                if protocol.topic_matches(pattern, t)
            ]
        for t, p in hits:
            self._on_raw(t, p, True)

    def _send(self, topic: str, payload: bytes, retain: bool) -> Callable[[float], bool]:
        if not self._connected:
            return _lost  # published while offline: lost, and the caller learns it
        self.counters.up(len(payload))
        self.broker.publish(self.client_id, topic, payload, retain)
        return _acked


# ----------------------------------------------------------------------------- MQTT


class MqttTransport(Transport):
    """paho-mqtt 2.x with a persistent session, reconnect with backoff and byte counters."""

    def __init__(
        self,
        url: str,
        client_id: str,
        *,
        username: str | None = None,
        password: str | None = None,
        tls: TlsOptions | None = None,
        will: tuple[str, bytes, bool] | None = None,
        keepalive: int = 15,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 10.0,
        clean_session: bool = False,
        **kwargs: Any,
    ) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        super().__init__(client_id, **kwargs)
        host, port, url_tls, url_user, url_password = parse_broker_url(url)
        self.host, self.port = host, port
        self.url = url
        self._mqtt = mqtt
        self._connected = False
        self._connected_event = threading.Event()
        self._refused: str | None = None
        # a connect attempt that failed below MQTT (TCP, TLS): connect() asks connect_probe why
        self._attempt_failed = threading.Event()
        self._ever_connected = False
        self._tls = (tls or TlsOptions()) if (tls is not None or url_tls) else None
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=mqtt.MQTTv311,
            manual_ack=self.manual_ack,
        )
        client.max_queued_messages_set(0)  # unlimited: queue while disconnected
        client.max_inflight_messages_set(100)
        user = username or url_user
        if user is not None:
            client.username_pw_set(user, password if password is not None else url_password)
        if tls is not None or url_tls:
            import ssl

            t = tls or TlsOptions()
            client.tls_set(
                ca_certs=t.ca_certs,
                certfile=t.certfile,
                keyfile=t.keyfile,
                cert_reqs=ssl.CERT_REQUIRED,
            )
            client.tls_insecure_set(t.insecure)
        if will is not None:
            client.will_set(will[0], will[1], qos=protocol.QOS, retain=will[2])
        client.reconnect_delay_set(
            min_delay=max(1, int(reconnect_min_s)), max_delay=max(1, int(reconnect_max_s))
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_message = self._on_message
        self.keepalive = keepalive
        self.client = client
        self._started = False

    @property
    def connected(self) -> bool:
        return self._connected

    def connect(self, timeout: float = 10.0) -> None:
        """Connect (bounded by `timeout`); afterwards paho's thread reconnects on its own."""
        if not self._started:
            try:
                self.client.connect_async(self.host, self.port, keepalive=self.keepalive)
            except (OSError, ValueError) as exc:
                raise TransportError(f"cannot reach broker {self.url}: {exc}") from None
            self.client.loop_start()
            self._started = True
        deadline = time.monotonic() + timeout
        why = None
        while time.monotonic() < deadline:
            if self._connected_event.wait(0.1):
                return
            if self._refused:
                self.close()
                raise TransportError(f"broker {self.url} refused {self.client_id}: {self._refused}")
            if self._attempt_failed.is_set():
                self._attempt_failed.clear()
                why = self._diagnose(min(3.0, max(0.5, deadline - time.monotonic())))
                if why is not None and why.certain:  # a setting: retrying cannot help
                    self.close()
                    raise TransportError(f"cannot connect to broker {self.url}: {why.message}")
        self.close()
        raise TransportError(f"broker {self.url} not reachable within {timeout:.0f}s"
                             + (f" ({why.message})" if why is not None else ""))

    def _diagnose(self, timeout_s: float) -> Any:
        from fedclip_edge.broker.connect_probe import diagnose

        t = self._tls
        return diagnose(
            self.host, self.port, t is not None, ca_certs=t.ca_certs if t else None,
            certfile=t.certfile if t else None, keyfile=t.keyfile if t else None,
            insecure=bool(t and t.insecure), timeout_s=timeout_s,
        )

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        self._attempt_failed.set()

    def close(self) -> None:
        """Clean disconnect: the will is NOT sent (publish an offline status before this)."""
        with self._room:
            self._closing = True
            self._room.notify_all()
        if self._started:
            try:
                self.client.disconnect()
            finally:
                self.client.loop_stop()
                self._started = False
        self._connected = False

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            self._refused = str(rc)
            if "not authorized" in str(rc).lower() or "bad user" in str(rc).lower():
                client.disconnect()  # do not hammer the broker with refused credentials
            return
        self._refused = None
        self._subscribe_many(list(self._filters))
        self._ever_connected = True
        self._connected = True
        self.epoch += 1
        self._connected_event.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self._connected = False
        if not self._ever_connected:  # closed before any CONNACK: e.g. a TLS port spoken plain
            self._attempt_failed.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        token = (msg.mid, msg.qos) if self.manual_ack and msg.qos > 0 else None
        self._on_raw(msg.topic, msg.payload, bool(msg.retain), token)

    def _send_ack(self, token: Any) -> None:
        mid, qos = token
        self.client.ack(mid, qos)

    def _subscribe_raw(self, pattern: str) -> None:
        self.client.subscribe(pattern, qos=protocol.QOS)

    def _subscribe_many(self, patterns: list[str]) -> None:
        for i in range(0, len(patterns), FILTERS_PER_PACKET):
            self.client.subscribe([(p, protocol.QOS) for p in patterns[i:i + FILTERS_PER_PACKET]])

    def _unsubscribe_many(self, patterns: list[str]) -> None:
        for i in range(0, len(patterns), FILTERS_PER_PACKET):
            self.client.unsubscribe(patterns[i:i + FILTERS_PER_PACKET])

    def _send(self, topic: str, payload: bytes, retain: bool) -> Callable[[float], bool]:
        info = self.client.publish(topic, payload, qos=protocol.QOS, retain=retain)
        if info.rc == self._mqtt.MQTT_ERR_QUEUE_SIZE:
            raise TransportError(f"publish to {topic} refused: paho's queue is full")
        self.counters.up(len(payload))

        def wait(timeout: float) -> bool:
            # Not wait_for_publish() nor is_published(): both raise when the message was
            # queued while offline (rc NO_CONN), although paho sends it after reconnecting and
            # the PUBACK sets _published either way (paho 2.0-2.2).
            deadline = time.monotonic() + timeout
            with info._condition:
                while not info._published and time.monotonic() < deadline:
                    info._condition.wait(min(0.1, max(0.0, deadline - time.monotonic())))
                return bool(info._published)

        return wait
