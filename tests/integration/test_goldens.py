"""simulate, the in-process demo, the aggregator and `bench fedavg` give today's figures.

The fixtures (tests/golden/*.json) were captured before the three round loops became one round
engine (`tests/support/goldens.py` says how). Tolerances:
- simulate, demo and bench fedavg: exact. The engine runs the same operations in the same
  order as the loops it replaced (the same generators, the same update order into the
  strategy), so every float comes out bit for bit.
- the aggregator: relative 1e-6, and its uplink bytes within a few bytes (a device's update
  envelope carries its clock readings as JSON numbers, whose length varies). Its updates come
  from agent threads, so they reach the strategy in arrival order; FedAvg sums in float64 and
  the median sorts, so the order rarely shows, but a float64 sum in another order may round
  differently in its last bit.
With another torch or numpy than the fixtures were captured with, or another torch thread count
(a float sum split over another number of threads rounds differently), CPU kernels may round
differently: every comparison then uses relative 1e-5 (said in the failure message).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy
import pytest
import torch
from support import goldens

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _rel(name: str, exact: float) -> float:
    meta = goldens.load(name).get("_meta", {})
    same = (meta.get("torch") == torch.__version__ and meta.get("numpy") == numpy.__version__
            and meta.get("torch_threads") == torch.get_num_threads())
    return exact if same else 1e-5


def _check(name: str, case: str, got: dict, exact: float = 0.0) -> None:
    want = dict(goldens.load(name)[case])
    rel = _rel(name, exact)
    if "bytes_up" in want:  # the aggregator's: within a few bytes (goldens.UPLINK_SLACK)
        w, g = want.pop("bytes_up"), got.pop("bytes_up")
        assert [x[:2] for x in g] == [x[:2] for x in w]
        far = [(a, b) for a, b in zip(w, g, strict=True) if abs(a[2] - b[2]) > goldens.UPLINK_SLACK]
        assert not far, f"{name}/{case}: uplink bytes moved: {far}"
    problems = goldens.diff(want, got, rel=rel)
    assert not problems, f"{name}/{case} (rel {rel:g}): " + "; ".join(problems[:10])


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory):
    return goldens.synthetic_features(tmp_path_factory.mktemp("golden-features"))


@pytest.mark.parametrize("case", list(goldens.SIMULATE_CASES))
def test_simulate_gives_todays_figures(features, case: str) -> None:
    _check("simulate", case, goldens.simulate_case(features, goldens.SIMULATE_CASES[case]))


def test_inproc_demo_gives_todays_figures() -> None:
    got = goldens.capture_demo()
    for preset in ("reference", "learning"):
        _check("demo", preset, got[preset])


@pytest.mark.parametrize("case", list(goldens.AGG_CASES))
def test_aggregator_gives_todays_figures(tmp_path: Path, case: str) -> None:
    got = goldens.aggregator_case(tmp_path / "run", goldens.AGG_CASES[case])
    _check("aggregator", case, got, exact=1e-6)


@pytest.fixture(scope="module")
def bench_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return goldens.bench_data(tmp_path_factory.mktemp("golden-bench"))


@pytest.mark.parametrize("case", list(goldens.BENCH_CASES))
def test_bench_fedavg_gives_todays_figures(bench_data: Path, case: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        got = goldens.bench_case(bench_data, Path(tmp), goldens.BENCH_CASES[case])
    _check("bench_fedavg", case, got)
