"""`pip install fedclip-edge flwr` resolves in one environment: pip's own resolver, asked for this
project and Flower together (a dry run, nothing installed). Flower pins typer < 0.21 and amqtt
0.12 needs typer >= 0.24, so the embedded broker's amqtt is an extra; this fails if a dependency
that cannot share an environment with Flower comes back into the base install.

Needs the package index: skipped with the reason where it cannot be reached, except in CI
(CI=true), where it must run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def pip(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pip", *args, "--disable-pip-version-check"],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )


@pytest.fixture(scope="module")
def flwr_latest() -> str:
    """Flower's newest release on the index. Skip (not in CI) when pip cannot reach it."""
    try:
        probe = pip("index", "versions", "flwr", timeout=120)
        found = re.match(r"flwr \(([^)]+)\)", probe.stdout.strip())
        reason = None if found else (probe.stderr.strip().splitlines() or ["no answer"])[-1]
    except subprocess.TimeoutExpired:
        reason = "no answer from the index in 120 s"
    if reason is None:
        return found.group(1)
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must reach the package index to check the resolver: {reason}")
    pytest.skip(f"the package index is not reachable from here: {reason}")


def resolve(tmp_path: Path, *requirements: str) -> tuple[int, dict[str, str], str]:
    """pip's resolution of `requirements` for this interpreter: (exit code, name -> version)."""
    report = tmp_path / "report.json"
    proc = pip("install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
               *requirements, timeout=900)
    if proc.returncode != 0:
        return proc.returncode, {}, proc.stderr
    installs = json.loads(report.read_text())["install"]
    names = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in installs}
    return 0, names, proc.stderr


def test_fedclip_edge_and_flower_resolve_together(flwr_latest: str, tmp_path: Path) -> None:
    """With today's Flower: unpinned, pip backtracks to a years-old flwr without the typer pin,
    which "resolves" but is not what a Flower user has."""
    rc, found, err = resolve(tmp_path, str(ROOT), f"flwr=={flwr_latest}")
    assert rc == 0, f"pip could not install fedclip-edge beside flwr {flwr_latest}:\n{err[-3000:]}"
    assert {"fedclip-edge", "flwr", "typer", "torch"} <= found.keys()
    assert "amqtt" not in found  # the embedded broker stays an extra
    typer = tuple(int(p) for p in found["typer"].split(".")[:2])
    assert (0, 16) <= typer < (0, 21), found["typer"]  # our floor, Flower's ceiling
