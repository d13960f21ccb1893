"""Per-sender rate limits on what a transport receives, so a flood costs its sender only.

Why: the broker's ACL ties a device's topics to its credentials (`fedclip/JOB/update/<id>`,
`fedclip/JOB/status/<id>`), so the topic names who sent a message. Before this, a 30 s garbage
flood on one device's update topic filled the aggregator's inbox: honest updates behind it
were dropped as `inbox_full` (acknowledged, never logged) and rounds took 38-47 s instead of
milliseconds. Now each sender has a token bucket (messages and bytes); a message beyond it is
dropped on the receiving thread before any decoding, acknowledged (the broker must not send it
again), counted per sender, and the drops are logged as one summary line per interval. Honest
devices send a few messages per round and never come near the limits.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

# An honest device sends one update (a few chunks at most) and a few statuses per round: far
# below these, which still cut a flood to a trickle.
DEFAULT_MESSAGES_PER_S = 50.0
DEFAULT_MESSAGE_BURST = 500.0
DEFAULT_BYTES_PER_S = 32.0 * 2**20
DEFAULT_BYTE_BURST = 256.0 * 2**20
DEFAULT_REPORT_S = 10.0


def sender_of(topic: str) -> str:
    """The client id a topic belongs to (`fedclip/JOB/KIND/ID`), else the topic itself."""
    parts = topic.split("/")
    return parts[3] if len(parts) == 4 and parts[3] else topic


@dataclass
class _Bucket:
    messages: float
    bytes: float
    at: float


class SenderRateLimit:
    """Token buckets per sender; `allow(topic, n)` is False for a message over its sender's
    limit (the caller drops it, acknowledged). Thread-safe; `report()` logs the drops since the
    last report as one line, at most once per `report_s`."""

    def __init__(
        self,
        *,
        messages_per_s: float = DEFAULT_MESSAGES_PER_S,
        message_burst: float = DEFAULT_MESSAGE_BURST,
        bytes_per_s: float = DEFAULT_BYTES_PER_S,
        byte_burst: float = DEFAULT_BYTE_BURST,
        report_s: float = DEFAULT_REPORT_S,
        log: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.messages_per_s, self.message_burst = messages_per_s, message_burst
        self.bytes_per_s, self.byte_burst = bytes_per_s, byte_burst
        self.report_s = report_s
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.clock = clock
        self.dropped: Counter[str] = Counter()  # per sender, since start
        self.dropped_bytes = 0
        self._since: Counter[str] = Counter()  # per sender, since the last report
        self._since_bytes = 0
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()
        self._last_report = clock()

    def allow(self, topic: str, nbytes: int) -> bool:
        who = sender_of(topic)
        now = self.clock()
        with self._lock:
            b = self._buckets.get(who)
            if b is None:
                b = self._buckets[who] = _Bucket(self.message_burst, self.byte_burst, now)
            dt = max(0.0, now - b.at)
            b.at = now
            b.messages = min(self.message_burst, b.messages + dt * self.messages_per_s)
            b.bytes = min(self.byte_burst, b.bytes + dt * self.bytes_per_s)
            if b.messages >= 1.0 and (b.bytes >= nbytes or nbytes > self.byte_burst):
                b.messages -= 1.0
                b.bytes -= min(nbytes, b.bytes)
                ok = True
            else:
                ok = False
                self.dropped[who] += 1
                self._since[who] += 1
                self.dropped_bytes += nbytes
                self._since_bytes += nbytes
        self.report()
        return ok

    def probation(self, who: str, messages: float) -> None:
        """`who` starts again with at most `messages` tokens, refilling from now: a sender back
        from a penalty (broker/penalty.py) that still floods trips after a few messages, not
        after a whole burst decoded as garbage."""
        now = self.clock()
        with self._lock:
            b = self._buckets.get(who)
            if b is not None:
                b.messages, b.at = min(self.message_burst, messages), now

    def report(self, force: bool = False) -> str | None:
        """One line for the drops since the last report (none: nothing logged)."""
        now = self.clock()
        with self._lock:
            if not self._since or (not force and now - self._last_report < self.report_s):
                return None
            span = now - self._last_report
            since, nbytes = self._since, self._since_bytes
            self._since, self._since_bytes, self._last_report = Counter(), 0, now
        top = ", ".join(f"{who} {n}" for who, n in since.most_common(5))
        more = f" and {len(since) - 5} more senders" if len(since) > 5 else ""
        line = (f"rate limit: dropped {sum(since.values())} messages ({nbytes} bytes) in the "
                f"last {span:.0f}s from senders over their limit: {top}{more}")
        self.log(line)
        return line
