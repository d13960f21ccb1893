"""Validate updates on a second thread while the aggregator's loop does its bookkeeping.

Why: an update's validation (envelope, sha256 of the frame, safetensors parse, finiteness) is
pure: it depends on the payload and the job's tensor shapes only. Most of it runs in code that
releases the GIL (hashlib on large buffers, numpy), so a worker thread can decode update N+1 on
the second core while the main loop adds update N (numpy, GIL released too) and acknowledges it.
The main loop still makes every decision (job, client, round, duplicate) and every count, in
arrival order; the worker only attaches its result to the message.

Memory stays bounded: a message held here is not acknowledged yet, so it still counts against
the transport's byte bound (`max_inflight_bytes`), and at most `depth` decoded messages wait.

`predecode` is what the aggregator runs on the worker (the pure part of its update handling,
`ingest.py`); `PrevalidateMixin` is the worker.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fedclip_edge.broker import protocol as P
from fedclip_edge.broker.transport import MqttTransport, Received, Transport
from fedclip_edge.rounds import OpenRound
from fedclip_edge.wire import FrameRejected


def predecode(
    msg: Received, ctx: OpenRound | None, max_update_bytes: int,
    holds: Callable[[Any], bool] | None = None,
) -> tuple[Any, Any] | None:
    """On the validation thread: (update or its exception, (round, frame or its exception) or
    None) for an update message; None for any other.

    A frame is decoded here only against the global of the round it names (`ctx`, the round
    engine's open round: delta codecs add to its global); an update for another round gets
    None and is decided, and decoded if need be, on the aggregator's loop."""
    if "/update/" not in msg.topic:
        return None
    try:
        up: Any = P.decode_message(msg.payload, max_update_bytes + 1024 * 1024)
    except P.MessageRejected as exc:
        return exc, None
    if not isinstance(up, P.Update):
        return up, None
    if ctx is None or up.round != ctx.number:
        return up, None
    if holds is not None and not holds(up):
        return up, None  # not decoded: the main loop refuses it with its reason, unread
    try:
        frame: Any = ctx.decode(up.frame, max_bytes=max_update_bytes)
    except FrameRejected as exc:
        frame = exc
    return up, (ctx.number, frame)


@dataclass(frozen=True)
class Decoded(Received):
    """A received message with what the worker made of it (a result or the exception)."""

    decoded: Any = field(default=None, compare=False, repr=False)


class PrevalidateMixin(Transport):
    """`recv()` hands out messages the worker already decoded with `set_decoder`'s function.
    Put it first in the bases of a concrete transport."""

    def __init__(self, *args: Any, depth: int = 4, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._decoder: Callable[[Received], Any] | None = None
        self._ready: queue.Queue[Received] = queue.Queue(maxsize=max(1, depth))
        self._worker: threading.Thread | None = None
        self._stop = threading.Event()

    def set_decoder(self, fn: Callable[[Received], Any] | None) -> None:
        """`fn(msg)` runs on the worker for every message; its result (or the exception it
        raised) travels with the message as `msg.decoded`. Starts the worker on first use."""
        self._decoder = fn
        if fn is not None and self._worker is None:
            self._worker = threading.Thread(target=self._work, name="prevalidate", daemon=True)
            self._worker.start()

    def _work(self) -> None:
        while not self._stop.is_set():
            msg = Transport.recv(self, 0.1)
            if msg is None:
                continue
            fn = self._decoder
            if fn is not None:
                try:
                    result: Any = fn(msg)
                except Exception as exc:  # noqa: BLE001 - handed to the main loop as is
                    result = exc
                msg = Decoded(msg.topic, msg.payload, msg.retained, msg.wire_bytes,
                              msg.transfer_s, msg.ack_token, result)
            while not self._stop.is_set():
                try:
                    self._ready.put(msg, timeout=0.1)
                    break
                except queue.Full:
                    continue

    def recv(self, timeout: float) -> Received | None:
        if self._worker is None:
            return super().recv(timeout)
        try:
            return self._ready.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None

    def close(self) -> None:
        self._stop.set()
        super().close()
        if self._worker is not None:
            self._worker.join(2)


class PrevalidatingMqttTransport(PrevalidateMixin, MqttTransport):
    """`MqttTransport` with the validation worker (the aggregator's default)."""
