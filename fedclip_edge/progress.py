"""Progress that shows on a terminal and in a log file alike.

On a terminal a rich bar redraws in place; in a log file (stderr not a terminal) the bar would
print nothing until the end, so a plain line goes out at the start, every few seconds
(`FEDCLIP_EDGE_PROGRESS_SECONDS`, default 5) and at the end:
`features: 512/2400 images (21%), 35.2 images/s, about 54 s left`.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

DEFAULT_EVERY_S = 5.0


def _every_s() -> float:
    try:
        return max(0.0, float(os.environ.get("FEDCLIP_EDGE_PROGRESS_SECONDS", DEFAULT_EVERY_S)))
    except ValueError:
        return DEFAULT_EVERY_S


def _left(seconds: float) -> str:
    """Time left at the rate so far, coarse on purpose: the rate moves with the machine's load."""
    if seconds < 90:
        return f"about {max(1, round(seconds))} s left"
    if seconds < 90 * 60:
        return f"about {round(seconds / 60)} min left"
    return f"about {seconds / 3600:.1f} h left"


def _rate(per_s: float) -> str:
    """35.2, or 0.042 for slow work (a loaded machine must not read as 0.0)."""
    return f"{per_s:.1f}" if per_s >= 1 else f"{per_s:.2g}"


class LineProgress:
    """Periodic one-line reports; `clock` and `stream` are injectable so tests are exact."""

    def __init__(
        self,
        label: str,
        total: int,
        unit: str,
        *,
        stream: TextIO | None = None,
        every_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label, self.total, self.unit = label, int(total), unit
        self.stream = stream if stream is not None else sys.stderr
        self.every_s = _every_s() if every_s is None else every_s
        self.clock = clock
        self.done = 0
        self.note = ""
        self._closed = False
        self.t0 = clock()
        self._last = self.t0
        self._print()

    def line(self) -> str:
        pct = f" ({self.done / self.total:.0%})" if self.total else ""
        elapsed = self.clock() - self.t0
        rate = ""
        if self.done and elapsed > 0:
            per_s = self.done / elapsed
            rate = f", {_rate(per_s)} {self.unit}/s"
            if 0 < self.done < self.total and not self._closed:
                rate += f", {_left((self.total - self.done) / per_s)}"
        note = f", {self.note}" if self.note else ""
        return f"{self.label}: {self.done}/{self.total} {self.unit}{pct}{rate}{note}"

    def _print(self) -> None:
        self._printed = self.done
        print(self.line(), file=self.stream, flush=True)

    def advance(self, n: int = 1, note: str | None = None) -> None:
        self.done += n
        if note is not None:
            self.note = note
        now = self.clock()
        if now - self._last >= self.every_s:
            self._last = now
            self._print()

    def describe(self, text: str) -> None:
        """What is being worked on now (a domain, an epoch); shown in the next line."""
        self.note = text

    def close(self) -> None:
        """The final count, unless the last line already said it."""
        self._closed = True
        if self.done != self._printed:
            self._print()


class _RichProgress:
    """The terminal's bar, with the same small interface as LineProgress."""

    def __init__(self, label: str, total: int, unit: str, bar: Any) -> None:
        self.bar, self.unit, self.done = bar, unit, 0
        self.t0 = time.monotonic()
        self.task = bar.add_task(label, total=total, note="")

    def advance(self, n: int = 1, note: str | None = None) -> None:
        self.done += n
        elapsed = time.monotonic() - self.t0
        rate = f"{_rate(self.done / elapsed)} {self.unit}/s" if elapsed > 0 else ""
        fields: dict[str, Any] = {"rate": rate}
        if note is not None:
            fields["note"] = note
        self.bar.update(self.task, advance=n, **fields)

    def describe(self, text: str) -> None:
        self.bar.update(self.task, note=text)


class _Silent:
    def advance(self, n: int = 1, note: str | None = None) -> None:
        pass

    def describe(self, text: str) -> None:
        pass


@contextmanager
def progress(
    label: str, total: int, unit: str, *, enabled: bool = True, stream: TextIO | None = None
) -> Iterator[Any]:
    """A reporter with `advance(n, note=None)` and `describe(text)`: a rich bar on a terminal,
    periodic lines otherwise, nothing when not `enabled`."""
    if not enabled:
        yield _Silent()
        return
    out = stream if stream is not None else sys.stderr
    if out.isatty():
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        columns = (
            TextColumn("[bold]{task.description}[/] {task.fields[note]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=Console(file=out), transient=False) as bar:
            reporter = _RichProgress(label, total, unit, bar)
            bar.update(reporter.task, rate="")
            yield reporter
        return
    lines = LineProgress(label, total, unit, stream=out)
    try:
        yield lines
    finally:
        lines.close()
