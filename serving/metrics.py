"""Prometheus metrics of `fedclip-edge serve` (GET /metrics).

Its own `CollectorRegistry` per service, as the aggregator's exporter does: two services in one
process (tests, the benchmark) never share a series. Names, all prefixed `fedclip_serve_`:

- `requests_total{status}`: POST /classify answers by HTTP status
- `errors_total{reason}`: refusals and failures by reason (`REASONS`)
- `request_seconds` (histogram): POST /classify, body read to answer sent
- `batch_size` (histogram): items per model call; `batch_seconds` (histogram): one model call
- `queue_depth`: requests waiting for the model
- `model_info{version}`: the version answering now; `model_swaps_total{result}`: hot swaps
  (`ok`, `failed`)
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

NS = "fedclip_serve"
# reason label values: bounded, so a flood of bad input cannot grow the series without bound
REASONS = (
    "empty_body",
    "body_too_large",
    "bad_image",
    "bad_request",
    "queue_full",
    "no_model",
    "shutting_down",
    "internal",
)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
METRICS = {
    f"{NS}_requests_total": "counter",
    f"{NS}_errors_total": "counter",
    f"{NS}_request_seconds": "histogram",
    f"{NS}_batch_size": "histogram",
    f"{NS}_batch_seconds": "histogram",
    f"{NS}_queue_depth": "gauge",
    f"{NS}_model_info": "info",
    f"{NS}_model_swaps_total": "counter",
}


class ServeMetrics:
    """The service's series, in a registry of its own."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, queue_depth: Callable[[], float]) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            f"{NS}_requests", "POST /classify answers by HTTP status", ["status"], registry=r
        )
        self.errors = Counter(
            f"{NS}_errors", "Refused or failed classify requests by reason", ["reason"],
            registry=r,
        )
        for reason in REASONS:
            self.errors.labels(reason)  # every reason shows, at 0, from the start
        self.latency = Histogram(
            f"{NS}_request_seconds", "POST /classify latency", buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            f"{NS}_batch_size", "Images per model call", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            f"{NS}_batch_seconds", "Seconds per model call", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue = Gauge(f"{NS}_queue_depth", "Requests waiting for the model", registry=r)
        self.queue.set_function(queue_depth)
        self.model = Info(f"{NS}_model", "The model version answering now", registry=r)
        self.swaps = Counter(
            f"{NS}_model_swaps", "Hot swaps of the model version", ["result"], registry=r
        )
        for result in ("ok", "failed"):
            self.swaps.labels(result)

    def set_model(self, version: str, source: str) -> None:
        self.model.info({"version": version, "source": source})

    def render(self) -> bytes:
        return generate_latest(self.registry)
