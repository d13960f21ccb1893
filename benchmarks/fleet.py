"""The simulated fleet of `bench aggregator`: many devices spoken for by a few connections.

Why: loading the aggregator with N devices needs N devices' topics, envelopes and frames, not N
TCP connections. Each update is precomputed once (valid `Update` envelopes near the global, in
antithetic pairs so their mean is known exactly) and published by a small pool of paho clients
with a bounded window of unacknowledged QoS 1 messages.
"""

from __future__ import annotations

import contextlib
import struct
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any

from fedclip_edge.errors import FedClipError

_PREFIX = struct.Struct("<4sBI")  # fedclip_edge.wire's frame prefix: magic, version, H
_MAGIC = b"FCLP"
PAIR_VARIANTS = 8  # distinct random deltas (each used as +d and -d)
DELTA_SCALE = 0.01
SAMPLES = 24  # train samples each simulated device reports


def initial_global(dim: int, seed: int) -> dict[str, Any]:
    """The aggregator's round-1 adapter: same seed, same construction (Aggregator._make_initial)."""
    import torch

    from fedclip_edge.adapter import AttentionAdapter

    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in AttentionAdapter(dim).state_dict().items()}


class FleetUpdates:
    """The simulated fleet's update envelopes, built on demand: `fleet[i]` is device i's.

    Why: precomputing N envelopes of a dim-512 adapter holds N x 2.1 MB (21 GB at N = 10,000).
    Device 2k gets global + d_k, device 2k+1 global - d_k (d_k one of PAIR_VARIANTS random
    deltas from the seed); an unpaired last device gets the global itself. Only those few
    variants are held (their safetensors payload once each); an envelope is the variant's
    payload under a frame header naming the device, hashed, in an `Update` - the same bytes
    `encode_frame` and `Update.encode` give (tested). The exact float64 mean of all N frames is
    known from the variants' counts (`mean`), whoever publishes them.
    """

    def __init__(self, n: int, dim: int, seed: int, job: str, rnd: int = 1) -> None:
        import torch

        from fedclip_edge.wire import encode_frame

        self.n, self.job, self.rnd = n, job, rnd
        self.global_state = initial_global(dim, seed)
        g = self.global_state
        gen = torch.Generator().manual_seed(seed + 1)
        deltas = [
            {k: torch.randn(v.shape, generator=gen) * DELTA_SCALE for k, v in g.items()}
            for _ in range(max(1, min(PAIR_VARIANTS, n // 2)))
        ]
        self._n_deltas = len(deltas)
        variants: dict[tuple[int, int], dict[str, Any]] = {}
        counts: dict[tuple[int, int], int] = {}
        for i in range(n):
            key = self._key(i)
            if key not in variants:
                k, sign = key
                variants[key] = {
                    name: (g[name] + sign * deltas[k][name] if sign else g[name])
                    .float().contiguous().clone()
                    for name in g
                }
            counts[key] = counts.get(key, 0) + 1
        # each variant's frame once; per device only its header (client id) and hash change
        self._frames = {key: _split_frame(encode_frame(v, job=job, round=rnd, client="x"))
                        for key, v in variants.items()}
        self.mean = {
            name: sum(c * variants[key][name].double() for key, c in counts.items()) / n
            for name in g
        }

    def _key(self, i: int) -> tuple[int, int]:
        k = (i // 2) % self._n_deltas
        sign = 0 if (i == self.n - 1 and self.n % 2) else (1 if i % 2 == 0 else -1)
        return (k if sign else -1, sign)

    @property
    def distinct(self) -> int:
        """How many distinct adapters the fleet's frames carry."""
        return len(self._frames)

    @staticmethod
    def device_id(i: int) -> str:
        return f"sim{i:05d}"

    @property
    def ids(self) -> list[str]:
        return [self.device_id(i) for i in range(self.n)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> bytes:
        """Device i's update envelope (built now: ~ a hash and two copies of the frame)."""
        import hashlib
        import json

        from fedclip_edge.broker import protocol as P

        if not 0 <= i < self.n:
            raise IndexError(i)
        version, header, payload = self._frames[self._key(i)]
        cid = self.device_id(i)
        text = json.dumps({**header, "client": cid}, sort_keys=True,
                          separators=(",", ":")).encode("utf-8")
        body = b"".join((_PREFIX.pack(_MAGIC, version, len(text)), text, payload))
        frame = body + hashlib.sha256(body).digest()
        metrics = {"loss": 0.0, "train_s": 0.0, "backend": "simulated"}
        return P.Update(self.job, self.rnd, cid, SAMPLES, metrics, frame).encode()


def _split_frame(frame: bytes) -> tuple[int, dict[str, Any], bytes]:
    """(version, header, payload) of an encode_frame frame."""
    import json

    _, version, hlen = _PREFIX.unpack_from(frame)
    header = json.loads(frame[_PREFIX.size : _PREFIX.size + hlen])
    return version, header, frame[_PREFIX.size + hlen : -32]


def make_updates(
    n: int, dim: int, seed: int, job: str, rnd: int = 1
) -> tuple[list[str], list[bytes], dict[str, Any], dict[str, Any]]:
    """(device ids, update envelopes, global, exact float64 mean of the frames' tensors): all
    N envelopes precomputed (the flat bench times none of their building). `FleetUpdates`
    builds them on demand instead."""
    fleet = FleetUpdates(n, dim, seed, job, rnd)
    return fleet.ids, [fleet[i] for i in range(n)], fleet.global_state, fleet.mean


class Publisher:
    """One paho connection that speaks for many simulated devices."""

    def __init__(self, url: str, name: str, window: int) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        from fedclip_edge.broker.transport import parse_broker_url

        host, port, _, user, password = parse_broker_url(url)
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv311,
            clean_session=True,
        )
        if user:
            self.client.username_pw_set(user, password)
        self.client.max_inflight_messages_set(window)
        self.window = window
        self.connected = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: self.connected.set()
        self.client.connect(host, port, keepalive=60)
        self.client.loop_start()
        if not self.connected.wait(10):
            self.close()
            raise FedClipError(f"simulator connection {name} got no CONNACK within 10 s")

    def publish_all(
        self, items: Iterable[tuple[str, bytes]], retain: bool, deadline: float,
        slots: list[float] | None = None,
    ) -> int:
        """QoS 1 publishes with at most `window` unacknowledged; returns how many were acked.
        `items` may be a generator (envelopes built as they go out: `FleetUpdates`).
        `slots`: monotonic times before which each item must not start (rate cap)."""
        infos: list[Any] = []
        acked = 0
        for j, (topic, payload) in enumerate(items):
            if slots is not None and (wait := slots[j] - time.monotonic()) > 0:
                time.sleep(wait)
            if len(infos) - acked >= self.window:
                acked += self._wait(infos[acked], deadline)
            infos.append(self.client.publish(topic, payload, qos=1, retain=retain))
        for info in infos[acked:]:
            acked += self._wait(info, deadline)
        return acked

    @staticmethod
    def _wait(info: Any, deadline: float) -> int:
        with contextlib.suppress(RuntimeError, ValueError):
            info.wait_for_publish(max(0.01, deadline - time.monotonic()))
        return 1 if info.is_published() else 0

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()


def global_listener(url: str, topic: str, got: dict[str, Any], event: threading.Event) -> Any:
    """A paho client that keeps the first round-1 global (time received, payload)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from fedclip_edge.broker import protocol as P
    from fedclip_edge.broker.transport import parse_broker_url

    host, port, _, user, password = parse_broker_url(url)
    c = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"bench-global-{uuid.uuid4().hex[:6]}",
        protocol=mqtt.MQTTv311, clean_session=True,
    )
    if user:
        c.username_pw_set(user, password)

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        if event.is_set() or not msg.payload:
            return
        try:
            g = P.decode_message(msg.payload)
        except P.MessageRejected:
            return
        if isinstance(g, P.GlobalModel) and g.round == 1:
            got.update({"t": time.monotonic(), "global": g, "bytes": len(msg.payload)})
            event.set()

    c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(topic, qos=1)
    c.on_message = on_message
    c.connect(host, port, keepalive=60)
    c.loop_start()
    return c
