"""`demo --secure-aggregation` ends with the global adapter the same demo without it ends with
(plain fedavg; the demo is deterministic for a seed), within the fixed-point error."""

import pytest
import torch
from safetensors.torch import load_file

from fedclip_edge.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_secure_demo_matches_the_plain_demo(tmp_path, capsys):
    args = ["--rounds", "2", "--per-class", "4", "--seed", "0"]
    assert main(["demo", "--out", str(tmp_path / "plain"), "--strategy", "fedavg", *args]) == 0
    capsys.readouterr()
    assert main(["demo", "--out", str(tmp_path / "secure"), "--secure-aggregation", *args]) == 0
    printed = capsys.readouterr().out
    assert "secure aggregation: strategy fedavg" in printed
    assert "secure aggregation: the sum of 3 masked updates" in printed
    assert "round 2/2 | clients 3/3" in printed
    a = load_file(str(tmp_path / "plain" / "aggregator" / "global.safetensors"))
    b = load_file(str(tmp_path / "secure" / "aggregator" / "global.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), (k, float((a[k] - b[k]).abs().max()))
