"""Hot swap for the service: the classifier answering now, and the watcher that replaces it
when the model store's `current` names another version.

Why apart from the HTTP code: the swap's rules are the service's promise to its callers (no
request fails or waits on a swap, a batch is run by exactly one version, a version that fails to
open leaves the old one serving), and they touch only the store and the classifier. The new
version is opened in a thread beside the old one; the switch is one reference assignment, which
the model worker reads once per batch (serving/service.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedclip_edge.serving.metrics import ServeMetrics

log = logging.getLogger("fedclip_edge.serving.service")

Opener = Callable[[Path], Any]  # a model path -> a Classifier (serving/classifier.py)


def one_line(exc: BaseException) -> str:
    """An exception as one line: ours carry their message, others get their type in front."""
    from fedclip_edge.errors import FedClipError

    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, FedClipError) else f"{type(exc).__name__}: {text}"


class ModelHolder:
    """The classifier answering now and, for a store, the watcher that replaces it."""

    def __init__(self, path: Path, opener: Opener, metrics: ServeMetrics | None = None) -> None:
        self.path = Path(path)
        self.opener = opener
        self.metrics = metrics
        self.store = None
        from fedclip_edge.serving.store import ModelStore, is_store

        self.current: Any = None  # None: a store whose agent has promoted nothing yet
        if is_store(self.path):
            self.store = ModelStore(self.path)
            name = self.store.current_name()
            if name is None:
                log.warning("%s has no current version yet: answering 503 until the agent "
                            "promotes one", self.path)
            else:
                self.current = opener(self._version_path(name))
        else:
            self.current = opener(self.path)
        self.failed: str | None = None  # a version that failed to open (not retried)
        self.retire: Callable[[Any], None] | None = None  # closes a replaced classifier
        self.swaps = 0
        self._lock = asyncio.Lock()
        self._last_watch_error = ""
        if metrics is not None and self.current is not None:
            metrics.set_model(self.current.version, str(self.path))

    @property
    def version(self) -> str | None:
        return None if self.current is None else self.current.version

    def _version_path(self, name: str) -> Path:
        assert self.store is not None
        return self.store.versions_dir / name

    async def check(self) -> dict[str, Any]:
        """Swap to the store's `current` if it names another version; what happened."""
        if self.store is None:
            return {"model_version": self.version, "swapped": False, "watching": False}
        async with self._lock:
            loop = asyncio.get_running_loop()
            try:
                name = await loop.run_in_executor(None, self.store.current_name)
            except Exception as exc:  # a pointer being replaced, a store being moved
                msg = one_line(exc)
                if msg != self._last_watch_error:
                    log.warning("model store %s: %s; still serving %s", self.path, msg,
                                self.version)
                    self._last_watch_error = msg
                return {"model_version": self.version, "swapped": False, "error": msg}
            self._last_watch_error = ""
            if name is None or name == self.version or name == self.failed:
                return {"model_version": self.version, "swapped": False, "current": name}
            old = self.version
            t0 = time.monotonic()
            try:
                new = await loop.run_in_executor(None, self.opener, self._version_path(name))
            except Exception as exc:
                self.failed = name
                msg = one_line(exc)
                log.error("hot swap to %s failed: %s; still serving %s", name, msg, old)
                if self.metrics is not None:
                    self.metrics.swaps.labels("failed").inc()
                return {"model_version": old, "swapped": False, "failed": name, "error": msg}
            try:  # `current` moved on while this one opened (v1 -> v2 -> v1): do not serve it
                still = await loop.run_in_executor(None, self.store.current_name)
            except Exception:
                still = name
            if still != name:
                log.info("hot swap to %s skipped: current is now %s", name, still)
                await loop.run_in_executor(None, close_quietly, new)
                return {"model_version": old, "swapped": False, "current": still}
            previous, self.current = self.current, new  # the swap: one reference, read once
            # per batch by the worker; the old one is closed after the batch running now
            if previous is not None and self.retire is not None:
                self.retire(previous)
            self.failed = None
            self.swaps += 1
            if self.metrics is not None:
                self.metrics.swaps.labels("ok").inc()
                self.metrics.set_model(new.version, str(self._version_path(name)))
            log.info("hot swap: now serving %s (was %s; opened in %.1f s)", new.version, old,
                     time.monotonic() - t0)
            return {"model_version": new.version, "swapped": True, "previous": old}

    async def watch(self, poll_s: float) -> None:
        while True:
            await asyncio.sleep(poll_s)
            try:
                await self.check()
            except Exception as exc:  # a bug here must not end the watching for good
                log.error("model watcher: %s", one_line(exc))


def close_quietly(clf: Any) -> None:
    close = getattr(clf, "close", None)
    if close is None:
        return
    try:
        close()
    except Exception as exc:  # a backend that fails to close must not stop the service
        log.warning("closing %s: %s", getattr(clf, "version", "?"), one_line(exc))
