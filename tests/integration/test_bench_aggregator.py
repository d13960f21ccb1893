"""`bench aggregator` on a small run: JSON structure, zero loss, and a hand-checkable mean.

Why: the benchmark's headline is "N devices, no loss, streaming aggregation"; this checks that
the figures it reports come from a round that really aggregated every update, and that the
result is the mean of what was sent (antithetic pairs: global + d, global - d, so the mean is
the global adapter itself).
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support import mqtt as mqtt_helpers

from fedclip_edge.benchmarks.aggregator import (
    SCHEMA,
    _initial_global,
    make_updates,
    run_bench,
)
from fedclip_edge.wire import decode_frame

pytestmark = [pytest.mark.integration, pytest.mark.mosquitto]

N, DIM = 20, 64


def test_updates_are_valid_and_their_mean_is_the_global():
    ids, payloads, g, mean = make_updates(5, 8, seed=3, job="j")
    from fedclip_edge.broker import protocol as P

    frames = []
    for cid, payload in zip(ids, payloads, strict=True):
        up = P.decode_message(payload)
        assert isinstance(up, P.Update) and up.client == cid and up.round == 1
        frames.append(decode_frame(up.frame, expected={k: v.shape for k, v in g.items()}).tensors)
    for k in g:
        # pairs (g + d, g - d) and the unpaired 5th device = g: mean == g up to float32 rounding
        manual = sum(f[k].double() for f in frames) / 5
        assert torch.allclose(manual, mean[k], atol=1e-12)
        assert torch.allclose(manual, g[k].double(), atol=1e-6)
        assert not torch.equal(frames[0][k], frames[1][k])  # updates do differ


def test_small_run_through_mosquitto(tmp_path):
    mqtt_helpers.require_mosquitto()
    report = run_bench(
        [N], tmp_path, broker_kind="mosquitto", dim=DIM, publishers=3, timeout_s=90.0,
        keep=True, log=lambda m: None,
    )
    saved = json.loads((tmp_path / "bench_aggregator.json").read_text())
    assert saved["schema"] == SCHEMA and saved["complete"] and saved["zero_loss"]
    for key in ("machine", "config", "broker", "simulation", "findings", "rows"):
        assert key in saved, key
    assert saved["broker"]["kind"].startswith("private mosquitto")
    assert saved["machine"]["cpu_count"] >= 1
    (row,) = saved["rows"]
    assert row["ok"], row["error"]
    assert row["registered"] == N and row["sent"] == N and row["accepted"] == N
    assert row["loss"] == 0 and row["received_by_aggregator"] == N
    assert not row["rejected"] and not row["transport_rejected"]
    assert row["params"] == 2 * (DIM * DIM + DIM)
    for key in ("updates_per_s", "round_wall_s", "transfer_s", "aggregator_peak_rss"):
        assert row[key] is not None and row[key] > 0, key
    assert row["overhead_s"] == pytest.approx(row["round_wall_s"] - row["transfer_s"])
    assert row["mean_max_abs_err"] < 1e-6 and row["global_max_abs_err"] < 1e-6
    # the aggregator's committed adapter, checked here by hand as well
    agg_dir = Path(report["workdir"]) / row["job"] / "agg"
    result = load_file(str(agg_dir / "rounds" / "global_r0001.safetensors"))
    g = _initial_global(DIM, 0)
    assert set(result) == set(g)
    for k in g:
        assert torch.allclose(result[k], g[k], atol=1e-6), k
