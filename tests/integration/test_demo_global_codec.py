"""`demo --global-codec int8`: the MQTT demo with the compressed global down runs to its end,
its devices rebuild the deltas (each device's digest line names a delta global) and hold the
aggregator's final global."""

import re

import pytest
from safetensors.torch import load_file

from fedclip_edge.cli import main
from fedclip_edge.global_codec import state_digest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_with_a_compressed_global(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--global-codec", "int8", "--rounds", "3",
                 "--per-class", "4", "--seed", "0"]) == 0
    printed = capsys.readouterr().out
    assert "round 3/3 | clients 3/3" in printed, printed
    final = state_digest(load_file(str(out / "aggregator" / "global.safetensors")))
    logs = [p.read_text() for p in sorted((out / "agents").glob("dev-*.log"))]
    assert len(logs) == 3
    for text in logs:
        lines = re.findall(r"round (\d+): global ([0-9a-f]{64}) \((dense|delta)", text)
        assert any(kind == "delta" for _, _, kind in lines), text
        assert final in {digest for _, digest, _ in lines}, text


def test_inproc_demo_refuses_a_global_codec(tmp_path, capsys):
    assert main(["demo", "--inproc", "--out", str(tmp_path), "--global-codec", "int8"]) != 0
    err = capsys.readouterr().err
    assert "--global-codec is for the MQTT demo's aggregator" in err
