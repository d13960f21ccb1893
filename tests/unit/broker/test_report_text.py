"""What an operator reads: round lines with per-client and total bytes, the end-of-run table,
and plots that exist and are not drawn from nothing. Figures worked out by hand."""

import pytest

from fedclip_edge.broker import report as M
from fedclip_edge.tables import human_bytes, points, seconds, text_table


def _row(**kw):
    row = {
        "round": 3,
        "clients": ["a", "b", "c"],
        "active": ["a", "b", "c"],
        "mean_loss": 0.5,
        "personalization_acc": 0.6,
        "global_test_acc": 0.55,
        "heldout_acc": 0.5,
        "latency_p50_s": 0.045,
        "latency_max_s": 2.8,
        "bytes_down": 399_000,
        "bytes_up": 399_600,
        "round_wall_s": 3.0,
        "rejected": {"rejected_stale": 1},
    }
    row.update(kw)
    return row


def test_round_line_says_per_client_and_total():
    line = M.round_line(_row(), 15)
    assert "round 3/15 | clients 3/3" in line
    assert "down 133 kB/client (399 kB total)" in line
    assert "up 133 kB/client (400 kB total)" in line
    assert "latency p50 45 ms max 2.80 s" in line
    assert "acc local 60.0% global 55.0% held-out 50.0%" in line
    assert "rejected 1" in line


def test_round_line_one_client_has_no_total():
    line = M.round_line(_row(clients=["a"], active=["a"], bytes_down=133_000), 2)
    assert "down 133 kB/client |" in line or "down 133 kB/client up" in line
    assert "total" not in line.split("| up")[0].split("down")[-1]


def test_number_formats():
    assert human_bytes(999) == "999 B"
    assert human_bytes(1500) == "1.5 kB"
    assert human_bytes(133_000) == "133 kB"
    assert human_bytes(2_100_000) == "2.1 MB"
    assert human_bytes(None) == "-"
    assert points(0.021) == "+2.1"
    assert points(-0.004) == "-0.4"
    assert seconds(0.0456) == "46 ms"
    assert seconds(2.8) == "2.80 s"


def test_text_table_aligns_and_rejects_ragged_rows():
    lines = text_table(["client", "acc"], [["a", "50.0%"], ["long-name", "5.0%"]])
    assert lines[0] == "client       acc"
    assert lines[2] == "a          50.0%"
    assert lines[3] == "long-name   5.0%"
    with pytest.raises(ValueError):
        text_table(["a", "b"], [["only one"]])


def _run(rounds=3):
    """Two clients; a's figures chosen so every table cell is known by hand."""
    recs = []
    for r in range(1, rounds + 1):
        for c, lat, zs in (("a", 0.1 * r, 0.40), ("b", 0.2, 0.80)):
            rec = {
                "kind": "client",
                "client": c,
                "round": r,
                "global_test_acc": 0.40 + 0.01 * (r - 1),
                "local_test_acc": 0.41 + 0.01 * r if c == "a" else 0.79,
                "bytes_down": 1000 * r,
                "bytes_up": 2000,
                "update_latency_s": lat,
            }
            if r == 1:
                rec["zero_shot_acc"] = zs
            recs.append(rec)
        recs.append({"kind": "round", "round": r, "heldout_acc": 0.50 + 0.01 * r})
    return recs


def test_final_rows_by_hand():
    rows = M.final_rows(_run())
    a, b = rows["a"], rows["b"]
    assert a["zero_shot_acc"] == 0.40 and a["last_round"] == 3
    assert a["local_test_acc"] == pytest.approx(0.44)
    assert a["global_test_acc"] == pytest.approx(0.42)
    assert a["gain"] == pytest.approx(0.04)
    assert a["bytes_down_per_round"] == pytest.approx(2000)  # (1000 + 2000 + 3000) / 3
    # round 1 (feature extraction) apart; percentiles over rounds 2 and 3: 0.2 and 0.3
    assert a["latency_first_s"] == pytest.approx(0.1)
    assert a["latency_p50_s"] == pytest.approx(0.25)
    assert a["latency_p95_s"] == pytest.approx(0.295)  # 0.2 + 0.95 * (0.3 - 0.2)
    assert b["gain"] == pytest.approx(-0.01)


def test_final_table_rows_and_heldout():
    lines = M.final_table(_run(), heldout_name="photo", heldout_zero_shot=0.5)
    assert lines[0].startswith("result after round 3")
    header = lines[1].split()
    assert header[:5] == ["client", "zero-shot", "global", "local", "gain"]
    a = lines[3].split()
    assert a[:5] == ["a", "40.0%", "42.0%", "44.0%", "+4.0"]
    assert a[5:9] == ["2", "kB", "2", "kB"] and a[9:] == ["250", "ms", "295", "ms", "100", "ms"]
    held = next(line for line in lines if line.startswith("photo (held out)")).split()
    assert held[3:6] == ["50.0%", "53.0%", "-"] and held[6] == "+3.0"


def test_final_table_without_zero_shot_or_clients():
    recs = [r for r in _run() if "zero_shot_acc" not in r]
    a = M.final_table(recs)[3].split()
    assert a[1] == "-" and a[4] == "-"  # no zero-shot reported: no gain invented
    assert M.final_table([]) == ["no client finished a round: nothing to report"]


def test_plots_are_written_and_accuracy_needs_accuracy(tmp_path):
    assert M.plot(_run(), tmp_path / "latency.png").stat().st_size > 1000
    assert (
        M.plot_accuracy(_run(), tmp_path / "acc.png", heldout_zero_shot=0.5).stat().st_size > 1000
    )
    no_acc = [{"kind": "client", "client": "a", "round": 1, "update_latency_s": 0.1}]
    assert M.plot_accuracy(no_acc, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_write_reports_adds_final_and_both_plots(tmp_path):
    M.append_metrics(tmp_path / "metrics.jsonl", _run())
    M.write_reports(tmp_path, {"eval_domain": "photo", "heldout_zero_shot": 0.5})
    import json

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final"]["a"]["gain"] == pytest.approx(0.04)
    assert (tmp_path / "latency.png").is_file() and (tmp_path / "accuracy.png").is_file()
