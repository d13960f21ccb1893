"""`bench flood`: a short run of one case end to end (correctness of the bench, not speed).

A registered flooding id in mode `after`: its flood trips its rate limit, it is penalized (so
only part of its flood reached the aggregator), every round still commits and the report has
the figures docs/reliability.md quotes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support.mqtt import require_mosquitto

from fedclip_edge.benchmarks.flood import run_case, table_row

pytestmark = [pytest.mark.integration, pytest.mark.mosquitto]


def test_bench_flood_one_short_case(tmp_path: Path) -> None:
    require_mosquitto()
    r = run_case("after", "registered", tmp_path, seconds=3.0, after_rounds=1,
                 log=lambda m: None)
    assert r["flood_messages"] > 600  # over the sender's burst of 500
    assert r["penalties"] == {"dev-evil": 1}
    # what reached the aggregator: the burst (500, and the refill), the message that tripped
    # the limit, and what the broker had queued before the UNSUBSCRIBE (dropped: penalized)
    assert r["rate_limited"] >= 1 and r["rounds_during_flood"] >= 1
    assert 500 + r["rate_limited"] + r["penalized"] <= r["reached_aggregator"]
    assert r["reached_aggregator"] <= r["flood_messages"]
    assert r["quiet_round_median_s"] > 0 and r["slowest_round_during_flood_s"] > 0
    assert table_row(r).startswith("| after | registered | ")
    assert (tmp_path / "report.json").is_file()
