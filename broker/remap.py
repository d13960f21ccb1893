"""Topic prefix remapping in the transport: the protocol's `fedclip/...` under another prefix.

Why: a site broker bridged to the central one carries the central's topics under a prefix of
their own (mosquitto `topic PATTERN in|out QOS LOCAL_PREFIX REMOTE_PREFIX`), so that the site's
devices (`fedclip/J/...` on the site broker) and the central's job (`fedclip-up/J/...` on the
same broker) never mix. A site aggregator talks to the central through its own broker with
`--upstream-prefix fedclip-up`: everything above the transport still speaks `fedclip/...`
(protocol.py's topics); the transport rewrites topic filters and topics it publishes on the way
out and topics it receives on the way in. With the default prefix nothing changes.
"""

from __future__ import annotations

import re
from typing import Any

from fedclip_edge.broker import protocol
from fedclip_edge.broker.transport import MemoryTransport, MqttTransport, Transport
from fedclip_edge.errors import ConfigError

_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")


def check_prefix(prefix: str) -> str:
    """A prefix is one or more plain topic levels: no wildcards, no leading or trailing '/'."""
    if not isinstance(prefix, str) or not _PREFIX_RE.match(prefix) or len(prefix) > 128:
        raise ConfigError(
            f"topic prefix {prefix!r} must be topic levels of A-Z a-z 0-9 _ . - joined by '/'"
        )
    return prefix


def remap_out(topic: str, prefix: str) -> str:
    """`fedclip/rest` -> `prefix/rest` (a filter or a topic); anything else unchanged."""
    head = protocol.PREFIX + "/"
    return prefix + "/" + topic[len(head):] if topic.startswith(head) else topic


def remap_in(topic: str, prefix: str) -> str:
    """`prefix/rest` -> `fedclip/rest`; anything else unchanged (the receiver rejects it)."""
    head = prefix + "/"
    return protocol.PREFIX + "/" + topic[len(head):] if topic.startswith(head) else topic


class RemapMixin(Transport):
    """Rewrites topics between the protocol's prefix and `topic_prefix`; put it first in the
    bases of a concrete transport."""

    topic_prefix: str = protocol.PREFIX

    def __init__(self, *args: Any, topic_prefix: str = protocol.PREFIX, **kwargs: Any) -> None:
        self.topic_prefix = check_prefix(topic_prefix)
        will = kwargs.get("will")
        if will is not None:
            kwargs["will"] = (remap_out(will[0], self.topic_prefix), *will[1:])
        super().__init__(*args, **kwargs)

    def subscribe(self, *patterns: str) -> None:
        super().subscribe(*(remap_out(p, self.topic_prefix) for p in patterns))

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> Any:
        return super().publish(remap_out(topic, self.topic_prefix), payload, retain=retain)

    def _on_raw(self, topic: str, payload: bytes, retained: bool, token: Any = None) -> None:
        super()._on_raw(remap_in(topic, self.topic_prefix), payload, retained, token)


class RemappedMqttTransport(RemapMixin, MqttTransport):
    """`MqttTransport` whose protocol topics live under `topic_prefix` on its broker."""


class RemappedMemoryTransport(RemapMixin, MemoryTransport):
    """`MemoryTransport` whose protocol topics live under `topic_prefix` (tests)."""
