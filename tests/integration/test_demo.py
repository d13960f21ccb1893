"""The README's demo command, small: embedded broker, agents as processes, aggregator; and the
in-process variant. Slow when the offline model is not cached yet (it is built first)."""

import json

import pytest

from fedclip_edge.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_mqtt_demo_end_to_end(tmp_path, capsys):
    rc = main(["demo", "--out", str(tmp_path), "--rounds", "2", "--per-class", "5"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "embedded MQTT broker at mqtt://127.0.0.1:" in printed
    assert "round 2/2 | clients 3/3" in printed
    summary = json.loads((tmp_path / "aggregator" / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["client_rounds"] == 6
    lines = (tmp_path / "aggregator" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert {r["client"] for r in rows if "client" in r} == {
        "dev-art_painting",
        "dev-cartoon",
        "dev-sketch",
    }
    assert (tmp_path / "aggregator" / "latency.png").stat().st_size > 1000
    for client in ("dev-art_painting", "dev-cartoon", "dev-sketch"):
        assert (tmp_path / "agents" / f"{client}.log").read_text().strip()


def test_inproc_demo(tmp_path, capsys):
    rc = main(
        [
            "demo",
            "--inproc",
            "--out",
            str(tmp_path),
            "--rounds",
            "2",
            "--per-class",
            "5",
            "--seeds",
            "0",
            "1",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "FedCLIP on synthetic domains" in out
    for preset in ("reference", "learning"):
        s = json.loads((tmp_path / preset / "summary.json").read_text())
        assert s["seeds"] == [0, 1] and s["rounds"] == 2
