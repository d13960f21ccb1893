"""The chaos soak, short: 4 agents, 6 rounds, every fault kind once, then the reconciliation.

The long run (8 agents, 100 rounds) is `fedclip-edge bench soak`; its figures are in
docs/reliability.md. Here the run must reconcile: nothing lost, every committed global the mean
of its accepted updates, no process left.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import mqtt as mh

from fedclip_edge.benchmarks.soak import (
    FAULT_KINDS,
    SoakConfig,
    figures_line,
    plan_faults,
    run_soak,
    signing_hook_reason,
)
from fedclip_edge.errors import ConfigError


def test_schedule_is_seeded_and_has_every_kind() -> None:
    a = plan_faults(SoakConfig(out=Path("x"), agents=4, rounds=6, seed=3))
    b = plan_faults(SoakConfig(out=Path("x"), agents=4, rounds=6, seed=3))
    c = plan_faults(SoakConfig(out=Path("x"), agents=4, rounds=6, seed=4))
    assert [(f.after_round, f.kind, f.target) for f in a] == [
        (f.after_round, f.kind, f.target) for f in b
    ]
    assert [(f.after_round, f.target) for f in a] != [(f.after_round, f.target) for f in c]
    assert sorted({f.kind for f in a}) == sorted(FAULT_KINDS)
    assert all(1 <= f.after_round <= 5 for f in a)
    long = plan_faults(SoakConfig(out=Path("x"), agents=8, rounds=100))
    assert sum(f.kind == "kill_agent" for f in long) == 6
    assert all(f.target in {f"dev-{i}" for i in range(8)} for f in long if f.kind == "kill_agent")


def test_bad_config_is_one_clear_error() -> None:
    with pytest.raises(ConfigError, match="unknown fault kind"):
        SoakConfig(out=Path("x"), kinds=("kill_agent", "flood"))
    with pytest.raises(ConfigError, match="at least 2 agents"):
        SoakConfig(out=Path("x"), agents=1)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.mosquitto
def test_short_soak_reconciles(tmp_path: Path) -> None:
    mh.require_mosquitto()
    report = run_soak(SoakConfig(out=tmp_path / "soak", agents=4, rounds=6, seed=0,
                                 min_clients=2, timeout_s=900), log=print)
    print(report["line"])
    assert report == json.loads((tmp_path / "soak" / "soak.json").read_text())
    assert report["checks"] == {k: True for k in report["checks"]}, (report["error"], report)
    assert report["ok"]
    assert report["rounds_committed"] == 6 and report["lost"] == []
    # the faults landed: each kill restarted what it killed; junk was refused with a reason
    injected = report["faults_injected"]
    for kind in ("kill_agent", "restart_broker", "kill_aggregator", "garbage"):
        assert injected.get(kind, 0) >= 1, (kind, report["schedule"])
    assert report["aggregators_started"] == 1 + injected["kill_aggregator"]
    assert report["brokers_started"] == 1 + injected["restart_broker"]
    assert report["agent_starts"] == 4 + injected["kill_agent"]
    assert sum(report["rejected_by_reason"].values()) >= injected["garbage"] + injected.get(
        "replay", 0)
    if injected.get("replay"):
        assert report["rejected_by_reason"].get("stale", 0) >= injected["replay"]
    assert report["updates_sent"] >= 6 * 2 and report["accepted"] >= 6 * 2
    if signing_hook_reason() is not None:
        assert report["faults_not_injected"]["foreign_signed"].startswith("skipped: ")
    assert figures_line(report) == report["line"] and "lost 0" in report["line"]
