"""Topics (prefix `fedclip`, QoS 1; the broker ACL is written against exactly these):

- `fedclip/<job>/global`           aggregator, retained: the current global adapter
- `fedclip/<job>/control`          aggregator, retained: job state (running / done)
- `fedclip/<job>/update/<client>`  one device: its update for a round
- `fedclip/<job>/status/<client>`  one device, retained: hello/status; its last will "offline"

Job and client ids become topic levels, so they are checked here (`check_id`).
"""

from __future__ import annotations

import re

from fedclip_edge.broker.envelope import MessageRejected
from fedclip_edge.errors import ConfigError

PREFIX = "fedclip"
QOS = 1
AGGREGATOR_ID = "aggregator"

_ID_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


class BadId(ConfigError, ValueError):
    """A job or client id that cannot be a topic level: a user's mistake (one `error:` line),
    still a ValueError for code that checks ids as values."""


def check_id(value: str, what: str) -> str:
    """Job and client ids become topic levels: no '/', '+', '#', no spaces, at most 64 chars."""
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise BadId(f"{what} {value!r} must be 1-64 characters of A-Z a-z 0-9 _ . -")
    return value


def global_topic(job: str) -> str:
    return f"{PREFIX}/{check_id(job, 'job')}/global"


def control_topic(job: str) -> str:
    return f"{PREFIX}/{check_id(job, 'job')}/control"


def update_topic(job: str, client: str) -> str:
    return f"{PREFIX}/{check_id(job, 'job')}/update/{check_id(client, 'client id')}"


def status_topic(job: str, client: str) -> str:
    return f"{PREFIX}/{check_id(job, 'job')}/status/{check_id(client, 'client id')}"


def update_filter(job: str) -> str:
    return f"{PREFIX}/{check_id(job, 'job')}/update/+"


def status_filter(job: str) -> str:
    return f"{PREFIX}/{check_id(job, 'job')}/status/+"


def parse_topic(topic: str) -> tuple[str, str, str | None]:
    """'fedclip/J/update/C' -> (J, 'update', C); 'fedclip/J/global' -> (J, 'global', None)."""
    parts = topic.split("/")
    if len(parts) == 3 and parts[0] == PREFIX and parts[2] in ("global", "control"):
        return parts[1], parts[2], None
    if len(parts) == 4 and parts[0] == PREFIX and parts[2] in ("update", "status"):
        return parts[1], parts[2], parts[3]
    raise MessageRejected("topic", f"topic {topic!r} is not a fedclip topic")


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT filter matching with '+' (one level) and '#' (the rest)."""
    p, t = pattern.split("/"), topic.split("/")
    for i, level in enumerate(p):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(p) == len(t)
