"""Plain-text tables and figures for the reports a person reads at the end of a run.

Plain text, not rich: the same lines go to a terminal, a log file and a test's assertion.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def finite(v: Any) -> float | None:
    """A finite number, or None (reports read numbers that came from devices)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def percentile(xs: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default) without numpy; None when empty."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def pct(v: Any) -> str:
    """0.5312 -> '53.1%'; '-' when there is no number."""
    x = finite(v)
    return "-" if x is None else f"{x:.1%}"


def points(v: Any) -> str:
    """An accuracy difference in percentage points with its sign: 0.021 -> '+2.1'."""
    x = finite(v)
    return "-" if x is None else f"{100 * x:+.1f}"


def human_bytes(n: Any) -> str:
    """SI units, as the README quotes them: 133000 -> '133 kB', 2_100_000 -> '2.1 MB'."""
    x = finite(n)
    if x is None:
        return "-"
    if abs(x) < 1000:
        return f"{x:.0f} B"
    for unit in ("kB", "MB", "GB", "TB"):
        x /= 1000
        if abs(x) < 1000 or unit == "TB":
            return f"{x:.0f} {unit}" if abs(x) >= 100 else f"{x:.3g} {unit}"
    return f"{x:.0f} TB"  # pragma: no cover - the loop always returns


def seconds(v: Any) -> str:
    """Latencies: milliseconds below one second, seconds above."""
    x = finite(v)
    if x is None:
        return "-"
    return f"{1000 * x:.0f} ms" if x < 1 else f"{x:.2f} s"


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Aligned columns: the first left-aligned (names), the others right-aligned (numbers)."""
    cells = [list(headers), *[[str(c) for c in r] for r in rows]]
    if any(len(r) != len(headers) for r in cells):
        raise ValueError("every row needs one cell per header")
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def fmt(r: list[str]) -> str:
        first = r[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return [fmt(cells[0]), rule, *(fmt(r) for r in cells[1:])]
