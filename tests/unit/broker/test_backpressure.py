"""The transport's inbox is bounded in bytes and, with manual acknowledgements, a message is
acknowledged only when the consumer says it is done with it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from fedclip_edge.broker.transport import Received, Transport


class _Recording(Transport):
    """A transport whose broker is the test: it calls _on_raw and records acknowledgements."""

    def __init__(self, **kw: Any) -> None:
        super().__init__("t", **kw)
        self.acked: list[Any] = []

    @property
    def connected(self) -> bool:
        return True

    def connect(self, timeout: float = 10.0) -> None:
        pass

    def close(self) -> None:
        with self._room:
            self._closing = True
            self._room.notify_all()

    def _send(self, topic: str, payload: bytes, retain: bool) -> Callable[[float], bool]:
        return lambda _t: True

    def _subscribe_raw(self, pattern: str) -> None:
        pass

    def _send_ack(self, token: Any) -> None:
        self.acked.append(token)


def _deliver(t: _Recording, n: int, size: int, done: list[int]) -> threading.Thread:
    def run() -> None:
        for i in range(n):
            t._on_raw(f"fedclip/j/update/d{i}", bytes([1]) * size, False, token=i)
            done.append(i)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


def test_acknowledged_only_when_the_consumer_is_done() -> None:
    t = _Recording(manual_ack=True, max_inflight_bytes=10_000)
    t._on_raw("fedclip/j/update/a", b"x" * 100, False, token="a")
    assert t.acked == []  # queued, not acknowledged
    msg = t.recv(1.0)
    assert isinstance(msg, Received) and t.acked == []  # handed out, still not acknowledged
    assert t.inflight_bytes == 100
    t.ack(msg)
    assert t.acked == ["a"] and t.inflight_bytes == 0


def test_receiving_thread_waits_for_room_instead_of_dropping() -> None:
    t = _Recording(manual_ack=True, max_inflight_bytes=250)
    done: list[int] = []
    th = _deliver(t, 5, 100, done)
    # two messages fit (200 bytes); the third waits for room: wait until two are in
    first = t.recv(5.0)
    second = t.recv(5.0)
    assert first is not None and second is not None
    assert t.inflight_bytes <= 250
    th.join(0.3)
    assert th.is_alive() and len(done) == 2  # blocked on the third, nothing dropped
    for msg in (first, second):
        t.ack(msg)
    got = []
    for _ in range(3):
        m = t.recv(5.0)
        assert m is not None
        got.append(m)
        t.ack(m)
    th.join(5.0)
    assert not th.is_alive() and done == [0, 1, 2, 3, 4]
    assert t.acked == [0, 1, 2, 3, 4] and t.rejected.get("inbox_full", 0) == 0
    assert t.peak_inflight_bytes <= 250


def test_a_message_larger_than_the_bound_is_admitted_alone() -> None:
    t = _Recording(manual_ack=True, max_inflight_bytes=10)
    t._on_raw("fedclip/j/update/a", b"y" * 100, False, token="big")
    msg = t.recv(1.0)
    assert msg is not None and msg.payload == b"y" * 100
    t.ack(msg)
    assert t.acked == ["big"]


def test_closing_releases_a_waiting_receiver_without_acknowledging() -> None:
    t = _Recording(manual_ack=True, max_inflight_bytes=100)
    done: list[int] = []
    th = _deliver(t, 2, 100, done)
    assert t.recv(5.0) is not None  # the first is handed out, the second waits
    t.close()
    th.join(5.0)
    assert not th.is_alive()
    assert t.acked == []  # neither acknowledged: the broker delivers both again


def test_without_manual_ack_bytes_are_released_on_recv() -> None:
    t = _Recording(max_inflight_bytes=1000)
    t._on_raw("fedclip/j/status/a", b"z" * 10, False, token=None)
    assert t.inflight_bytes == 10
    assert t.recv(1.0) is not None and t.inflight_bytes == 0
    assert t.acked == []


# ----------------------------------------------------------------------------- issue 22, item 5


def test_a_full_inbox_in_messages_waits_instead_of_dropping() -> None:
    """Before: the 3rd small message found the queue full and was acknowledged and dropped
    (`inbox_full`, visible only in /metrics). Now the receiving thread waits, as for bytes."""
    t = _Recording(manual_ack=True, max_inflight_bytes=10**9, inbox_size=2)
    done: list[int] = []
    th = _deliver(t, 4, 10, done)
    th.join(0.5)
    assert th.is_alive() and done == [0, 1]  # blocked on the 3rd: the inbox holds two
    assert t.acked == []
    got = []
    while len(got) < 4:
        m = t.recv(5.0)
        assert m is not None
        got.append(m)
        t.ack(m)
    th.join(5.0)
    assert done == [0, 1, 2, 3] and t.acked == [0, 1, 2, 3]
    assert "inbox_full" not in t.rejected


def test_a_flood_costs_its_sender_only_and_is_logged_once_per_interval() -> None:
    from fedclip_edge.broker.ratelimit import SenderRateLimit

    now = [0.0]
    lines: list[str] = []
    limit = SenderRateLimit(messages_per_s=10, message_burst=20, report_s=10, log=lines.append,
                            clock=lambda: now[0])
    t = _Recording(manual_ack=True, rate_limit=limit)
    for i in range(1000):  # 1000 garbage messages from dev-evil at one instant
        t._on_raw("fedclip/j/update/dev-evil", b"g" * 8, False, token=("evil", i))
        if i % 100 == 0:  # an honest device's update in the middle of the flood
            t._on_raw("fedclip/j/update/dev-good", b"u" * 8, False, token=("good", i))
    queued = []
    while (m := t.recv(0.01)) is not None:
        queued.append(m.topic)
        t.ack(m)
    assert queued.count("fedclip/j/update/dev-good") == 10  # every honest message went through
    assert queued.count("fedclip/j/update/dev-evil") == 20  # the burst, then nothing
    assert t.rejected["rate_limited"] == 980 and limit.dropped == {"dev-evil": 980}
    # every message is acknowledged: dropped ones at once (the broker must not resend them)
    assert len(t.acked) == 1010
    assert lines == []  # the first interval has not ended
    now[0] = 10.0
    t._on_raw("fedclip/j/update/dev-evil", b"g", False, token="late")  # refilled: allowed
    assert len(lines) == 1 and lines[0].startswith(
        "rate limit: dropped 980 messages (7840 bytes) in the last 10s from senders over their "
        "limit: dev-evil 980")
    assert limit.report(force=True) is None  # nothing new: no line
