"""Prometheus metrics of a running aggregator (`aggregate --metrics-port N`).

An `AggregatorHooks` subclass, so the round engine knows nothing about Prometheus: the hooks
count what happens on the aggregator's thread, and a few gauges read the aggregator when
scraped (devices online, committed round). Every exporter has its own `CollectorRegistry`:
several aggregators in one process (tests, benchmarks) never share or clash over a series.

Metric names (all prefixed `fedclip_`; the list is `METRICS`, docs/operations.md explains
each, deploy/grafana/fedclip-edge.json plots them):

- rounds: `rounds_completed_total`, `round_current`, `round_committed`, `rounds_planned`,
  `round_updates` (accepted in the round in progress), `round_wall_seconds` (histogram)
- updates: `updates_accepted_total`, `messages_rejected_total{reason}`,
  `update_latency_seconds` (histogram: global publish -> update arrival),
  `update_handling_seconds` (histogram: decode and validate on the aggregator)
- bytes: `update_bytes_up_total` (accepted updates as received, chunks included),
  `update_bytes_down_total` (the global each answering device downloaded),
  `mqtt_payload_bytes_total{direction}` (every MQTT payload the aggregator sent or received),
  `transport_rejected_total{reason}` (chunks refused before a whole message existed; messages
  dropped before decoding: `rate_limited` over a sender's limit, `penalized` while it is held)
- devices: `devices_online`, `devices_known`; `aggregator_info{fedclip_job, session}`
- privacy: `dp_epsilon` (central DP's epsilon after the committed rounds; NaN when off)
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import start_http_server

from fedclip_edge.broker import protocol as P
from fedclip_edge.broker import report as M
from fedclip_edge.broker.aggregator import AggregatorHooks
from fedclip_edge.errors import ConfigError
from fedclip_edge.wire import REASONS as FRAME_REASONS

if TYPE_CHECKING:
    from fedclip_edge.broker.aggregator import Aggregator

NS = "fedclip"
# Update latency spans a LAN round trip (tens of ms) to a Jetson extracting features for a
# minute in round 1; round wall time adds the deadline (60 s by default) and retries.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
ROUND_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
HANDLING_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
# chunk reasons are counted by the transport (below a whole message), not by the aggregator
ALL_REASONS = tuple(
    sorted(
        {r for r in P.REASONS if not r.startswith("chunk")} | {f"frame_{r}" for r in FRAME_REASONS}
    )
)

# name -> type, as served (counters with their _total); the dashboard test checks against it
METRICS = {
    f"{NS}_rounds_completed_total": "counter",
    f"{NS}_round_current": "gauge",
    f"{NS}_round_committed": "gauge",
    f"{NS}_rounds_planned": "gauge",
    f"{NS}_round_updates": "gauge",
    f"{NS}_round_wall_seconds": "histogram",
    f"{NS}_updates_accepted_total": "counter",
    f"{NS}_messages_rejected_total": "counter",
    f"{NS}_update_latency_seconds": "histogram",
    f"{NS}_update_handling_seconds": "histogram",
    f"{NS}_update_bytes_up_total": "counter",
    f"{NS}_update_bytes_down_total": "counter",
    f"{NS}_mqtt_payload_bytes_total": "counter",
    f"{NS}_transport_rejected_total": "counter",
    f"{NS}_devices_online": "gauge",
    f"{NS}_devices_known": "gauge",
    f"{NS}_dp_epsilon": "gauge",
    f"{NS}_aggregator_info": "info",
}


class _TransportCounters:
    """The transport's own counters (bytes, refused chunks), read at scrape time: they are
    updated on its receiving thread."""

    def __init__(self, hooks: PromHooks) -> None:
        self.hooks = hooks

    def collect(self) -> Any:
        fam = CounterMetricFamily(
            f"{NS}_mqtt_payload_bytes",
            "MQTT payload bytes the aggregator sent or received (chunk envelopes included)",
            labels=["direction"],
        )
        agg = self.hooks.agg
        snap = agg.t.counters.snapshot() if agg is not None else {}
        fam.add_metric(["sent"], float(snap.get("bytes_up", 0)))
        fam.add_metric(["received"], float(snap.get("bytes_down", 0)))
        yield fam
        rej = CounterMetricFamily(
            f"{NS}_transport_rejected",
            "Chunks the aggregator's transport refused (and updates lost to a full inbox)",
            labels=["reason"],
        )
        counts = dict(agg.t.rejected) if agg is not None else {}  # one C-level copy
        for reason in sorted({"chunk", "chunk_hash", "chunk_oversize", "inbox_full", *counts}):
            rej.add_metric([reason], float(counts.get(reason, 0)))
        yield rej


class PromHooks(AggregatorHooks):
    """Counts a run's rounds, updates, rejections and bytes into a private registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.agg: Aggregator | None = None
        r = self.registry
        self.rounds_completed = Counter(
            f"{NS}_rounds_completed", "Rounds committed by this aggregator process", registry=r
        )
        self.round_current = Gauge(
            f"{NS}_round_current", "Round being collected now; 0 when none", registry=r
        )
        self.round_committed = Gauge(
            f"{NS}_round_committed",
            "Last round committed to the run folder (resume included)",
            registry=r,
        )
        self.rounds_planned = Gauge(f"{NS}_rounds_planned", "Rounds the job runs", registry=r)
        self.round_updates = Gauge(
            f"{NS}_round_updates", "Updates accepted in the round being collected", registry=r
        )
        self.round_wall = Histogram(
            f"{NS}_round_wall_seconds",
            "Round wall time: global publish to aggregate",
            buckets=ROUND_BUCKETS,
            registry=r,
        )
        self.accepted = Counter(f"{NS}_updates_accepted", "Updates accepted", registry=r)
        self.rejected = Counter(
            f"{NS}_messages_rejected",
            "Messages the aggregator rejected, by reason",
            ["reason"],
            registry=r,
        )
        for reason in ALL_REASONS:  # every series exists from the start: rate() sees the first
            self.rejected.labels(reason)
        self.latency = Histogram(
            f"{NS}_update_latency_seconds",
            "Update latency: the round's global published -> the update arrived",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.handling = Histogram(
            f"{NS}_update_handling_seconds",
            "Aggregator time to decode, validate and add one update",
            buckets=HANDLING_BUCKETS,
            registry=r,
        )
        self.bytes_up = Counter(
            f"{NS}_update_bytes_up", "Bytes of accepted updates as received", registry=r
        )
        self.bytes_down = Counter(
            f"{NS}_update_bytes_down",
            "Bytes of the global each answering device downloaded",
            registry=r,
        )
        self.devices_online = Gauge(f"{NS}_devices_online", "Devices online", registry=r)
        self.devices_known = Gauge(f"{NS}_devices_known", "Devices seen in this job", registry=r)
        self.dp_epsilon = Gauge(
            f"{NS}_dp_epsilon",
            "Central DP: epsilon at --dp-delta after the committed rounds (NaN: DP off)",
            registry=r,
        )
        self.info = Info(f"{NS}_aggregator", "The job this aggregator runs", registry=r)
        r.register(_TransportCounters(self))

    def bind(self, agg: Aggregator) -> None:
        """Gauges that read the aggregator at scrape time (its roster may be replaced on
        resume, so they read `agg.roster` each time rather than keep the object)."""
        self.agg = agg
        self.rounds_planned.set(agg.cfg.rounds)
        self.info.info({"fedclip_job": agg.cfg.job, "session": agg.session})
        self.devices_online.set_function(lambda: agg.roster.active_count)
        self.devices_known.set_function(lambda: len(agg.roster))
        self.round_committed.set_function(lambda: agg.completed)
        self.dp_epsilon.set_function(lambda: _dp_epsilon(agg))

    # ------------------------------------------------------------------ hooks
    def round_started(self, agg: Aggregator, rnd: int) -> None:
        self.round_current.set(rnd)
        self.round_updates.set(0)

    def update_handled(self, agg: Aggregator, seconds: float, accepted: bool) -> None:
        self.handling.observe(seconds)
        if not accepted:
            return  # counted by message_rejected, with its reason
        self.accepted.inc()
        self.round_updates.set(len(agg._answered))
        rec = next(reversed(agg._answered.values()), None)  # the one just accepted
        if rec is None:
            return
        latency, up, down = (
            M._num(rec.get(k)) for k in ("update_latency_s", "bytes_up", "bytes_down")
        )
        if latency is not None and latency >= 0:
            self.latency.observe(latency)
        if up is not None and up >= 0:
            self.bytes_up.inc(up)
        if down is not None and down >= 0:
            self.bytes_down.inc(down)

    def message_rejected(self, agg: Aggregator, reason: str) -> None:
        self.rejected.labels(reason).inc()

    def before_commit(self, agg: Aggregator, rnd: int, wall_s: float) -> None:
        self.round_wall.observe(wall_s)

    def after_commit(self, agg: Aggregator, rnd: int, commit_s: float, reports_s: float) -> None:
        self.rounds_completed.inc()
        self.round_current.set(0)


def _dp_epsilon(agg: Aggregator) -> float:
    """The epsilon of a central-DP plug-in (privacy/central.py), NaN without one."""
    for p in agg.engine.plugins:
        if hasattr(p, "privacy") and hasattr(p, "epsilon"):
            return float("inf") if p.epsilon is None else float(p.epsilon)
    return float("nan")


class MetricsServer:
    """The HTTP endpoint Prometheus scrapes (`/metrics`, any path answers), on its own thread.

    `port` 0 picks a free port (the `port` attribute says which); the command line treats 0 as
    "off" and never gets here with it.
    """

    def __init__(self, registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 0):
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}"
            ) from None
        self.host = host
        self.port = int(self._server.server_port)
        self._closed = threading.Event()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self._server.shutdown()
            self._server.server_close()


def serve_metrics(agg: Aggregator, hooks: PromHooks, host: str, port: int) -> MetricsServer:
    """Bind the hooks to `agg` and start the endpoint (used by `aggregate --metrics-port`)."""
    hooks.bind(agg)
    return MetricsServer(hooks.registry, host, port)
