"""`bench secagg` at a few devices and a tiny adapter: its byte accounting is the protocol's
(a masked vector is 8 B a coordinate, n - 1 share ciphertexts up, all n (n - 1) down in the
deal), the secure globals equal the plain ones, and the dropout run completes with the devices
it dropped left out or kept as the protocol says.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedclip_edge.benchmarks.secagg import drop_plan, render, run_bench
from fedclip_edge.errors import ConfigError

N, DIM, ROUNDS = 6, 8, 2
PARAMS = 2 * DIM * DIM + 2 * DIM  # AttentionAdapter(8): two 8x8 layers and their biases
CT = 216  # a share ciphertext in base64: nonce 12 + two 66-byte shares + tag 16 = 160 bytes
SHARE = 88  # one revealed share in base64 (66 bytes)
HEADER = 1200  # an envelope's JSON header, its signature included, is below this


def test_drop_plan_cycles_steps_and_devices() -> None:
    plan = drop_plan(10, 3, 0.1, ("shares", "masked"))
    assert plan == {(1, "sa0000"): "shares", (2, "sa0001"): "masked", (3, "sa0002"): "shares"}
    plan = drop_plan(100, 1, 0.1, ("shares", "masked"))
    assert sorted(plan.values()) == ["masked"] * 5 + ["shares"] * 5
    assert drop_plan(10, 2, 0.0, ("keys",)) == {}


def test_bench_accounting_sum_check_and_dropouts(tmp_path: Path) -> None:
    report = run_bench([N], tmp_path, dims=[DIM], rounds=ROUNDS, dropout=0.3,
                       drop_after=("shares", "masked"), log=lambda line: None)
    saved = json.loads((tmp_path / "bench_secagg.json").read_text())
    assert saved["complete"] and saved["machine"]["load_average_before"]
    plain, secure, dropped = report["rows"]
    assert [r["run"] for r in report["rows"]] == ["plain", "secure", "secure-dropout"]

    # plain: one fp32 frame up (and its `uploaded` status), the global down
    up = plain["bytes_up_by_kind"]
    assert set(up) == {"update", "status:uploaded"}
    assert 4 * PARAMS < up["update"] < 4 * PARAMS + 2 * HEADER
    assert 4 * PARAMS < plain["bytes_down_by_kind"]["global"] < 4 * PARAMS + 2 * HEADER

    # secure, per device per round: keys, n - 1 ciphertexts, 8 B a coordinate, n b-shares up;
    # the roster, the whole deal (n (n - 1) ciphertexts), the survivors and the global down
    up, down = secure["bytes_up_by_kind"], secure["bytes_down_by_kind"]
    assert set(up) == {"secagg:keys", "secagg:shares", "secagg:masked", "secagg:reveal"}
    assert 8 * PARAMS < up["secagg:masked"] < 8 * PARAMS + HEADER
    assert (N - 1) * CT < up["secagg:shares"] < (N - 1) * (CT + 16) + HEADER
    assert N * SHARE < up["secagg:reveal"] < N * (SHARE + 16) + HEADER
    assert up["secagg:keys"] < HEADER
    assert set(down) == {"global", "secagg:roster", "secagg:deal", "secagg:survivors"}
    assert N * (N - 1) * CT < down["secagg:deal"] < N * (N - 1) * (CT + 16) + HEADER
    assert down["global"] == plain["bytes_down_by_kind"]["global"]
    assert secure["bytes_up_per_device_round"] == pytest.approx(sum(up.values()))
    assert secure["device_calls"] == {"keys": N * ROUNDS, "roster": N * ROUNDS,
                                      "deal": N * ROUNDS, "survivors": N * ROUNDS}
    assert secure["device_mask_ms"] > 0 and secure["aggregator_cpu_ms_per_round"] > 0
    assert secure["ratio_bytes_up_per_device_round"] == pytest.approx(
        secure["bytes_up_per_device_round"] / plain["bytes_up_per_device_round"])

    # the sum check: every run's globals are the mean of its contributors' deltas; secure = plain
    for row in report["rows"]:
        assert row["max_abs_err_vs_expected_mean"] <= 1e-6
        assert not row["device_rejected"] and not row["aggregator_rejected"]
    assert secure["secure_vs_plain_max_abs_diff"] <= 1e-6
    assert secure["contributors"] == [N] * ROUNDS and secure["reveals"] == [N] * ROUNDS

    # dropouts (2 a round): one after its shares (in U2, not in the sum), one after its masked
    # vector (in the sum, never reveals); both back for the next round
    assert dropped["roster"] == [N] * ROUNDS and dropped["u2"] == [N] * ROUNDS
    assert dropped["contributors"] == [N - 1] * ROUNDS
    assert dropped["reveals"] == [N - 2] * ROUNDS
    assert dropped["rejoined"] == [0, 2]
    assert dropped["bytes_up_per_device_round"] < secure["bytes_up_per_device_round"]
    assert len(render(report["rows"])) == 2 + 3


def test_bench_refuses_what_it_cannot_measure(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least 3"):
        run_bench([2], None)
    with pytest.raises(ConfigError, match="--dim"):
        run_bench([4, 5], None, dims=[8, 8, 8])
    with pytest.raises(ConfigError, match="--drop-after"):
        run_bench([4], None, drop_after=("reveal",))
