"""Central DP at the aggregator, over the in-memory transport with real agents: epsilon in every
round line, summary.json's `privacy` block, state.json (what `status` and --resume read), and
the stop before a round would exceed --dp-target-epsilon (committed, resumable)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support.federation import CLIENTS, make_federation

from fedclip_edge.broker import protocol as P
from fedclip_edge.broker.prom import PromHooks
from fedclip_edge.broker.status import format_status, status_from_run_folder
from fedclip_edge.privacy import accountant as A
from fedclip_edge.privacy.central import CentralDP, CentralDPConfig, PrivacyBudgetSpent

Z, POPULATION, DELTA = 1.0, 30, 1e-3
Q = len(CLIENTS) / POPULATION  # three devices a round


def plugin(target: float | None = None, planned: int | None = 2) -> CentralDP:
    cfg = CentralDPConfig(noise_multiplier=Z, clip=0.5, population=POPULATION, delta=DELTA,
                          target_epsilon=target)
    dp = CentralDP(cfg, planned_rounds=planned, generator=torch.Generator().manual_seed(1))
    return dp


def test_aggregator_reports_epsilon_every_round_and_resumes_it(tmp_path: Path) -> None:
    dp = plugin()
    prom = PromHooks()
    _, agg, threads = make_federation(tmp_path, rounds=2, plugins=(dp,), hooks=prom)
    prom.bind(agg)
    assert prom.registry.get_sample_value("fedclip_dp_epsilon") == 0.0  # nothing spent yet
    lines: list[str] = []
    agg.log = lines.append
    dp.fleet_size = lambda: agg.roster.active_count  # as `aggregate` binds it
    agg.run()
    for th in threads:
        th.join(30)
    agg.t.close()
    eps = [A.epsilon(Z, Q, r, DELTA) for r in (1, 2)]
    round_lines = [ln for ln in lines if ln.startswith("round ") and "| DP eps" in ln]
    assert len(round_lines) == 2
    for line, e in zip(round_lines, eps, strict=True):
        assert f"DP eps {e:.3g} at delta 0.001 (z 1, C 0.5, q 0.1)" in line
    block = json.loads((tmp_path / "summary.json").read_text())["privacy"]
    assert block["epsilon"] == pytest.approx(eps[1])
    assert prom.registry.get_sample_value("fedclip_dp_epsilon") == pytest.approx(eps[1])
    assert (block["delta"], block["noise_multiplier"], block["clip"], block["population"],
            block["rounds"], block["expected_per_round"]) == (DELTA, Z, 0.5, POPULATION, 2, 3)
    assert block["sampling_rate"] == pytest.approx(Q)
    status = status_from_run_folder(tmp_path)
    assert status["privacy"]["epsilon"] == pytest.approx(eps[1])
    assert f"central DP: epsilon {eps[1]:.3g} at delta 0.001 after 2 round(s)" in \
        format_status({**status, "sources": {"out": str(tmp_path)}, "state": "done"})

    # --resume: the accountant comes back from state.json, exact
    again = plugin()
    _, resumed, _ = make_federation(tmp_path, rounds=2, plugins=(again,), resume=True,
                                    agents=False)
    resumed._init_state()
    assert again.rounds == 2 and again.epsilon == pytest.approx(eps[1])
    assert again.per_round == 3
    resumed.t.close()


def test_aggregator_stops_before_the_round_over_the_target_committed(tmp_path: Path) -> None:
    target = (A.epsilon(Z, Q, 2, DELTA) + A.epsilon(Z, Q, 3, DELTA)) / 2  # two rounds fit
    dp = plugin(target, planned=None)  # no plan: the per-round guard is what stops the job
    broker, agg, threads = make_federation(tmp_path, rounds=4, plugins=(dp,))
    dp.fleet_size = lambda: agg.roster.active_count
    with pytest.raises(PrivacyBudgetSpent, match="round 3 would take epsilon"):
        agg.run()
    for th in threads:
        th.join(30)
    assert not any(th.is_alive() for th in threads)  # the control said "done": agents ended
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["completed_round"] == 2
    assert state["plugins"][0]["central_dp"]["privacy"]["epsilon"] <= target
    assert P.decode_message(broker.retained[P.control_topic("j1")]).state == "done"
    agg.t.close()

    # a resumed job stops again at once: the budget is spent, nothing more is released
    again = plugin(target, planned=None)
    _, resumed, _ = make_federation(tmp_path, rounds=4, plugins=(again,), resume=True,
                                    agents=False)
    resumed._init_state()
    with pytest.raises(PrivacyBudgetSpent):
        resumed.engine.open(3, resumed.global_state)
    resumed.t.close()
