"""Safe defaults (issue 22, item 3): what the command line runs unless told resists one scaled
update, and trimmed-mean refuses a trim that would drop nothing.

The red team's case: 3 devices, one sends its update x1e6; under the old default (`fedavg`)
held-out accuracy fell from 55.6% to 21.9%. Worked out here on small tensors by hand.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import typer.main

from fedclip_edge import cli
from fedclip_edge.errors import ConfigError
from fedclip_edge.strategy import (
    ADAPTIVE_CLIP_MULTIPLE,
    CLI_DEFAULT_STRATEGY,
    FedAvg,
    TrimmedMean,
    check_round_size,
    make_strategy,
)


def _w(*values: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values, dtype=torch.float64)}


def _cli_default(command: str) -> str:
    cli._register_parts()
    cmd = typer.main.get_command(cli.app).commands[command]
    (param,) = [p for p in cmd.params if p.name == "strategy"]
    return param.default


@pytest.mark.parametrize("command", ["simulate", "demo", "aggregate"])
def test_the_command_lines_default_resists_one_scaled_update(command: str) -> None:
    """global 0; honest deltas (1, 0), (0, 1), (1, 1); the third device sends x1e6.
    Under FedAvg the global moves ~4.7e5; under the default at most 3 x median norm / 3 + the
    honest mean's share, i.e. stays within a few units."""
    name = _cli_default(command)
    g = _w(0, 0)
    poisoned = [(_w(1, 0), 1), (_w(0, 1), 1), (_w(1e6, 1e6), 1)]
    new = make_strategy(name).aggregate(poisoned, g)
    moved = float(new["w"].norm())
    assert moved < 2.0, (name, new)
    assert float(FedAvg().aggregate(poisoned, g)["w"].norm()) > 1e5  # the attack is real


def test_fedavg_clip_by_hand() -> None:
    """Norms 1, 1, 1.414e6: low median 1, bound 3; the third delta is scaled to norm 3,
    i.e. (2.1213, 2.1213); mean of (1,0), (0,1), (2.1213, 2.1213) = (1.0404, 1.0404)."""
    acc = make_strategy("fedavg-clip").start_round()
    g = _w(0, 0)
    for state in (_w(1, 0), _w(0, 1), _w(1e6, 1e6)):
        acc.add(state, 5, g)
    got = acc.result(torch.float64)["w"]
    third = 3 / 2**0.5
    assert torch.allclose(got, torch.tensor([(1 + third) / 3] * 2, dtype=torch.float64))
    assert acc.used_bound == pytest.approx(3.0) and acc.clipped == 1


def test_fedavg_clip_is_fedavg_when_no_delta_is_far_out() -> None:
    """Honest deltas within 3x the median norm: exactly FedAvg (either weighting)."""
    g = _w(0.5, -0.5, 2.0)
    ups = [(_w(1, 2, 3), 10), (_w(-1, 0.5, 2.5), 30), (_w(0.2, 0.1, 4.0), 20)]
    for weighting in ("uniform", "samples"):
        want = FedAvg(weighting).aggregate(ups, g)["w"].double()
        got = make_strategy("fedavg-clip", weighting=weighting).aggregate(ups, g)["w"].double()
        assert torch.allclose(got, want, atol=1e-6), (weighting, got, want)


def test_fedavg_clip_with_two_clients_uses_the_low_median() -> None:
    """An honest device and an attacker: the median of two would be their mean (the attack
    would set its own bound); the low median is the honest norm."""
    g = _w(0, 0)
    new = make_strategy("fedavg-clip").aggregate([(_w(1, 0), 1), (_w(1e6, 0), 1)], g)
    assert float(new["w"][0]) == pytest.approx((1 + ADAPTIVE_CLIP_MULTIPLE) / 2)


def test_fedavg_itself_is_unchanged() -> None:
    new = FedAvg().aggregate([(_w(1, 0), 1), (_w(0, 1), 1), (_w(1e6, 1e6), 1)], _w(0, 0))
    assert torch.allclose(new["w"].double(), torch.tensor([(1e6 + 1) / 3] * 2, dtype=torch.float64))
    assert CLI_DEFAULT_STRATEGY == "fedavg-clip"


# ----------------------------------------------------------------------------- trimmed-mean


def test_a_trim_that_drops_nothing_is_refused_at_the_round() -> None:
    """trim 0.2 of 3 updates drops floor(0.6) = 0: before, the plain mean (the x1e6 update went
    through); now one clear refusal saying what would work."""
    ups = [(_w(1), 1), (_w(2), 1), (_w(1e6), 1)]
    with pytest.raises(ConfigError) as err:
        TrimmedMean(0.2).aggregate(ups)
    assert str(err.value) == (
        "trimmed-mean: trim 0.2 drops nothing from a round of 3 updates (floor(0.2 x 3) = 0): "
        "give --trim >= 0.34"
    )
    assert float(TrimmedMean(0.34).aggregate(ups)["w"][0]) == 2.0  # drops one at each end
    assert float(TrimmedMean(0.0).aggregate(ups)["w"][0]) == pytest.approx((3 + 1e6) / 3)


def test_a_trim_that_drops_nothing_is_refused_before_the_job_starts(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    check_round_size(TrimmedMean(0.2), 5)  # floor(1.0) = 1: fine
    with pytest.raises(ConfigError, match="round of 2 updates .* use median"):
        check_round_size(TrimmedMean(0.2), 2)
    rc = cli.main(["aggregate", "--broker", "mqtt://127.0.0.1:1", "--job", "j", "--rounds", "1",
                   "--out", str(tmp_path / "o"), "--insecure-unsigned", "--min-clients", "3",
                   "--strategy", "trimmed-mean", "--trim", "0.2"])
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err
    assert [ln for ln in err.splitlines() if ln.startswith("error:")] == [
        "error: trimmed-mean: trim 0.2 drops nothing from a round of 3 updates "
        "(floor(0.2 x 3) = 0): give --trim >= 0.34"
    ]
    assert not (tmp_path / "o").exists()
