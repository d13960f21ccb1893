"""`fedclip-edge serve`: the on-device HTTP service of a model store, a version or a fused export.

POST /classify (the image bytes as the body) -> {label, score, topk, model_version};
GET /healthz; GET /metrics (Prometheus); POST /reload (look at the store's `current` now).

Why this shape: a device answers a few concurrent callers (a camera loop, an app) with one model,
so requests are micro-batched (serving/batcher.py) into one model call in one thread, the event
loop only reads bodies, decodes in a small pool and answers. Memory is bounded: at most
`queue_size` requests wait, each body is at most `max_body_bytes` (413 above), and a full queue
answers 503 with Retry-After at once instead of queueing more. Hot swap: when the model is a
store, a watcher (serving/hotswap.py) reads its `current` pointer every `poll_s` seconds; a new
version is opened beside the old one in a thread and then replaces it by one reference
assignment, which the worker reads once per batch: a batch is always run by exactly one version
and every answer names it; a version that fails to open is logged in one line and the old one
keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fedclip_edge.errors import ConfigError
from fedclip_edge.serving.batcher import MicroBatcher, QueueFull, ShuttingDown
from fedclip_edge.serving.hotswap import ModelHolder, Opener, close_quietly, one_line
from fedclip_edge.serving.metrics import ServeMetrics

log = logging.getLogger("fedclip_edge.serving.service")

DEFAULT_MAX_BODY = 8 * 2**20
DEFAULT_POLL_S = 0.5
RETRY_AFTER_S = 1
MAX_TOP_K = 100



def _rejected_types() -> tuple[type[BaseException], ...]:
    from fedclip_edge.serving.classifier import ImageRejected

    return (ImageRejected,)


def default_opener(backend: str = "auto", max_batch: int = 8) -> Opener:
    """open_classifier with the service's backend and a batch bound at least the service's."""

    def opener(path: Path) -> Any:
        from fedclip_edge.serving.classifier import open_classifier

        return open_classifier(Path(path), backend=backend, max_batch=max(8, max_batch))

    return opener


@dataclass
class _Item:
    body: bytes
    array: np.ndarray
    decoded_by: Any  # the classifier whose preprocessing made `array`


class _Reply(Exception):
    """An error answer: HTTP status, metric reason, one-line message."""

    def __init__(self, status: int, reason: str, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.reason, self.retry_after = status, reason, retry_after


@dataclass
class ServiceSettings:
    max_batch: int = 8
    max_wait_ms: float = 5.0
    queue_size: int = 64
    max_body_bytes: int = DEFAULT_MAX_BODY
    poll_s: float = DEFAULT_POLL_S
    decode_threads: int = 0  # 0: min(4, cores)

    def check(self) -> None:
        if not 1 <= self.max_batch <= 1024:
            raise ConfigError(f"--max-batch {self.max_batch}: want 1..1024")
        if not 0 <= self.max_wait_ms <= 10_000:
            raise ConfigError(f"--max-wait-ms {self.max_wait_ms}: want 0..10000")
        if not 1 <= self.queue_size <= 100_000:
            raise ConfigError(f"--queue-size {self.queue_size}: want 1..100000")
        if not 1 <= self.max_body_bytes <= 2**31:
            raise ConfigError(f"--max-body-mb: {self.max_body_bytes} bytes: want 1 B..2 GiB")
        if not 0.01 <= self.poll_s <= 3600:
            raise ConfigError(f"--poll-s {self.poll_s}: want 0.01..3600")


class Service:
    """What the app's routes share: the model holder, the batcher, the metrics."""

    def __init__(
        self,
        model_path: Path,
        settings: ServiceSettings,
        opener: Opener,
        before_batch: Callable[[int], None] | None = None,
    ) -> None:
        settings.check()
        self.settings = settings
        self.before_batch = before_batch  # tests hold the worker here (in its thread)
        self.batcher = MicroBatcher(
            self._run,
            max_batch=settings.max_batch,
            max_wait_s=settings.max_wait_ms / 1000,
            queue_size=settings.queue_size,
            on_batch=self._on_batch,
            pending=lambda: self.decoding,
        )
        self.decoding = 0  # requests between body read and queue (decoding)
        self.metrics = ServeMetrics(queue_depth=self.batcher.depth)
        self.holder = ModelHolder(Path(model_path), opener, self.metrics)
        self.holder.retire = self._retire
        self.rejected = _rejected_types()
        threads = settings.decode_threads or min(4, os.cpu_count() or 1)
        self.decode_pool = ThreadPoolExecutor(threads, thread_name_prefix="serve-decode")
        self.stopping = False
        self._watcher: asyncio.Task | None = None

    # ------------------------------------------------------------------ the worker thread

    def _run(self, items: list[_Item]) -> list[Any]:
        if self.before_batch is not None:
            self.before_batch(len(items))
        clf = self.holder.current  # read once: the whole batch runs on this version
        out: list[Any] = [None] * len(items)
        ready: list[tuple[int, np.ndarray]] = []
        for i, it in enumerate(items):
            if it.decoded_by is clf:
                ready.append((i, it.array))
                continue
            try:  # decoded by the version before a swap: use this version's preprocessing
                ready.append((i, clf.decode(it.body)))
            except self.rejected as exc:
                out[i] = exc
        if ready:
            probs = np.asarray(clf.predict(np.stack([a for _, a in ready])))
            for (i, _), row in zip(ready, probs, strict=True):
                out[i] = (clf.version, clf.classes, row)
        return out

    def _retire(self, clf: Any) -> None:
        """Close a replaced classifier in the model thread: after the batch that may still
        use it, before any batch that could (none: they read the new one)."""
        self.batcher.call_in_worker(close_quietly, clf)

    def _on_batch(self, size: int, seconds: float) -> None:
        self.metrics.batch_size.observe(size)
        self.metrics.batch_seconds.observe(seconds)

    # ------------------------------------------------------------------ the event loop

    async def start(self) -> None:
        await self.batcher.start()
        if self.holder.store is not None:
            self._watcher = asyncio.get_running_loop().create_task(
                self.holder.watch(self.settings.poll_s), name="model-watcher"
            )

    async def stop(self) -> None:
        self.stopping = True
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self.batcher.stop()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)

    async def _read_body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                raise _Reply(400, "bad_request", "Content-Length is not a number") from None
            if n > limit:
                raise _Reply(413, "body_too_large",
                             f"body of {n} bytes is over the limit of {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _Reply(413, "body_too_large", f"body is over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _top_k(self, request: Request) -> int:
        raw = request.query_params.get("top_k", "3")
        try:
            k = int(raw)
        except ValueError:
            raise _Reply(400, "bad_request", f"top_k={raw!r} is not an integer") from None
        if not 1 <= k <= MAX_TOP_K:
            raise _Reply(400, "bad_request", f"top_k={k}: want 1..{MAX_TOP_K}")
        return k

    async def classify(self, request: Request) -> dict[str, Any]:
        if self.stopping:
            raise _Reply(503, "shutting_down", "the service is stopping", RETRY_AFTER_S)
        k = self._top_k(request)
        if self.batcher.full():  # refuse before reading the body: backpressure costs nothing
            raise _Reply(503, "queue_full",
                         f"queue full ({self.batcher.depth()} waiting); retry later",
                         RETRY_AFTER_S)
        body = await self._read_body(request)
        if not body:
            raise _Reply(400, "empty_body", "empty body: send the image file's bytes")
        clf = self.holder.current
        if clf is None:
            raise _Reply(503, "no_model", "no model version is current yet (the agent promotes "
                         "one at the end of a job)", RETRY_AFTER_S)
        loop = asyncio.get_running_loop()
        self.decoding += 1
        try:
            array = await loop.run_in_executor(self.decode_pool, clf.decode, body)
        except self.rejected as exc:  # the classifier's own one-line reason
            raise _Reply(422, "bad_image", " ".join(str(exc).split()) or "not an image") from None
        except Exception as exc:  # a decoder failure the classifier did not name: still 4xx
            log.warning("decode failed: %s", one_line(exc))
            raise _Reply(422, "bad_image", f"not a readable image ({one_line(exc)})") from None
        finally:
            self.decoding -= 1
        try:
            result = await self.batcher.submit(_Item(body, array, clf))
        except QueueFull as exc:
            raise _Reply(503, "queue_full", f"{exc}; retry later", RETRY_AFTER_S) from None
        except ShuttingDown as exc:
            raise _Reply(503, "shutting_down", str(exc), RETRY_AFTER_S) from None
        if isinstance(result, BaseException):
            raise _Reply(422, "bad_image", " ".join(str(result).split()) or "not an image")
        version, classes, probs = result
        order = np.argsort(-probs, kind="stable")[: min(k, len(classes))]
        topk = [[classes[i], _score(probs[i])] for i in order]  # as `classify --json` writes
        return {"label": topk[0][0], "score": topk[0][1], "topk": topk, "model_version": version}

    def health(self) -> dict[str, Any]:
        clf = self.holder.current
        status = "stopping" if self.stopping else "no_model" if clf is None else "ok"
        return {
            "status": status,
            "model_version": None if clf is None else clf.version,
            "classes": None if clf is None else len(clf.classes),
            "queue": self.batcher.depth(),
            "queue_size": self.settings.queue_size,
            "max_batch": self.settings.max_batch,
            "watching_store": self.holder.store is not None,
            "swaps": self.holder.swaps,
            "failed_version": self.holder.failed,
        }


def _score(p: Any) -> float:
    v = float(p)
    return round(v, 6) if math.isfinite(v) else 0.0


def create_app(
    model_path: Path,
    *,
    max_batch: int = 8,
    max_wait_ms: float = 5.0,
    queue_size: int = 64,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    backend: str = "auto",
    poll_s: float = DEFAULT_POLL_S,
    opener: Opener | None = None,
    before_batch: Callable[[int], None] | None = None,
) -> Starlette:
    """The service as an ASGI app; the model is opened here (a bad path fails before binding).

    `opener` replaces open_classifier (tests); `before_batch(n)` runs in the model thread
    before each batch (tests hold the worker with it to make a full queue certain).
    """
    settings = ServiceSettings(max_batch, max_wait_ms, queue_size, max_body_bytes, poll_s)
    service = Service(
        Path(model_path), settings, opener or default_opener(backend, max_batch), before_batch
    )
    m = service.metrics

    async def classify(request: Request) -> Response:
        t0 = time.perf_counter()
        headers = {}
        try:
            payload, status = await service.classify(request), 200
        except _Reply as r:
            payload, status = {"error": str(r), "reason": r.reason}, r.status
            if r.retry_after is not None:
                headers["Retry-After"] = str(r.retry_after)
            m.errors.labels(r.reason).inc()
        except ClientDisconnect:
            m.requests.labels("499").inc()
            raise
        except Exception as exc:  # a bug or a failed model call: one line, the service stays
            log.error("classify failed: %s", one_line(exc))
            payload = {"error": f"internal error: {one_line(exc)}", "reason": "internal"}
            status = 500
            m.errors.labels("internal").inc()
        m.requests.labels(str(status)).inc()
        m.latency.observe(time.perf_counter() - t0)
        return JSONResponse(payload, status_code=status, headers=headers)

    async def healthz(request: Request) -> Response:
        body = service.health()
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    async def metrics(request: Request) -> Response:
        return Response(m.render(), media_type=m.content_type)

    async def reload(request: Request) -> Response:
        return JSONResponse(await service.holder.check())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await service.start()
        log.info("serving %s (%s)", service.holder.version or "nothing yet", model_path)
        try:
            yield
        finally:
            await service.stop()

    app = Starlette(
        routes=[
            Route("/classify", classify, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/reload", reload, methods=["POST"]),
        ],
        lifespan=lifespan,
    )
    app.state.service = service
    return app


def connection_limit(queue_size: int, max_batch: int) -> int:
    """uvicorn's limit_concurrency (503 above it): enough for a full queue, a running batch and
    the bodies being read, so the bound on memory is this times the body limit."""
    return queue_size + 2 * max_batch + 16


def run_server(
    app: Starlette,
    host: str,
    port: int,
    *,
    limit_concurrency: int | None = None,
    log_level: str = "warning",
) -> None:
    """uvicorn in this thread until SIGINT/SIGTERM (graceful: running requests finish)."""
    import uvicorn

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="on",
        access_log=False,
        log_level=log_level,
        limit_concurrency=limit_concurrency,
        timeout_graceful_shutdown=30,
        server_header=False,
    )
    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            # uvicorn re-raises a captured signal after its graceful shutdown (the process then
            # dies of SIGTERM); a stop asked for by SIGTERM is this command's success: exit 0
            captured = getattr(self, "_captured_signals", None)
            if sig == signal.SIGTERM and isinstance(captured, list) and sig in captured:
                captured.remove(sig)

    server = _Server(config)
    try:
        server.run()
    except SystemExit:  # uvicorn exits 1 when it cannot bind (it logged why, one line)
        if server.started:
            raise
    if not server.started:
        raise ConfigError(f"could not serve on {host}:{port} (in use, or not an address here)")
