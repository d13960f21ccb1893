"""The round engine on tensors small enough to check by hand: the order of a round, the seam
between collect and aggregate, selection, and the in-process fleet's codec round trip."""

from __future__ import annotations

import math

import pytest
import torch

from fedclip_edge.rounds import (
    BestRound,
    InProcessFleet,
    LastRound,
    OpenRound,
    RoundEngine,
    RoundPlugin,
    RoundResult,
    Update,
    Uplink,
)
from fedclip_edge.strategy import FedAvg, make_strategy


def state(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2, 2), value), "b": torch.full((2,), value)}


def fleet_of(values: dict[str, float], samples: int = 1) -> InProcessFleet:
    """Clients whose update is a constant adapter: value[client]."""
    return InProcessFleet(
        list(values), lambda rnd, i, c: Update(c, state(values[c]), samples, record={"i": i})
    )


def test_a_round_is_publish_collect_aggregate_evaluate_select_in_that_order() -> None:
    calls: list[str] = []

    class Fleet:
        def publish(self, rnd: OpenRound) -> None:
            calls.append(f"publish {rnd.number}")

        def collect(self, rnd: OpenRound) -> bool:
            calls.append("collect")
            rnd.add(Update("a", state(1.0), 1))
            rnd.add(Update("b", state(4.0), 1))
            return True

    def evaluate(s: dict[str, torch.Tensor]) -> dict[str, float]:
        calls.append("evaluate")
        return {"acc": float(s["b"][0])}

    engine = RoundEngine(FedAvg(), evaluate=evaluate)
    result = engine.run_round(7, state(0.0), Fleet())
    assert calls == ["publish 7", "collect", "evaluate"]
    assert result is not None and result.number == 7
    assert torch.equal(result.state["w"], torch.full((2, 2), 2.5))  # (1 + 4) / 2
    assert result.evaluation == {"acc": 2.5}
    assert list(result.answered) == ["a", "b"] and result.count == 2 and result.samples == 2


def test_too_few_updates_give_no_result() -> None:
    class Silent:
        def publish(self, rnd: OpenRound) -> None:
            pass

        def collect(self, rnd: OpenRound) -> bool:
            return False

    assert RoundEngine(FedAvg()).run_round(1, state(0.0), Silent()) is None


def test_plugins_sit_between_collect_and_aggregate_and_see_the_result() -> None:
    """on_update halves every update (as a clipping would scale it), on_aggregate adds 10 (as
    noise on the sum would), on_close sees the final result; their state survives a resume."""
    seen: list[RoundResult] = []

    class Halve(RoundPlugin):
        def __init__(self) -> None:
            self.updates = 0

        def on_update(self, rnd: OpenRound, update: Update) -> Update:
            self.updates += 1
            half = {k: v / 2 for k, v in update.state.items()}
            return Update(update.client, half, update.samples, update.weight, update.record)

        def on_aggregate(self, rnd: OpenRound, s: dict[str, torch.Tensor]) -> dict:
            return {k: v + 10 for k, v in s.items()}

        def on_close(self, result: RoundResult) -> None:
            seen.append(result)

        def state_dict(self) -> dict[str, int]:
            return {"updates": self.updates}

        def load_state_dict(self, st) -> None:  # type: ignore[no-untyped-def]
            self.updates = st["updates"]

    plugin = Halve()
    engine = RoundEngine(FedAvg("samples"), plugins=[plugin])
    result = engine.run_round(1, state(0.0), fleet_of({"a": 2.0, "b": 6.0}))
    assert result is not None
    # halved: 1 and 3, mean 2, plus 10
    assert torch.equal(result.state["b"], torch.full((2,), 12.0))
    assert seen == [result]
    assert engine.plugin_state() == [{"updates": 2}]
    again = Halve()
    RoundEngine(FedAvg(), plugins=[again]).load_plugin_state(engine.plugin_state())
    assert again.updates == 2


def test_a_weight_overrides_the_weighting_as_for_a_site() -> None:
    engine = RoundEngine(FedAvg("uniform"))
    rnd = engine.open(1, state(0.0))
    rnd.add(Update("site-1", state(1.0), 10, weight=3.0))
    rnd.add(Update("dev", state(5.0), 1))
    # (3 * 1 + 1 * 5) / 4 = 2
    assert torch.equal(engine.close(rnd).state["w"], torch.full((2, 2), 2.0))


def test_the_strategy_gets_the_rounds_global_for_deltas() -> None:
    """clip needs each update's delta to the round's global: each of the 6 entries moves from
    1 to 3, a delta of norm sqrt(6 * 2**2); bound 1 scales every entry's move to 2/sqrt(24)."""
    engine = RoundEngine(make_strategy("clip", bound=1.0))
    rnd = engine.open(1, state(1.0))
    rnd.add(Update("a", state(3.0), 1))
    out = engine.close(rnd).state
    step = 2.0 / math.sqrt(6 * 4)  # the clipped delta per entry
    assert torch.allclose(out["w"], torch.full((2, 2), 1.0 + step))


def test_best_round_keeps_the_earliest_best_and_never_a_nan() -> None:
    best = BestRound("v")
    for rnd, v in enumerate([float("nan"), 0.5, 0.7, 0.7, float("nan"), 0.6], start=1):
        best.consider(rnd, {"v": v}, state(float(rnd)))
    assert best.round == 3 and best.value == 0.7
    assert best.state is not None and float(best.state["w"][0, 0]) == 3.0
    only_nan = BestRound("v")
    only_nan.consider(1, {"v": float("nan")}, state(1.0))
    only_nan.consider(2, {"v": float("nan")}, state(2.0))
    assert only_nan.round == 1  # round 1 when nothing is finite


def test_last_round_is_the_aggregators_selection() -> None:
    last = LastRound()
    engine = RoundEngine(FedAvg(), select=last)
    for rnd in (1, 2):
        engine.run_round(rnd, state(0.0), fleet_of({"a": float(rnd)}))
    assert last.round == 2 and float(last.state["b"][0]) == 2.0  # type: ignore[index]


def test_the_uplink_decodes_a_delta_codec_against_the_rounds_global() -> None:
    """int8 of a delta: global 1, local 1 + d; the server gets back 1 + d within int8's step,
    and the client's error feedback keeps the rest for its next round."""
    engine = RoundEngine(FedAvg())
    glob = state(1.0)
    rnd = engine.open(3, glob)
    local = {"w": torch.tensor([[1.5, 1.25], [0.5, 1.0]]), "b": torch.tensor([1.0, 2.0])}
    up = Uplink("int8", job="j")
    got, nbytes = up.send(rnd, "a", local)
    assert nbytes > 0
    for k in local:
        step = float((local[k] - glob[k]).abs().max()) / 127
        assert torch.allclose(got[k], local[k], atol=step / 2 + 1e-7), k
    assert up.feedback["a"].norm() <= 1e-2
    fp32 = Uplink("fp32", job="j")
    same, _ = fp32.send(rnd, "a", local)
    assert all(torch.equal(same[k], local[k]) for k in local)


def test_the_open_round_refuses_an_update_that_does_not_match() -> None:
    engine = RoundEngine(FedAvg())
    rnd = engine.open(1, state(0.0))
    rnd.add(Update("a", state(1.0), 1))
    with pytest.raises(ValueError):
        rnd.add(Update("b", {"w": torch.zeros(3)}, 1))
    assert list(rnd.answered) == ["a"]  # the refused one is not counted as an answer
