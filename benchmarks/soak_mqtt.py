"""The soak's two plain MQTT clients: the recorder of every update the broker carried, and the
injector of what devices never send (garbage, replays, floods). Apart from benchmarks/soak.py so
the secure soak (soak_secure.py) uses the same ones."""

from __future__ import annotations

import contextlib
import random
import threading
import time
from typing import Any

from fedclip_edge.broker import protocol as P
from fedclip_edge.errors import FedClipError


class Recorder:
    """Every payload the broker carries on the job's update topics (a persistent session, so a
    restarted broker still delivers what it queued for it)."""

    def __init__(self, port: int, job: str) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.job = job
        self.messages: list[tuple[float, str, bytes]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"soak-recorder-{job}",
                                  protocol=mqtt.MQTTv311, clean_session=False)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(1, 2)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not self._subscribed.wait(20):
            raise FedClipError("the soak's recorder could not subscribe to the broker")

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if not rc.is_failure:
            client.subscribe(P.update_filter(self.job), qos=1)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._lock:
            self.messages.append((time.monotonic(), msg.topic, bytes(msg.payload)))

    def snapshot(self) -> list[tuple[float, str, bytes]]:
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()


class Injector:
    """A plain paho client that publishes what the devices never would (garbage, replays).

    A fault right after a broker restart must still land: paho reconnects on its own but with a
    growing back-off, and a publish made while it is away is only queued. So the injector
    reconnects every 1-2 s and each publish first waits (bounded) for a live connection, then
    for the broker's PUBACK."""

    CONNECT_WAIT_S = 60.0
    ACK_WAIT_S = 60.0

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self._connected = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="soak-chaos",
                                  protocol=mqtt.MQTTv311)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *a: self._connected.clear()
        self.client.reconnect_delay_set(1, 2)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if not rc.is_failure:
            self._connected.set()

    def publish(self, topic: str, payload: bytes) -> bool:
        """Whether the broker acknowledged it (QoS 1)."""
        if not self._connected.wait(self.CONNECT_WAIT_S):
            return False
        info = self.client.publish(topic, payload, qos=1)
        with contextlib.suppress(Exception):
            info.wait_for_publish(self.ACK_WAIT_S)
        try:
            return bool(info.is_published())
        except (RuntimeError, ValueError):  # the connection dropped before the PUBACK
            return False

    def flood(self, topic: str, n: int, rng: random.Random) -> int:
        """`n` garbage messages (QoS 1, as fast as paho takes them); how many were acknowledged
        by the broker (bounded: it waits at most 30 s for the last)."""
        if not self._connected.wait(self.CONNECT_WAIT_S):
            return 0
        infos = [self.client.publish(topic, b"FCMQ\x01" + rng.randbytes(64), qos=1)
                 for _ in range(n)]
        deadline = time.monotonic() + 30
        for info in infos:
            with contextlib.suppress(Exception):
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
        acked = 0
        for info in infos:
            with contextlib.suppress(RuntimeError, ValueError):
                acked += bool(info.is_published())
        return acked

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()
