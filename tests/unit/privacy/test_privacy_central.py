"""Central DP (DP-FedAvg) as a round-engine plug-in: clipping and noise worked out by hand,
epsilon against dp-accounting computed here directly, the target-epsilon refusal and stop, and
simulate's summary.json `privacy` block."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fedclip_edge.config import SimulationConfig, train_config
from fedclip_edge.errors import ConfigError
from fedclip_edge.features import DomainFeatures, FeatureSet
from fedclip_edge.privacy import accountant as A
from fedclip_edge.privacy.central import (
    CentralDP,
    CentralDPConfig,
    PrivacyBudgetSpent,
    count_stddev,
    dp_config,
    dp_strategy,
)
from fedclip_edge.privacy.dp import split_noise_multiplier
from fedclip_edge.rounds import RoundEngine, Update
from fedclip_edge.simulate import simulate
from fedclip_edge.strategy import make_strategy


def engine_with(dp: CentralDP) -> RoundEngine:
    return RoundEngine(make_strategy("fedavg"), plugins=(dp,))


def one_round(engine: RoundEngine, number: int, glob: dict, updates: list[dict]) -> dict:
    rnd = engine.open(number, glob)
    for i, state in enumerate(updates):
        rnd.add(Update(f"d{i}", state, samples=1))
    return engine.close(rnd).state


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_a_delta_of_norm_10_is_clipped_to_1_and_divided_by_the_expected_count() -> None:
    glob = {"w": torch.tensor([1.0, 1.0]), "b": torch.zeros(1)}
    # delta (6, 8, 0): norm 10, clipped to C = 1 -> (0.6, 0.8, 0)
    big = {"w": torch.tensor([7.0, 9.0]), "b": torch.zeros(1)}
    small = {"w": torch.tensor([1.3, 1.0]), "b": torch.tensor([0.4])}  # norm 0.5: unchanged
    dp = CentralDP(CentralDPConfig(noise_multiplier=0.0, clip=1.0, per_round=4, delta=1e-3),
                   generator=seeded())
    out = one_round(engine_with(dp), 1, glob, [big, small])
    # no noise; the sum (0.9, 0.8, 0.4) over the EXPECTED 4 devices, not the 2 that answered
    assert torch.allclose(out["w"], torch.tensor([1 + 0.9 / 4, 1 + 0.8 / 4]))
    assert torch.allclose(out["b"], torch.tensor([0.4 / 4]))
    assert dp.epsilon is None and dp.rounds == 1  # z = 0: no finite epsilon


def test_noise_std_is_z_times_c_over_the_expected_count() -> None:
    n = 200_000
    glob = {"w": torch.zeros(n)}
    z, clip, expected = 2.0, 0.5, 4
    dp = CentralDP(CentralDPConfig(noise_multiplier=z, clip=clip, per_round=expected),
                   generator=seeded(7))
    out = one_round(engine_with(dp), 1, glob, [{"w": torch.zeros(n)}] * expected)
    std = float(out["w"].std())
    assert std == pytest.approx(z * clip / expected, rel=0.01)  # 0.25, over 200,000 draws
    assert abs(float(out["w"].mean())) < 5 * 0.25 / math.sqrt(n)
    # the same seed gives the same noise (simulate is reproducible)
    again = CentralDP(CentralDPConfig(noise_multiplier=z, clip=clip, per_round=expected),
                      generator=seeded(7))
    assert torch.equal(one_round(engine_with(again), 1, glob, [{"w": torch.zeros(n)}] * 4)["w"],
                       out["w"])


def test_adaptive_clipping_raises_the_deltas_noise_to_pay_for_the_count() -> None:
    n = 100_000
    glob = {"w": torch.zeros(n)}
    z, clip = 1.0, 1.0
    cfg = CentralDPConfig(noise_multiplier=z, clip=clip, per_round=1, adaptive=True, delta=0.5)
    dp = CentralDP(cfg, generator=seeded(3))
    out = one_round(engine_with(dp), 1, glob, [{"w": torch.zeros(n)}])
    sigma_b = count_stddev(z, 1.0)
    assert sigma_b == pytest.approx(z / (2 * math.sqrt(0.1)))  # the floor: a tenth of the budget
    z_delta = split_noise_multiplier(z, sigma_b)
    assert z_delta == pytest.approx(z / math.sqrt(0.9))
    assert float(out["w"].std()) == pytest.approx(z_delta * clip, rel=0.02)
    # the delta (norm 0) was under C: the noised count pulls C down (toward the median norm)
    # unless the count's noise overwhelmed it; accounted at the stated z either way
    assert dp.clip != clip
    assert dp.epsilon == pytest.approx(A.epsilon(z, 1.0, 1, 0.5))


def test_epsilon_matches_dp_accounting_computed_directly() -> None:
    import dp_accounting
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.rdp import RdpAccountant

    z, per_round, population, rounds, delta = 1.1, 10, 100, 5, 1e-5
    for kind in ("rdp", "pld"):
        cfg = CentralDPConfig(noise_multiplier=z, clip=1.0, per_round=per_round,
                              population=population, delta=delta, accountant=kind)
        dp = CentralDP(cfg, generator=seeded())
        engine = engine_with(dp)
        glob = {"w": torch.zeros(3)}
        for r in range(1, rounds + 1):
            one_round(engine, r, glob, [{"w": torch.ones(3)}])
        # the library's own accountant, one event per round (our code self-composes)
        acc = (RdpAccountant(list(A.DEFAULT_ORDERS)) if kind == "rdp" else PLDAccountant())
        for _ in range(rounds):
            acc.compose(dp_accounting.PoissonSampledDpEvent(
                per_round / population, dp_accounting.GaussianDpEvent(z)))
        assert dp.epsilon == pytest.approx(acc.get_epsilon(delta), rel=1e-6), kind
        assert dp.privacy()["sampling_rate"] == 0.1 and dp.privacy()["rounds"] == rounds
    # and within 2% of the RDP accountant with the library's default orders
    lib = RdpAccountant()
    lib.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
        0.1, dp_accounting.GaussianDpEvent(z)), rounds))
    rdp = A.epsilon(z, 0.1, rounds, delta)
    assert rdp == pytest.approx(lib.get_epsilon(delta), rel=0.02)


def test_resumed_accountant_is_exact_across_changed_parameters() -> None:
    cfg = CentralDPConfig(noise_multiplier=1.0, per_round=10, population=100, delta=1e-5)
    dp = CentralDP(cfg, generator=seeded())
    glob = {"w": torch.zeros(2)}
    for r in (1, 2, 3):
        one_round(engine_with(dp), r, glob, [{"w": torch.ones(2)}])
    saved = json.loads(json.dumps(dp.state_dict()))
    # resumed with another noise multiplier: the schedule has two segments
    other = CentralDP(CentralDPConfig(noise_multiplier=2.0, per_round=10, population=100,
                                      delta=1e-5), generator=seeded())
    other.load_state_dict(saved)
    assert other.epsilon == pytest.approx(dp.epsilon)
    one_round(engine_with(other), 4, glob, [{"w": torch.ones(2)}])
    assert other.segments == [[1.0, 0.1, 3], [2.0, 0.1, 1]]
    assert other.epsilon == pytest.approx(A.schedule_epsilon([(1.0, 0.1, 3), (2.0, 0.1, 1)],
                                                             1e-5))
    assert A.epsilon(1.0, 0.1, 3, 1e-5) < other.epsilon < A.epsilon(1.0, 0.1, 4, 1e-5)


def test_target_epsilon_stops_before_the_round_that_would_exceed_it() -> None:
    z, q, delta = 1.0, 0.1, 1e-2
    target = (A.epsilon(z, q, 3, delta) + A.epsilon(z, q, 4, delta)) / 2  # 3 rounds fit
    cfg = CentralDPConfig(noise_multiplier=z, per_round=10, population=100, delta=delta,
                          target_epsilon=target)
    dp = CentralDP(cfg, generator=seeded())  # no plan given: the per-round guard alone
    engine, glob = engine_with(dp), {"w": torch.zeros(2)}
    for r in (1, 2, 3):
        one_round(engine, r, glob, [{"w": torch.ones(2)}])
    with pytest.raises(PrivacyBudgetSpent, match="round 4 would take epsilon"):
        engine.open(4, glob)
    assert dp.rounds == 3 and dp.epsilon <= target
    # with a plan, a job of 4 rounds is refused before its first round
    planned = CentralDP(cfg, planned_rounds=4, generator=seeded())
    with pytest.raises(ConfigError, match="4 rounds would spend epsilon .* 3 rounds fit"):
        engine_with(planned).open(1, glob)
    CentralDP(cfg, planned_rounds=3, generator=seeded()).check_plan()  # 3 fit


def test_options_refused_with_one_line() -> None:
    with pytest.raises(ConfigError, match="--dp-clip, --dp-population need --dp-noise"):
        dp_config(None, clip=1.0, population=10)
    assert dp_config(None) is None
    assert dp_config(1.0).clip == 0.2  # the documented default
    with pytest.raises(ConfigError, match="exceed the population"):
        dp_config(1.0, per_round=11, population=10)
    with pytest.raises(ConfigError, match="needs --dp-noise-multiplier > 0"):
        dp_config(0.0, target_epsilon=3.0)
    with pytest.raises(ConfigError, match="strategy 'median' is refused"):
        dp_strategy("median", "uniform")
    with pytest.raises(ConfigError, match="--weighting samples is refused"):
        dp_strategy("fedavg", "samples")
    name, note = dp_strategy("fedavg-clip", "uniform")
    assert name == "fedavg" and "replaced by DP's clip" in note


# ----------------------------------------------------------------------------- simulate

def tiny_features(dim: int = 16, per_domain: int = 30) -> FeatureSet:
    g = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(3, dim, generator=g), dim=-1)
    domains = {}
    for name in ("a", "b", "c", "held"):
        labels = torch.arange(per_domain) % 3
        feats = torch.nn.functional.normalize(
            text[labels] + 0.8 * torch.randn(per_domain, dim, generator=g), dim=-1)
        domains[name] = DomainFeatures(name, feats, labels, ["x"] * per_domain,
                                       torch.zeros(per_domain, 32, dtype=torch.uint8))
    return FeatureSet({}, ["c0", "c1", "c2"], text, 10.0, domains)


def test_simulate_reports_epsilon_in_summary_json(tmp_path: Path) -> None:
    fs = tiny_features()
    dp = dp_config(1.5, clip=0.1, population=30)
    cfg = SimulationConfig(test_domain="held", rounds=3, seeds=(0,), train=train_config("learning"),
                           strategy="fedavg-clip", dp=dp)
    lines: list[str] = []
    summary = simulate(fs, cfg, tmp_path, log=lines.append)
    block = json.loads((tmp_path / "summary.json").read_text())["privacy"]
    q = 3 / 30  # three training clients a round of a population of 30
    assert block["epsilon"] == pytest.approx(A.epsilon(1.5, q, 3, 1 / 30))
    assert {k: block[k] for k in ("delta", "noise_multiplier", "clip", "population",
                                  "sampling_rate", "rounds")} == {
        "delta": pytest.approx(1 / 30), "noise_multiplier": 1.5, "clip": 0.1,
        "population": 30, "sampling_rate": pytest.approx(q), "rounds": 3}
    assert block["accountant"].startswith("dp-accounting RDP")
    assert summary["strategy"]["name"] == "fedavg"  # fedavg-clip's clipping replaced by DP's
    assert sum("DP eps" in line for line in lines) == 3
    assert [h["epsilon"] for h in summary["history"]] == sorted(h["epsilon"]
                                                                for h in summary["history"])
    # reproducible: the same seed gives the same summary
    again = simulate(fs, cfg, None, log=lambda s: None)
    assert again["per_seed"][0]["history"] == summary["per_seed"][0]["history"]


def test_simulate_refuses_a_plan_over_the_target(tmp_path: Path) -> None:
    fs = tiny_features()
    dp = dp_config(0.5, population=3, target_epsilon=1.0)  # q = 1, z = 0.5: one round > 1
    cfg = SimulationConfig(test_domain="held", rounds=2, train=train_config("learning"),
                           strategy="fedavg", dp=dp)
    with pytest.raises(ConfigError, match="2 rounds would spend epsilon"):
        simulate(fs, cfg, tmp_path, log=lambda s: None)
    assert not (tmp_path / "summary.json").exists()
    with pytest.raises(ConfigError, match="central DP is DP-FedAvg"):
        SimulationConfig(test_domain="held", strategy="trimmed-mean", dp=dp_config(1.0))


def test_many_sampled_clients_make_q_the_simulations_own_rate(tmp_path: Path) -> None:
    from fedclip_edge.data.devices import poisson_sample, split_domains

    fs = split_domains(tiny_features(), 3, keep="held")
    assert sorted(fs.domains) == ["a-0", "a-1", "a-2", "b-0", "b-1", "b-2", "c-0", "c-1", "c-2",
                                  "held"]
    assert sum(len(fs.domains[f"a-{i}"]) for i in range(3)) == 30  # dealt, none lost
    # Poisson sampling: about q of the clients each round
    g = torch.Generator().manual_seed(0)
    clients = [f"c{i}" for i in range(100)]
    sizes = [len(poisson_sample(clients, 10, g)) for _ in range(400)]
    assert sum(sizes) / len(sizes) == pytest.approx(10, rel=0.05)
    assert len(set(sizes)) > 5  # not a fixed count

    cfg = SimulationConfig(test_domain="held", rounds=2, train=train_config("learning"),
                           strategy="fedavg", dp=dp_config(1.0), clients_per_round=3)
    summary = simulate(fs, cfg, None, log=lambda s: None)
    block = summary["privacy"]
    assert (block["population"], block["expected_per_round"]) == (9, 3)
    assert block["sampling_rate"] == pytest.approx(1 / 3)
    assert block["epsilon"] == pytest.approx(A.epsilon(1.0, 1 / 3, 2, 1 / 9))
    trained = [len(h["train_loss"]) for h in summary["history"]]
    assert all(1 <= n <= 9 for n in trained)
    with pytest.raises(ConfigError, match="population is 9"):
        simulate(fs, SimulationConfig(test_domain="held", rounds=1, clients_per_round=3,
                                      dp=dp_config(1.0, population=100)), None,
                 log=lambda s: None)


def test_a_job_file_turns_central_dp_on_for_aggregate(tmp_path: Path) -> None:
    from fedclip_edge.jobconfig import parse_job_config

    cfg = parse_job_config("[aggregator]\ndp_noise_multiplier = 1.0\ndp_population = 50\n"
                           "dp_target_epsilon = 8.0\n", tmp_path)
    opts = cfg.options("aggregate")
    assert (opts["dp_noise_multiplier"], opts["dp_population"], opts["dp_target_epsilon"]) == \
        (1.0, 50, 8.0)
    assert "dp_noise_multiplier" not in cfg.options("agent")  # the agent's is local DP's


def test_dp_cannot_be_switched_on_in_the_middle_of_a_job() -> None:
    dp = CentralDP(CentralDPConfig(noise_multiplier=1.0, per_round=2, population=10),
                   generator=seeded())
    with pytest.raises(ConfigError, match="round 3 opens with 0 round"):
        engine_with(dp).open(3, {"w": torch.zeros(2)})  # a resumed job that ran without DP


def test_command_lines_refuse_dp_where_it_does_not_apply(tmp_path: Path, capsys) -> None:
    from fedclip_edge.cli import main

    cases = [
        (["demo", "--out", str(tmp_path / "d"), "--dp-noise-multiplier", "1"], "for --inproc"),
        (["aggregate", "--broker", "mqtt://127.0.0.1:1", "--job", "j", "--rounds", "3",
          "--out", str(tmp_path / "a"), "--insecure-unsigned", "--dp-noise-multiplier", "1",
          "--strategy", "median"], "strategy 'median' is refused"),
        (["aggregate", "--broker", "mqtt://127.0.0.1:1", "--job", "j", "--rounds", "300",
          "--out", str(tmp_path / "a"), "--insecure-unsigned", "--dp-noise-multiplier", "1",
          "--dp-per-round", "3", "--dp-population", "30", "--dp-target-epsilon", "2"],
         "300 rounds would spend epsilon 7.13 > --dp-target-epsilon 2"),
    ]
    for argv, says in cases:
        assert main(argv) == 6, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and says in err[0], err
    assert not (tmp_path / "a").exists()  # refused before anything was written


def test_simulate_with_central_dp_and_a_compressed_global(tmp_path: Path) -> None:
    """Both plugins in one engine: DP noises the global, then the global codec sends its change
    (the codec's plugin last); epsilon is reported as without it, the downlink counted as deltas."""
    fs = tiny_features()
    base = dict(test_domain="held", rounds=3, seeds=(0,), train=train_config("learning"),
                strategy="fedavg", dp=dp_config(1.5, clip=0.1, population=30))
    plain = simulate(fs, SimulationConfig(**base), None, log=lambda s: None)
    both = simulate(fs, SimulationConfig(**base, global_codec="int8"), tmp_path,
                    log=lambda s: None)
    block = json.loads((tmp_path / "summary.json").read_text())["privacy"]
    assert block["epsilon"] == pytest.approx(A.epsilon(1.5, 3 / 30, 3, 1 / 30))
    assert both["global_codec"] == "int8"
    # a delta frame's header outweighs this toy adapter (dim 4): the downlink is counted apart
    assert both["down_bytes_per_client_per_round"] != plain["down_bytes_per_client_per_round"]
    assert [h["epsilon"] for h in both["history"]] == [h["epsilon"] for h in plain["history"]]
