"""Child processes (brokers, agents) are stopped the same way everywhere."""

from __future__ import annotations

import subprocess


def stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """SIGTERM so it can finish cleanly, SIGKILL if it lingers; never leaves a zombie."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)
