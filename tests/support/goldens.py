"""Today's results on fixed seeds, as figures the round engine must reproduce.

Why: simulate, the in-process demo, the aggregator and `bench fedavg` now drive one round engine
(fedclip_edge/rounds/); before that refactor each had its own loop. These functions run each
caller on a small fixed configuration and reduce its report to the figures a user reads
(accuracies, losses, bytes, selected rounds, the final adapter), with wall times and other
clock readings left out. tests/golden/*.json hold what the loops gave before the refactor
(captured with `python tests/support/goldens.py --write`; regenerate only when a change of
results is intended, and say so in the commit), and tests/integration/test_goldens.py compares.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

GOLDEN_DIR = Path(__file__).resolve().parent.parent / "golden"

# Client lines' fields that are clock readings (never compared) in metrics.jsonl.
_CLOCK_FIELDS = frozenset(
    {
        "global_wait_s",
        "global_transfer_s",
        "extract_s",
        "train_s",
        "upload_s",
        "update_latency_s",
        "round_wall_s",
        "latency_p50_s",
        "latency_max_s",
    }
)
# bench.json round fields that are clock readings.
_BENCH_CLOCK = frozenset(
    {"wall_s", "eval_s", "compute_s_mean", "transfer_s_mean", "cumulative_wall_s",
     "compute_s", "transfer_s"}
)

# ---------------------------------------------------------------------------- simulate

SIMULATE_CASES: dict[str, dict[str, Any]] = {
    "reference": {"preset": "reference", "rounds": 3, "seeds": (0,)},
    "learning_personalize": {
        "preset": "learning", "rounds": 3, "seeds": (0, 1), "personalize_epochs": 2,
    },
    "learning_topk_int8_median": {
        "preset": "learning", "rounds": 3, "seeds": (0,), "update_codec": "topk-int8",
        "topk_fraction": 0.05, "strategy": "median",
    },
    "learning_int8_clip_samples": {
        "preset": "learning", "rounds": 3, "seeds": (0,), "update_codec": "int8",
        "strategy": "clip", "weighting": "samples", "personalize_epochs": 1,
    },
}


def synthetic_features(root: Path) -> Any:
    """Features of the synthetic data (5 images per domain and class) with fedclip-tiny."""
    from fedclip_edge.data.synth import write_dataset
    from fedclip_edge.runs import build_features

    write_dataset(root / "data", per_class=5, seed=0)
    return build_features(root / "data", root / "features", progress=False)


def simulate_case(fs: Any, case: dict[str, Any]) -> dict[str, Any]:
    from fedclip_edge.config import SimulationConfig, train_config
    from fedclip_edge.simulate import simulate

    cfg = SimulationConfig(
        test_domain="photo",
        rounds=case["rounds"],
        seeds=case["seeds"],
        train=train_config(case["preset"]),
        personalize_epochs=case.get("personalize_epochs", 0),
        weighting=case.get("weighting", "uniform"),
        strategy=case.get("strategy", "fedavg"),
        update_codec=case.get("update_codec", "fp32"),
        topk_fraction=case.get("topk_fraction", 0.01),
    )
    return simulate_figures(simulate(fs, cfg, None, log=lambda line: None))


def simulate_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """A simulate summary without what names the machine (the model's identity is the cached
    fedclip-tiny's, compared apart by its weights hash)."""
    out = {k: v for k, v in summary.items() if k not in ("model",)}
    out["weights_sha256"] = summary["model"].get("weights_sha256")
    return _plain(out)


def capture_simulate() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        fs = synthetic_features(Path(tmp))
        return {name: simulate_case(fs, case) for name, case in SIMULATE_CASES.items()}


# ---------------------------------------------------------------------------- demo

DEMO_ARGS: dict[str, Any] = {"rounds": 2, "per_class": 5, "seeds": (0, 1),
                             "personalize_epochs": 2}


def capture_demo() -> dict[str, Any]:
    """The in-process demo (`demo --inproc`): both presets' summaries."""
    import contextlib
    import io

    from fedclip_edge.runs import run_demo

    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        results = run_demo(Path(tmp), **DEMO_ARGS)
    return {name: simulate_figures(s) for name, s in results.items()}


# ---------------------------------------------------------------------------- aggregator

UPLINK_SLACK = 64  # bytes a round's update envelopes may differ by (clock readings in them)

AGG_CASES: dict[str, dict[str, Any]] = {
    # the unit tests' federation: 3 agents, d = 8, seed 3, a rogue update in round 1
    "federation": {"rounds": 2},
    # the same with int8 updates (a delta codec) and a robust strategy
    "int8_trimmed_mean": {"rounds": 2, "update_codec": "int8",
                          "strategy": "trimmed-mean", "strategy_options": {"trim": 0.34}},
}


def aggregator_case(out: Path, case: dict[str, Any]) -> dict[str, Any]:
    from support.federation import make_federation

    broker, agg, threads = make_federation(
        out, rounds=case["rounds"], update_codec=case.get("update_codec"),
        strategy=case.get("strategy", "fedavg"),
        strategy_options=case.get("strategy_options"),
    )
    final = agg.run()
    for th in threads:
        th.join(30)
    return aggregator_figures(out, final, dict(agg.counters))


def aggregator_figures(out: Path, final: dict[str, Any], counters: dict[str, int]) -> dict:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    keep = [
        {k: v for k, v in sorted(r.items()) if k not in _CLOCK_FIELDS}
        for r in sorted(rows, key=lambda r: (r["round"], r["kind"], r.get("client", "")))
    ]
    # a device's envelope carries its clock readings (train_s ...) as JSON numbers, so its bytes
    # vary by a few from run to run: compared apart, within UPLINK_SLACK bytes
    bytes_up = [[r["round"], r.get("client", "all"), r.pop("bytes_up")] for r in keep]
    for r in keep:
        r.pop("bytes_up_by_codec", None)
    state = json.loads((out / "state.json").read_text())
    return _plain(
        {
            "final": {k: v.flatten().tolist() for k, v in sorted(final.items())},
            "metrics": keep,
            "bytes_up": bytes_up,
            "counters": counters,
            "history": [
                {k: v for k, v in h.items() if k not in _CLOCK_FIELDS} for h in state["history"]
            ],
            "strategy": state["strategy"],
        }
    )


def capture_aggregator() -> dict[str, Any]:
    res = {}
    for name, case in AGG_CASES.items():
        with tempfile.TemporaryDirectory() as tmp:
            res[name] = aggregator_case(Path(tmp) / "run", case)
    return res


# ---------------------------------------------------------------------------- bench fedavg

BENCH_CASES: dict[str, dict[str, Any]] = {
    "inproc": {"transport": "inproc"},
    "inproc_topk_int8": {"transport": "inproc", "update_codec": "topk-int8",
                         "topk_fraction": 0.05},
    "mqtt": {"transport": "mqtt"},
    "mqtt_int8": {"transport": "mqtt", "update_codec": "int8"},
}


def bench_data(root: Path) -> Path:
    from fedclip_edge.data.synth import write_dataset

    write_dataset(root, per_class=3, seed=0, domains=("photo", "sketch", "cartoon"))
    return root


def bench_case(data: Path, out: Path, case: dict[str, Any]) -> dict[str, Any]:
    from fedclip_edge.benchmarks.fedavg import run_bench

    report = run_bench(
        data, out, pretrained="none", clients=2, rounds=2, test_domain="cartoon",
        log=lambda s: None, **case,
    )
    return bench_figures(report)


def bench_figures(report: dict[str, Any]) -> dict[str, Any]:
    """Accuracy, loss and bytes of both methods (no timings)."""
    out: dict[str, Any] = {"params": report["params"],
                           "zero_shot_test": report["zero_shot_test"]}
    for method in ("fedclip", "fedavg"):
        rounds = []
        for r in report[method]["rounds"]:
            row = {k: v for k, v in r.items() if k not in _BENCH_CLOCK and k != "clients"}
            row["clients"] = {
                c: {k: v for k, v in cr.items() if k not in _BENCH_CLOCK}
                for c, cr in r["clients"].items()
            }
            rounds.append(row)
        out[method] = {
            "rounds": rounds,
            "tower_sha256_before": report[method].get("tower_sha256_before"),
            "tower_sha256_after": report[method].get("tower_sha256_after"),
        }
    if "uplink" in report:
        out["uplink"] = report["uplink"]
    out["bytes_per_round"] = report["speedups"]["bytes_per_round"]
    out["fedclip_bytes_per_client_round"] = report["speedups"]["fedclip_bytes_per_client_round"]
    out["fedavg_bytes_per_client_round"] = report["speedups"]["fedavg_bytes_per_client_round"]
    out["images"] = report["fedclip"]["extraction"]["images"]
    return _plain(out)


def capture_bench() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        data = bench_data(Path(tmp) / "data")
        return {
            name: bench_case(data, Path(tmp) / name, case) for name, case in BENCH_CASES.items()
        }


# ---------------------------------------------------------------------------- compare


def _plain(obj: Any) -> Any:
    """What a JSON round trip makes of it (tuples become lists, NaN becomes None)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def diff(want: Any, got: Any, *, rel: float = 0.0, path: str = "") -> list[str]:
    """Where `got` differs from `want`: ints, strings and structure exactly; floats within
    `rel` (relative, plus the same as an absolute bound near zero). Empty when they agree."""
    if isinstance(want, dict) and isinstance(got, dict):
        out = []
        if set(want) != set(got):
            out.append(f"{path}: keys {sorted(set(want) ^ set(got))} differ")
        for k in sorted(set(want) & set(got)):
            out += diff(want[k], got[k], rel=rel, path=f"{path}.{k}")
        return out
    if isinstance(want, list) and isinstance(got, list):
        if len(want) != len(got):
            return [f"{path}: length {len(got)} != {len(want)}"]
        out = []
        for i, (a, b) in enumerate(zip(want, got, strict=True)):
            out += diff(a, b, rel=rel, path=f"{path}[{i}]")
        return out
    if isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        if want == got or abs(want - got) <= rel * max(abs(want), abs(got), 1.0):
            return []
        return [f"{path}: {got!r} != {want!r}"]
    if want != got or type(want) is not type(got):
        return [f"{path}: {got!r} != {want!r}"]
    return []


def _meta() -> dict[str, str]:
    """What the figures' last bits depend on besides our code."""
    import numpy
    import torch

    return {"torch": torch.__version__, "numpy": numpy.__version__,
            "torch_threads": torch.get_num_threads()}


def load(name: str) -> dict[str, Any]:
    return json.loads((GOLDEN_DIR / f"{name}.json").read_text())


CAPTURES = {
    "simulate": capture_simulate,
    "demo": capture_demo,
    "aggregator": capture_aggregator,
    "bench_fedavg": capture_bench,
}


def _write(names: list[str]) -> None:
    GOLDEN_DIR.mkdir(exist_ok=True)
    for name in names or list(CAPTURES):
        data = CAPTURES[name]()
        data["_meta"] = _meta()
        (GOLDEN_DIR / f"{name}.json").write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        print(f"wrote {GOLDEN_DIR / name}.json")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `support` as a package
    if sys.argv[1:2] != ["--write"]:
        raise SystemExit("usage: python tests/support/goldens.py --write [simulate|demo|...]")
    _write(sys.argv[2:])
