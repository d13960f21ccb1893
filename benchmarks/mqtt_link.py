"""How `bench fedavg` moves a model between the server and a client: in process or over MQTT.

Why: the bytes and seconds of an exchange are half of what the benchmark compares, so both
methods go through the same path. In process, an exchange is a real wire frame encoded and
decoded. Over MQTT (`MqttLink`) it is the project's own protocol through a real broker: the
server publishes a `GlobalModel` envelope on `fedclip/<job>/global`, the client answers with an
`Update` envelope on `fedclip/<job>/update/<client>`, QoS 1, chunked by `MqttTransport` above
`max_payload` and reassembled on the other side. Nothing of the channel is the benchmark's own.
"""

from __future__ import annotations

import contextlib
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedclip_edge.broker import protocol as P
from fedclip_edge.codecs import DEFAULT_TOPK_FRACTION, ErrorFeedback
from fedclip_edge.errors import TransportError
from fedclip_edge.global_codec import GlobalDelta, apply_delta
from fedclip_edge.wire import decode_frame, decode_update, encode_frame, encode_update

PROBE_ROUND = 0  # benchmark rounds start at 1: round 0 messages only prove the routes work


@dataclass
class UpCodec:
    """An update codec for the uplink (fedclip_edge.codecs): `base` is the round's global
    (delta codecs encode against it, the server decodes against it), `feedback` the client's
    error-feedback residual, kept by the caller across rounds."""

    codec: str
    base: dict[str, torch.Tensor]
    feedback: ErrorFeedback | None = None
    topk_fraction: float = DEFAULT_TOPK_FRACTION


@dataclass
class DownDelta:
    """A compressed global for the downlink (fedclip_edge.global_codec): the server's frame and
    the global the client holds, which it applies the frame to (and checks the digest)."""

    delta: GlobalDelta
    base: dict[str, torch.Tensor]


def encode_any(state: dict[str, torch.Tensor], *, job: str, rnd: int, client: str, dtype: str,
               up: UpCodec | None = None) -> bytes:
    """A version-1 frame of `dtype`, or with `up` a version-2 frame of its codec."""
    if up is None:
        return encode_frame(state, job=job, round=rnd, client=client, dtype=dtype)
    return encode_update(state, up.base, codec=up.codec, job=job, round=rnd, client=client,
                         feedback=up.feedback, topk_fraction=up.topk_fraction)


def decode_any(frame: bytes, state: dict[str, torch.Tensor],
               up: UpCodec | None = None) -> dict[str, torch.Tensor]:
    """What the receiver rebuilds (the full adapter; deltas added to `up.base`)."""
    if up is None:
        return decode_frame(
            frame, expected={k: tuple(v.shape) for k, v in state.items()}, max_bytes=len(frame)
        ).tensors
    return decode_update(frame, up.base, max_bytes=len(frame)).tensors


def exchange_inproc(
    state: dict[str, torch.Tensor], *, job: str, rnd: int, client: str, dtype: str,
    up: UpCodec | None = None, gdown: DownDelta | None = None,
) -> tuple[dict[str, torch.Tensor], int, float]:
    """Encode and decode one frame: (tensors as received, bytes on the wire, seconds). With
    `gdown` the server's delta frame (encoded once, at the round's close) is applied."""
    t0 = time.perf_counter()
    if gdown is not None:
        out = apply_delta(gdown.delta.frame, gdown.base, gdown.delta.digest)
        return out, len(gdown.delta.frame), time.perf_counter() - t0
    frame = encode_any(state, job=job, rnd=rnd, client=client, dtype=dtype, up=up)
    out = decode_any(frame, state, up)
    return out, len(frame), time.perf_counter() - t0


class MqttLink:
    """Both ends of every exchange over a real broker, in the project's protocol.

    The server end plays the aggregator (publishes globals, subscribes to updates); one device
    end speaks for every client in turn (the benchmark trains them one after another, so a
    global published for client c is received by c alone, as a device would receive the
    retained one). Payload bytes are counted by the sender's transport, chunk envelopes
    included, and checked against what the receiver counted."""

    def __init__(
        self, url: str, clients: list[str], *, max_payload: int, timeout_s: float = 600.0
    ) -> None:
        from fedclip_edge.broker.transport import MqttTransport

        self.timeout_s = timeout_s
        self.job = f"benchfedavg-{uuid.uuid4().hex[:8]}"
        self.topic_id = {c: re.sub(r"[^A-Za-z0-9_.\-]", "_", c)[:64] for c in clients}
        self.max_message = max(P.MAX_MESSAGE_BYTES, 2 * max_payload)
        kw = {"max_payload": max_payload, "max_message_bytes": self.max_message,
              "clean_session": True}
        self.server = MqttTransport(url, f"{self.job}-server", **kw)
        self.server.subscribe(P.update_filter(self.job))
        self.device = MqttTransport(url, f"{self.job}-devices", **kw)
        self.device.subscribe(P.global_topic(self.job))
        try:
            for t in (self.server, self.device):
                t.connect(10.0)
            self._probe()
        except BaseException:
            self.close()
            raise

    def _message(self, tensors: dict[str, torch.Tensor], rnd: int, client: str | None,
                 dtype: str, samples: int = 0, up: UpCodec | None = None,
                 gdown: DownDelta | None = None) -> tuple[str, bytes]:
        """(topic, payload): a global for the device end, or client's update for the server."""
        if gdown is not None:
            return P.global_topic(self.job), P.GlobalModel(
                self.job, rnd, gdown.delta.frame, delta=gdown.delta.fields()).encode()
        if client is None:
            frame = encode_frame(tensors, job=self.job, round=rnd, client=P.AGGREGATOR_ID,
                                 dtype=dtype)
            return P.global_topic(self.job), P.GlobalModel(self.job, rnd, frame).encode()
        cid = self.topic_id[client]
        frame = encode_any(tensors, job=self.job, rnd=rnd, client=cid, dtype=dtype, up=up)
        return P.update_topic(self.job, cid), P.Update(self.job, rnd, cid, samples, {},
                                                       frame).encode()

    def _probe(self) -> None:
        """Subscriptions are asynchronous: send round-0 messages on every route until they
        arrive, then drop the duplicates."""
        probe = {"probe": torch.zeros(1)}
        routes = [(self.server, self.device, *self._message(probe, PROBE_ROUND, None, "float32"))]
        routes += [
            (self.device, self.server, *self._message(probe, PROBE_ROUND, c, "float32"))
            for c in self.topic_id
        ]
        deadline = time.monotonic() + 15.0
        for sender, receiver, topic, payload in routes:
            while True:
                if time.monotonic() > deadline:
                    raise TransportError(f"no probe came through on {topic} within 15 s")
                sender.publish(topic, payload).wait(2.0)
                msg = receiver.recv(0.5)
                if msg is not None and msg.topic == topic and msg.payload == payload:
                    break
        for t in (self.server, self.device):
            while t.recv(0.05) is not None:
                pass

    def _receive(self, receiver: Any, topic: str, rnd: int, what: str) -> tuple[Any, Any]:
        """The next message of round `rnd` on `topic` (probes and strays skipped), decoded."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            msg = receiver.recv(max(0.0, deadline - time.monotonic()))
            if msg is None:
                raise TransportError(
                    f"{what} did not arrive within {self.timeout_s:g} s "
                    f"(rejected: {dict(receiver.rejected)})"
                )
            if msg.topic != topic:
                continue
            try:
                decoded = P.decode_message(msg.payload, self.max_message)
            except P.MessageRejected as exc:
                raise TransportError(f"{what}: {exc.message}") from None
            if decoded.round == rnd:
                return msg, decoded

    def exchange(
        self,
        state: dict[str, torch.Tensor],
        *,
        rnd: int,
        client: str,
        dtype: str,
        down: bool,
        samples: int = 0,
        up: UpCodec | None = None,
        gdown: DownDelta | None = None,
    ) -> tuple[dict[str, torch.Tensor], int, float, int]:
        """Encode, publish (chunked), receive, reassemble, decode: (tensors, payload bytes on
        the wire incl. chunk envelopes, seconds, MQTT messages)."""
        sender, receiver = (self.server, self.device) if down else (self.device, self.server)
        t0 = time.perf_counter()
        topic, payload = self._message(state, rnd, None if down else client, dtype, samples,
                                       None if down else up, gdown if down else None)
        before = sender.counters.snapshot()
        delivery = sender.publish(topic, payload)
        what = f"{'global' if down else 'update'} of {len(payload)} B for {client}"
        msg, decoded = self._receive(receiver, topic, rnd, what)
        if down and gdown is not None:
            out = apply_delta(decoded.frame, gdown.base, decoded.delta["digest"])
        else:
            out = decode_any(decoded.frame, state, None if down else up)
        seconds = time.perf_counter() - t0
        if not delivery.wait(max(1.0, self.timeout_s)):
            raise TransportError(f"publish on {topic} not acknowledged")
        after = sender.counters.snapshot()
        sent = after["bytes_up"] - before["bytes_up"]
        if sent != msg.wire_bytes:
            raise TransportError(f"sent {sent} B but the receiver counted {msg.wire_bytes} B")
        return out, sent, seconds, after["messages_up"] - before["messages_up"]

    def close(self) -> None:
        for t in (self.server, self.device):
            with contextlib.suppress(Exception):
                t.close()


@contextlib.contextmanager
def open_link(
    transport: str, broker: str | None, clients: list[str], max_payload: int, workdir: Path
) -> Iterator[tuple[MqttLink | None, dict[str, Any]]]:
    """None for inproc; else an MqttLink over `broker` or a private broker on loopback."""
    if transport == "inproc":
        yield None, {}
        return
    from fedclip_edge.benchmarks.brokers import broker_for_bench

    with broker_for_bench(broker, workdir) as b:
        link = MqttLink(b["url"], clients, max_payload=max_payload)
        try:
            yield link, {k: v for k, v in b.items() if k != "pid"}
        finally:
            link.close()


def xfer(
    link: MqttLink | None,
    state: dict[str, torch.Tensor],
    *,
    rnd: int,
    client: str,
    dtype: str,
    down: bool,
    samples: int = 0,
    up: UpCodec | None = None,
    gdown: DownDelta | None = None,
) -> tuple[dict[str, torch.Tensor], int, float, int]:
    """One exchange: (tensors as received, bytes, seconds, messages), in-process or via MQTT.
    `up`: the uplink's codec (ignored for a global going down); `gdown`: a compressed global
    (ignored for an update going up)."""
    up = None if down else up
    gdown = gdown if down else None
    if link is None:
        tensors, nbytes, secs = exchange_inproc(
            state, job="bench", rnd=rnd, client="server" if down else client, dtype=dtype, up=up,
            gdown=gdown,
        )
        return tensors, nbytes, secs, 1
    return link.exchange(state, rnd=rnd, client=client, dtype=dtype, down=down, samples=samples,
                         up=up, gdown=gdown)
