"""Hypothesis profiles for the decoder fuzz tests, and their outcome counts.

`ci` (the default): about 200 examples per test, so CI stays fast. `long`: selected with
FEDCLIP_FUZZ=long, for a run whose figures go into the docs. With FEDCLIP_FUZZ_REPORT=PATH the
counts (cases tried, rejected, accepted per test) are written there as JSON at exit.
"""

from __future__ import annotations

import atexit
import json
import os
from collections import defaultdict

from hypothesis import HealthCheck, settings

_COMMON = dict(
    deadline=None,  # a shared, loaded machine: time is not what these tests check
    database=None,  # no .hypothesis folder in the tree; failures print their reproduction
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("ci", max_examples=200, **_COMMON)
settings.register_profile("long", max_examples=1_000, **_COMMON)
PROFILE = "long" if os.environ.get("FEDCLIP_FUZZ") == "long" else "ci"
settings.load_profile(PROFILE)

COUNTS: dict[str, dict[str, int]] = defaultdict(lambda: {"tried": 0, "rejected": 0, "accepted": 0})


def record(test: str, outcome: str) -> None:
    """Count one case: outcome is 'rejected' or 'accepted' (a crash fails the test instead)."""
    c = COUNTS[test]
    c["tried"] += 1
    c[outcome] += 1


def _write_report() -> None:
    path = os.environ.get("FEDCLIP_FUZZ_REPORT")
    if path and COUNTS:
        old = {}
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
        old.update({"profile": PROFILE, **{k: dict(v) for k, v in COUNTS.items()}})
        with open(path, "w") as f:
            json.dump(old, f, indent=2, sort_keys=True)


atexit.register(_write_report)
