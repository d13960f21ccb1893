"""`fedclip-edge bench secagg`: secure aggregation's cost per round beside the plain round, in
one run, with the same devices.

For each device count: the plain FedAvg round, the secure round, and the secure round with a
share of the devices dropping out mid-round (`--dropout`, default 10%; each dropped device stops
right after publishing a step of `--drop-after`, cycled: by default half after their shares,
half after their masked vector). All three run the real `Aggregator` over the in-memory broker
against the simulated fleet of `secagg_fleet.py` (the real `SecAggDevice` on each device), for
`--rounds` rounds. Measured per device per round: bytes up and down (every message, by kind),
the aggregator's CPU time per round (its thread's `thread_time` from the round's start to its
aggregate, see `secagg_fleet.Probe`), the round's wall time, and the devices' CPU ms per step
(`deal` is the masking: decrypting the shares and expanding the masks). Checked, not only
measured: each round's new global is the round's global plus the mean of its contributors'
deltas, and the secure globals equal the plain ones, within the fixed point's error and float32
rounding (an AssertionError otherwise).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedclip_edge.benchmarks.procstats import machine_info
from fedclip_edge.benchmarks.secagg_fleet import DELTA_SCALE, Fleet, Probe, flat
from fedclip_edge.broker import secagg_wire as W
from fedclip_edge.broker.aggregator import Aggregator, AggregatorConfig
from fedclip_edge.broker.runbind import new_run_id
from fedclip_edge.broker.transport import MemoryTransport
from fedclip_edge.errors import ConfigError, FedClipError

SCHEMA = "fedclip-edge/bench-secagg/v1"
DEFAULT_DEVICES = (10, 100)
JOB = "benchsa"
TOLERANCE = 1e-6  # |secure - plain| and |global - expected| per coordinate (float32 globals)
DROP_STEPS = ("keys", "shares", "masked")
RUNS = ("plain", "secure", "secure-dropout")


def make_deltas(n: int, dim: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Each device's fixed update: its own random delta, DELTA_SCALE in size."""
    from fedclip_edge.adapter import AttentionAdapter

    shapes = {k: v.shape for k, v in AttentionAdapter(dim).state_dict().items()}
    gen = torch.Generator().manual_seed(seed + 1)
    return [{k: torch.randn(s, generator=gen) * DELTA_SCALE for k, s in shapes.items()}
            for _ in range(n)]


def drop_plan(n: int, rounds: int, fraction: float, steps: tuple[str, ...]
              ) -> dict[tuple[int, str], str]:
    """(round, device) -> the step after which it drops: max(1, round(fraction x n)) devices a
    round (none for fraction 0), the next ones each round, the steps cycled over them all."""
    k = 0 if fraction <= 0 else max(1, round(fraction * n))
    plan = {}
    for r in range(1, rounds + 1):
        for j in range(k):
            at = (r - 1) * k + j
            plan[(r, f"sa{at % n:04d}")] = steps[at % len(steps)]
    return plan


def run_once(*, n: int, dim: int, rounds: int, secure: bool, deltas: list[dict[str, Any]],
             drops: dict[tuple[int, str], str], seed: int, out: Path, timeout_s: float,
             log: Any = print) -> dict[str, Any]:
    """One federation of `rounds` rounds; per round the raw measurements (`Probe.rows`)."""
    agg_key = Ed25519PrivateKey.generate()
    run = new_run_id()
    fleet = Fleet(n=n, dim=dim, job=JOB, run=run, rounds=rounds, secure=secure, deltas=deltas,
                  agg_key=agg_key, drops=drops)
    probe = Probe(fleet)
    per_round = max(Counter(r for (r, _) in drops).values(), default=0)
    cfg = AggregatorConfig(
        job=JOB, rounds=rounds, out=out, min_clients=max(3, n - per_round), dim=dim,
        round_timeout_s=timeout_s, wait_clients_s=60.0, upload_grace_s=60.0, seed=seed,
        weighting="uniform", registry=fleet.registry, signing_key=agg_key, run=run,
        secure_aggregation=secure, on_short="stop", max_retries=0)
    lines: list[str] = []
    agg = Aggregator(MemoryTransport(fleet.broker, "aggregator"), cfg, log=lines.append,
                     hooks=probe)
    failed: list[BaseException] = []

    def main() -> None:
        try:
            agg.run()
        except BaseException as exc:  # noqa: BLE001 - raised below, on the caller's thread
            failed.append(exc)

    t0 = time.perf_counter()
    th = threading.Thread(target=main, name="bench-secagg-aggregator", daemon=True)
    th.start()
    th.join(timeout_s * (rounds + 1))
    fleet.close()
    if th.is_alive() or failed or fleet.errors:
        tail = "\n".join(lines[-8:])
        why = (f"{type(failed[0]).__name__}: {failed[0]}" if failed else
               "timed out" if th.is_alive() else "; ".join(fleet.errors[:3]))
        raise FedClipError(f"bench secagg: {'secure' if secure else 'plain'} run of {n} devices "
                           f"failed: {why}\n{tail}")
    return {"rows": probe.rows, "fleet": fleet, "agg": agg, "total_s": time.perf_counter() - t0}


def _per_device(rows: list[dict[str, Any]], n: int, idx: int) -> tuple[float, dict[str, float]]:
    """Mean bytes per device per round (idx 0: up, 1: down), and by message kind."""
    kinds: Counter[str] = Counter()
    for r in rows:
        for cid, c1 in r["counts1"].items():
            kinds.update(c1[idx])
            kinds.subtract(r["counts0"][cid][idx])
    scale = 1.0 / (n * len(rows))
    by = {k: v * scale for k, v in sorted(kinds.items()) if v}
    return sum(by.values()), by


def summarize(label: str, res: dict[str, Any], n: int, dim: int,
              deltas: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """One run's row: per device per round means, the checks' worst errors."""
    rows, fleet = res["rows"], res["fleet"]
    flat_delta = {d.cid: deltas[i] for i, d in enumerate(fleet.devices)}
    worst = 0.0
    for r in rows:
        total = np.zeros_like(flat(r["glob"]))
        for c in r["contributors"]:
            total += flat(flat_delta[c])
        expected = flat(r["glob"]) + total / len(r["contributors"])
        worst = max(worst, float(np.abs(flat(r["new"]) - expected).max()))
    up, up_by = _per_device(rows, n, 0)
    down, down_by = _per_device(rows, n, 1)
    cpu: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    for d in fleet.devices:
        cpu.update(d.cpu_ms)
        calls.update(d.calls)
    rejected = Counter()
    for d in fleet.devices:
        rejected.update(d.rejected)
    agg = res["agg"]
    row = {
        "run": label, "devices": n, "dim": dim, "rounds": len(rows),
        "params": int(sum(v.numel() for v in deltas[0].values())),
        "bytes_up_per_device_round": up, "bytes_down_per_device_round": down,
        "bytes_up_by_kind": up_by, "bytes_down_by_kind": down_by,
        "aggregator_cpu_ms_per_round": 1000 * float(np.mean([r["agg_cpu_s"] for r in rows])),
        "aggregator_cpu_ms_rounds": [1000 * r["agg_cpu_s"] for r in rows],
        "wall_s_per_round": float(np.mean([r["wall_s"] for r in rows])),
        "wall_s_rounds": [r["wall_s"] for r in rows],
        "commit_s_per_round": float(np.mean([r["commit_s"] for r in rows])),
        "device_cpu_ms_per_call": {k: cpu[k] / calls[k] for k in sorted(calls)},
        "device_calls": dict(sorted(calls.items())),
        "device_mask_ms": cpu["deal"] / calls["deal"] if calls["deal"] else None,
        "contributors": [len(r["contributors"]) for r in rows],
        "roster": [r["roster"] for r in rows], "u2": [r["u2"] for r in rows],
        "reveals": [r["reveals"] for r in rows], "threshold": [r["threshold"] for r in rows],
        "rejoined": [r["rejoined"] for r in rows],
        "max_abs_err_vs_expected_mean": worst,
        "device_rejected": dict(rejected),
        "aggregator_rejected": {k: v for k, v in agg.counters.items()
                                if k.startswith("rejected_")},
        "run_total_s": res["total_s"],
    }
    assert worst <= TOLERANCE, f"{label}, {n} devices: global off the mean by {worst:.3g}"
    return row


def bench_devices(n: int, dim: int, *, rounds: int, dropout: float, drop_after: tuple[str, ...],
                  seed: int, work: Path, timeout_s: float, log: Any = print
                  ) -> list[dict[str, Any]]:
    """The three runs at `n` devices; rows with ratios to the plain run, checked."""
    deltas = make_deltas(n, dim, seed)
    plan = drop_plan(n, rounds, dropout, drop_after)
    out: list[dict[str, Any]] = []
    globals_of: dict[str, list[np.ndarray]] = {}
    for label in RUNS if plan else RUNS[:2]:
        secure = label != "plain"
        log(f"N={n} dim={dim}: {label} ({rounds} round(s)) ...")
        res = run_once(n=n, dim=dim, rounds=rounds, secure=secure, deltas=deltas,
                       drops=plan if label == "secure-dropout" else {}, seed=seed,
                       out=work / f"{label}-{n}", timeout_s=timeout_s, log=log)
        globals_of[label] = [flat(r["new"]) for r in res["rows"]]
        row = summarize(label, res, n, dim, deltas)
        if label == "secure-dropout":
            row["dropped_per_round"] = max(1, round(dropout * n))
            row["drop_after"] = list(drop_after)
        out.append(row)
        del res
        log(f"  {row['bytes_up_per_device_round'] / 1e3:,.1f} kB up, "
            f"{row['bytes_down_per_device_round'] / 1e3:,.1f} kB down per device-round; "
            f"aggregator {row['aggregator_cpu_ms_per_round']:,.0f} ms CPU, wall "
            f"{row['wall_s_per_round']:.2f} s per round")
    diff = max(float(np.abs(a - b).max()) for a, b in zip(globals_of["plain"],
                                                          globals_of["secure"], strict=True))
    assert diff <= TOLERANCE, f"{n} devices: the secure globals differ from plain by {diff:.3g}"
    fp = W.fixed_point(1.0, 1.0, n)
    plain = out[0]
    for row in out:
        row["secure_vs_plain_max_abs_diff"] = diff if row["run"] == "secure" else None
        row["fixed_point_mean_error_bound"] = fp.error_bound(n) / n
        for key in ("bytes_up_per_device_round", "bytes_down_per_device_round",
                    "aggregator_cpu_ms_per_round", "wall_s_per_round"):
            row[f"ratio_{key}"] = row[key] / plain[key] if plain[key] else None
    return out


def render(rows: list[dict[str, Any]]) -> list[str]:
    head = (f"{'N':>4} {'dim':>4} {'run':<15} {'up kB':>9} {'down kB':>9} {'agg ms':>8} "
            f"{'wall s':>7} {'mask ms':>8}  secure/plain: up, down, agg, wall")
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = "" if r["run"] == "plain" else ", ".join(
            f"{r[f'ratio_{k}']:.2f}x" for k in ("bytes_up_per_device_round",
                                                "bytes_down_per_device_round",
                                                "aggregator_cpu_ms_per_round",
                                                "wall_s_per_round"))
        mask = f"{r['device_mask_ms']:.1f}" if r["device_mask_ms"] is not None else "-"
        lines.append(
            f"{r['devices']:>4} {r['dim']:>4} {r['run']:<15} "
            f"{r['bytes_up_per_device_round'] / 1e3:>9,.1f} "
            f"{r['bytes_down_per_device_round'] / 1e3:>9,.1f} "
            f"{r['aggregator_cpu_ms_per_round']:>8,.0f} {r['wall_s_per_round']:>7.2f} "
            f"{mask:>8}  {ratio}")
    return lines


def run_bench(devices: list[int], out: Path | None = None, *, dims: list[int] | None = None,
              rounds: int = 2, dropout: float = 0.1,
              drop_after: tuple[str, ...] = ("shares", "masked"), seed: int = 0,
              timeout_s: float = 900.0, log: Any = print) -> dict[str, Any]:
    """Every N of `devices` (dims: one for all, or one per N); writes OUT/bench_secagg.json
    after every N when `out` is given."""
    dims = list(dims or [512])
    if not devices or any(n < 3 for n in devices):
        raise ConfigError("--devices: secure aggregation needs at least 3 devices")
    if len(dims) not in (1, len(devices)) or any(d < 1 for d in dims):
        raise ConfigError("--dim: one positive width, or one per --devices count")
    if rounds < 1 or not 0 <= dropout < 1 / 3 or timeout_s <= 0:
        raise ConfigError("--rounds >= 1, 0 <= --dropout < 1/3, --timeout > 0")
    if not drop_after or any(s not in DROP_STEPS for s in drop_after):
        raise ConfigError(f"--drop-after: steps among {', '.join(DROP_STEPS)}")
    dims = dims * len(devices) if len(dims) == 1 else dims
    load0 = list(os.getloadavg())
    log(f"load average before: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} "
        f"({os.cpu_count()} CPUs)")
    argv = sys.argv[1:]
    report: dict[str, Any] = {
        "schema": SCHEMA, "complete": False,
        "command": "fedclip-edge " + " ".join(argv) if argv[:2] == ["bench", "secagg"] else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {**machine_info(), "load_average_before": load0},
        "config": {"devices": list(devices), "dims": dims, "rounds": rounds,
                   "dropout": dropout, "drop_after": list(drop_after), "seed": seed,
                   "python": platform.python_version(), "torch_threads": torch.get_num_threads()},
        "method": (
            "In one process: the real Aggregator over the in-memory broker, N simulated devices "
            "on one driver thread (each its own connection; no training, each device's update "
            "is the round's global plus its own fixed random delta, 0.01 x N(0,1)); secure: "
            "the real SecAggDevice on each device and the aggregator's SecAggCollect, signed "
            "messages. Bytes: every payload each device's connection sent or was delivered "
            "(statuses, globals, control, secure-aggregation steps), per device per round. "
            "Aggregator CPU: its thread's thread_time from round_started to before_commit "
            "(the global out, every message handled, unmasking, the mean; not the commit to "
            "disk), which includes the in-memory broker's synchronous delivery of its own "
            "publishes. Wall: the same span; devices are served one after another on one "
            "thread, so it holds the sum of all devices' work. Device CPU: thread_time per "
            "handled message; `deal` is the masking (decrypt n-1 shares, expand n masks)."),
        "rows": [],
    }
    path = Path(out) / "bench_secagg.json" if out is not None else None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-secagg-"))
    try:
        for n, dim in zip(devices, dims, strict=True):
            report["rows"].extend(bench_devices(
                n, dim, rounds=rounds, dropout=dropout, drop_after=tuple(drop_after),
                seed=seed, work=work, timeout_s=timeout_s, log=log))
            if path is not None:
                path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load1 = list(os.getloadavg())
    report["machine"]["load_average_after"] = load1
    report["complete"] = True
    for line in render(report["rows"]):
        log(line)
    log(f"load average after: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    if path is not None:
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        log(f"wrote {path}")
    return report
