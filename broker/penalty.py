"""Per-id subscriptions and the penalty box: a flood stays at the broker, not on our connection.

Why: the per-sender rate limit (broker/ratelimit.py) drops a flood before decoding, but every
flood message still crosses the broker and the aggregator's one MQTT connection, in order, so
honest updates waited behind the backlog (a 30 s flood: slowest round 28 s against 0.41 s
quiet; docs/reliability.md "The flood, measured"). Two things keep it at the broker instead:

- `id_filters`: a signed job subscribes to the topics of its registered ids (device keys and
  site keys) instead of `update/+` and `status/+`, so the broker routes nothing of an
  unregistered id to the aggregator at all. Unsigned jobs keep the wildcards (no registry).
- `PenaltyBox`: a registered id that trips its rate limit is unsubscribed at the broker for a
  penalty window (10 s, doubled while it keeps tripping, at most 320 s), then subscribed again
  (the broker sends its retained status back) on probation: 20 messages, not the whole burst,
  before its limit trips again. What it publishes meanwhile is its own loss.
  mosquitto (2.0.11, checked) still delivers what it had queued for the aggregator before the
  UNSUBSCRIBE (up to `max_inflight_messages` + `max_queued_messages`): those are dropped here
  before decoding, acknowledged and counted (`penalized`).

Each penalty is one log line when it starts and one when it ends (with its drops).
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from fedclip_edge.broker import protocol as P
from fedclip_edge.broker.ratelimit import sender_of

DEFAULT_PENALTY_S = 10.0
MAX_PENALTY_S = 320.0
# a sender back from a penalty has this many messages before its rate limit trips again (an
# honest device's retained hello and its update are 2-3): a flood that goes on is cut after a
# few messages, not after a whole burst (500) decoded as garbage by the aggregator
PROBATION_MESSAGES = 20.0


def id_filters(job: str, ids: Iterable[str]) -> list[str]:
    """The topics the aggregator hears from `ids`: each one's update and status topic."""
    out: list[str] = []
    for i in sorted(set(ids)):
        out += [P.update_topic(job, i), P.status_topic(job, i)]
    return out


def _own(pattern: str, who: str) -> bool:
    """A filter that names `who` itself (`.../update/<who>`), not a wildcard."""
    parts = pattern.split("/")
    return len(parts) >= 2 and parts[-1] == who and parts[-2] in ("update", "status")


class PenaltyBox:
    """Unsubscribes a sender over its rate limit for a window; `tick` subscribes it again.

    `tripped` runs on the transport's receiving thread, `tick` on the consumer's (from `recv`),
    `holds` on the receiving thread for every message (one dict lookup while nobody is held).
    A sender the transport hears only through a wildcard cannot be unsubscribed alone: it is
    left to the rate limit."""

    def __init__(
        self,
        *,
        penalty_s: float = DEFAULT_PENALTY_S,
        max_penalty_s: float = MAX_PENALTY_S,
        probation_messages: float = PROBATION_MESSAGES,
        log: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.penalty_s, self.max_penalty_s = penalty_s, max(penalty_s, max_penalty_s)
        self.probation_messages = probation_messages
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.clock = clock
        self.penalties: Counter[str] = Counter()  # per sender, since start
        self.dropped: Counter[str] = Counter()  # messages dropped while held, per sender
        self._until: dict[str, float] = {}  # held sender -> when its window ends
        self._held: dict[str, tuple[list[str], float, int]] = {}  # filters, window, drops before
        self._strikes: dict[str, tuple[int, float]] = {}  # penalties in a row, last one's end
        self._resubscribing = 0
        self._new: list[str] = []  # newly held senders, for the consumer (`take_new`)
        self._lock = threading.RLock()  # tick's subscribe may deliver (in memory) and trip

    @property
    def held(self) -> frozenset[str]:
        return frozenset(self._until)

    def holds(self, topic: str) -> bool:
        """True (and counted) for a message of a sender in its penalty window."""
        if not self._until:
            return False
        who = sender_of(topic)
        if who not in self._until:
            return False
        with self._lock:
            self.dropped[who] += 1
        return True

    def tripped(self, transport: Any, topic: str) -> None:
        """`topic`'s sender went over its rate limit: unsubscribe its own topics a while."""
        who = sender_of(topic)
        now = self.clock()
        with self._lock:
            if who in self._until:
                return
            filters = [f for f in list(transport._filters) if _own(f, who)]
            if not filters:
                return  # heard through a wildcard only (an unsigned job): the rate limit's
            n, last_end = self._strikes.get(who, (0, -math.inf))
            n = n + 1 if now - last_end <= self.max_penalty_s else 1  # still at it: doubled
            window = min(self.max_penalty_s, self.penalty_s * 2 ** (n - 1))
            self._until[who] = now + window
            self._held[who] = (filters, window, self.dropped[who])
            self._strikes[who] = (n, now + window)
            self._new.append(who)
            self.penalties[who] += 1
        transport.unsubscribe(*filters)
        self.log(f"penalty: {who} went over its rate limit: unsubscribed at the broker for "
                 f"{window:g}s (penalty {n} in a row); what it publishes meanwhile is dropped")

    def tick(self, transport: Any) -> None:
        """Subscribe again every sender whose window is over (its retained status comes back)."""
        if not self._until and not self._resubscribing:
            return
        now = self.clock()
        # under the lock, and `_resubscribing` set before the sender leaves `_until`: a second
        # thread's tick returns only once the SUBSCRIBE is queued (a caller that publishes
        # next can count on the broker having it first)
        with self._lock:
            for who in [w for w, t in self._until.items() if t <= now]:
                self._resubscribing += 1
                del self._until[who]
                filters, window, before = self._held.pop(who)
                limit = getattr(transport, "rate_limit", None)
                if limit is not None:  # before the SUBSCRIBE: its first messages count
                    limit.probation(who, self.probation_messages)
                transport.subscribe(*filters)
                self._resubscribing -= 1
                self.log(f"penalty: {who} subscribed again after {window:g}s "
                         f"({self.dropped[who] - before} of its messages, queued at the broker "
                         "before the unsubscribe, dropped meanwhile)")

    def take_new(self) -> list[str]:
        """The senders held since the last call (the aggregator marks them offline)."""
        if not self._new:
            return []
        with self._lock:
            new, self._new = self._new, []
        return new
