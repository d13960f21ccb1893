"""OpenMP's wait policy is PASSIVE in every fedclip-edge process unless the user set one.

It must be in the environment before torch loads libgomp (read once, at load), so it is set when
the package is imported. Checked in a fresh interpreter with OpenMP's own report of its settings
(OMP_DISPLAY_ENV): GOMP_SPINCOUNT 0 is libgomp's PASSIVE (its default spins 300,000 times)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


def omp_settings(code: str, **env: str) -> dict[str, str]:
    """OpenMP's settings as a fresh interpreter running `code` reports them."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**clean, "OMP_DISPLAY_ENV": "VERBOSE", **env},
        capture_output=True, text=True, timeout=300, check=True,
    )
    found = dict(re.findall(r"^\s+([A-Z_]+) = '([^']*)'", proc.stderr, re.M))
    if "GOMP_SPINCOUNT" not in found:
        pytest.skip("torch's OpenMP here is not GNU libgomp (no GOMP_SPINCOUNT in its report)")
    return found


def test_torch_alone_spins_by_default() -> None:
    """The control: without the package, libgomp's default wait spins (what thrashed)."""
    assert omp_settings("import torch; torch.ones(1)")["GOMP_SPINCOUNT"] != "0"


def test_the_cli_loads_torch_with_a_passive_wait_policy() -> None:
    found = omp_settings("import fedclip_edge.cli, torch; torch.ones(1)")
    assert found["OMP_WAIT_POLICY"] == "PASSIVE" and found["GOMP_SPINCOUNT"] == "0"


def test_a_policy_the_user_set_is_kept() -> None:
    found = omp_settings("import fedclip_edge, torch", OMP_WAIT_POLICY="ACTIVE")
    assert found["OMP_WAIT_POLICY"] == "ACTIVE" and found["GOMP_SPINCOUNT"] != "0"
