"""Which broker a benchmark runs against: the one given, or a private one on loopback.

Why: a benchmark must not depend on a broker someone left running, and must say which broker
(and its limits) its numbers come from: the description yielded here goes into the report.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedclip_edge.broker.mosquitto import HOST, mosquitto_binary, run_mosquitto
from fedclip_edge.errors import ConfigError

KINDS = ("auto", "mosquitto", "amqtt")


@contextlib.contextmanager
def broker_for_bench(
    url: str | None, workdir: Path, kind: str = "auto"
) -> Iterator[dict[str, Any]]:
    """{'url', 'kind', 'pid'?}: the given broker, or a private one on a free loopback port
    (mosquitto when installed, else the embedded amqtt broker), stopped at exit."""
    if kind not in KINDS:
        raise ConfigError("--broker-kind must be auto, mosquitto or amqtt")
    if url:
        yield {"url": url, "kind": "external", "pid": None}
        return
    binary = mosquitto_binary() if kind in ("auto", "mosquitto") else None
    if kind == "mosquitto" and binary is None:
        raise ConfigError("--broker-kind mosquitto: no mosquitto binary found")
    if binary is None:
        from fedclip_edge.broker.embedded import EmbeddedBroker

        with EmbeddedBroker(HOST, 0, start_timeout=10.0) as eb:
            yield {"url": f"mqtt://{HOST}:{eb.port}", "kind": "embedded amqtt", "pid": None}
        return
    with run_mosquitto(Path(workdir), binary=binary) as mq:
        yield {
            "url": mq.url,
            "kind": "private mosquitto (default limits)",
            "version": mq.version(),
            "config": mq.config,
            "pid": mq.pid,
        }
