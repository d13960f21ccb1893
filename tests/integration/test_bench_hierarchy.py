"""`bench aggregator --sites`: a small run of the whole bridged topology, end to end.

Checks correctness, not speed: every device's update is accepted by its site, the central gets
one update per site, its aggregate is the flat mean of all frames sent, and the report has the
per-level figures (round times, rates, peak RSS per process, bytes per link).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.mqtt import require_mosquitto

from fedclip_edge.benchmarks.hierarchy import run_hierarchy_bench

pytestmark = [pytest.mark.integration, pytest.mark.mosquitto]


def test_bench_sites_end_to_end(tmp_path: Path) -> None:
    require_mosquitto()
    rep = run_hierarchy_bench([30], 3, tmp_path, dim=8, timeout_s=180, log=lambda m: None)
    assert rep["zero_loss"] and rep["complete"]
    (row,) = rep["rows"]
    assert row["accepted_by_sites"] == 30 and row["accepted_by_central"] == 3
    assert row["mean_max_abs_err"] is not None and row["mean_max_abs_err"] < 1e-5
    assert [s["devices"] for s in row["sites"]] == [10, 10, 10]
    for s in row["sites"]:
        assert s["accepted"] == 10 and s["peak_rss"] > 0
        assert s["bytes_site_broker_to_site_aggregator"] >= 10 * row["update_envelope_bytes"]
        assert 0 < s["bytes_site_to_central_bridge"] < 3 * row["update_envelope_bytes"]
    assert set(row["brokers"]) == {"central", "site000", "site001", "site002"}
    on_disk = json.loads((tmp_path / "bench_aggregator.json").read_text())
    assert on_disk["rows"][0]["loss"] == 0
