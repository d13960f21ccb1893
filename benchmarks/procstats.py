"""Process and machine statistics the benchmarks report next to their timings.

Why: on a shared machine a number means little without the load it was measured under, and a
memory claim needs the process's own peak, reset at the moment that matters. Linux /proc is
read directly (no psutil); off Linux the functions return None or {} rather than fail.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from pathlib import Path
from typing import Any


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS / VmHWM etc. from /proc/PID/status, in bytes ({} off Linux)."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, val = line.partition(":")
            if key.startswith("Vm") and val.strip().endswith("kB"):
                out[key] = int(val.split()[0]) * 1024
    return out


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def proc_cpu_s(pid: int) -> float | None:
    """utime + stime of another process (e.g. mosquitto), seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def cpu_snapshot() -> tuple[float, float, float] | None:
    """(busy seconds of the whole machine, seconds used by this process and its children, now)."""
    import resource

    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    ticks = [int(v) for v in fields]
    hz = os.sysconf("SC_CLK_TCK")
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    busy = (sum(ticks[:8]) - idle) / hz
    own = sum(
        getattr(resource.getrusage(who), f)
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
        for f in ("ru_utime", "ru_stime")
    )
    return busy, own, time.monotonic()


def others_cpu_share(start: tuple | None, end: tuple | None) -> float | None:
    """Share of all cores that other processes kept busy between two snapshots (0..1)."""
    if start is None or end is None or end[2] <= start[2]:
        return None
    elapsed = (end[2] - start[2]) * (os.cpu_count() or 1)
    others = (end[0] - start[0]) - (end[1] - start[1])
    return max(0.0, min(1.0, others / elapsed))


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:
        pass
    return info
