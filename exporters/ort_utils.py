"""ONNX Runtime sessions, and running a model in a child process so that a crash is an error.

An fp16 graph can kill ONNX Runtime's CPU provider outright (measured here: a `.half()` export
died with SIGSEGV; our own fp16 graph died the same way inside the CPU-only `NchwcTransformer`
layout pass, which has no fp16 kernels to offer anyway). A segfault cannot be caught in-process,
so anything that might crash runs through `run_isolated`, which turns a dead child into an
ExportError naming the signal. This module imports neither torch nor open_clip, so the child
starts fast.

Child usage (internal): python -m fedclip_edge.exporters.ort_utils REQUEST.json
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedclip_edge.errors import ExportError

# CPU graph passes switched off for fp16 graphs: NchwcTransformer segfaults on an fp16 Conv in
# onnxruntime 1.32 (found by bisecting the optimizers on this machine).
FP16_CPU_DISABLED_OPTIMIZERS = ("NchwcTransformer",)


def disabled_optimizers_for(precision: str, providers: Sequence[str]) -> list[str]:
    """Which ORT optimizers to switch off for this precision on these providers."""
    if precision == "fp16" and providers and providers[0] == "CPUExecutionProvider":
        return list(FP16_CPU_DISABLED_OPTIMIZERS)
    return []


def make_session(
    path: str | Path,
    providers: Sequence[str | tuple[str, dict[str, Any]]] = ("CPUExecutionProvider",),
    *,
    disabled_optimizers: Sequence[str] = (),
    threads: int | None = None,
) -> Any:
    """An InferenceSession with full graph optimization; load errors become ExportError."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = int(threads)
    try:
        return ort.InferenceSession(
            str(path),
            sess_options=so,
            providers=list(providers),
            disabled_optimizers=list(disabled_optimizers) or None,
        )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else repr(exc)
        raise ExportError(f"ONNX Runtime cannot load {Path(path).name}: {first}") from exc


def run_batches(session: Any, input_name: str, batches: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Run each batch through a session's first output."""
    return [np.asarray(session.run(None, {input_name: b})[0]) for b in batches]


def child_command(request: Path) -> list[str]:
    """The child's command line (a seam for tests that need a child to crash for real)."""
    return [sys.executable, "-m", "fedclip_edge.exporters.ort_utils", str(request)]


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def run_isolated(
    path: str | Path,
    input_name: str,
    batches: Sequence[np.ndarray],
    *,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    disabled_optimizers: Sequence[str] = (),
    timeout_s: float = 900.0,
) -> list[np.ndarray]:
    """Load and run `path` in a child process; a crash or hang becomes an ExportError."""
    with tempfile.TemporaryDirectory(prefix="fedclip-ort-") as tmp:
        tmp_path = Path(tmp)
        np.savez(tmp_path / "in.npz", **{f"b{i}": b for i, b in enumerate(batches)})
        request = {
            "model": str(Path(path).resolve()),
            "input_name": input_name,
            "providers": list(providers),
            "disabled_optimizers": list(disabled_optimizers),
            "inputs": str(tmp_path / "in.npz"),
            "outputs": str(tmp_path / "out.npz"),
            "count": len(batches),
        }
        (tmp_path / "request.json").write_text(json.dumps(request))
        env = dict(os.environ)
        try:
            proc = subprocess.run(
                child_command(tmp_path / "request.json"),
                capture_output=True,
                text=True,
                timeout=timeout_s,
                env=env,
            )
        except subprocess.TimeoutExpired as exc:
            raise ExportError(
                f"ONNX Runtime did not finish {Path(path).name} within {timeout_s:.0f} s "
                f"(providers {list(providers)})"
            ) from exc
        where = f"{Path(path).name} on {providers[0] if providers else 'default provider'}"
        if proc.returncode < 0:
            raise ExportError(
                f"ONNX Runtime crashed ({_signal_name(proc.returncode)}) while running {where}: "
                "this artifact cannot run on that provider"
            )
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stdout + proc.stderr).strip().splitlines() if ln.strip()]
            last = lines[-1][:300] if lines else f"exit status {proc.returncode}"
            raise ExportError(f"ONNX Runtime failed while running {where}: {last}")
        with np.load(tmp_path / "out.npz") as out:
            return [out[f"b{i}"] for i in range(len(batches))]


def _child(request_path: str) -> int:
    req = json.loads(Path(request_path).read_text())
    session = make_session(
        req["model"], req["providers"], disabled_optimizers=req["disabled_optimizers"]
    )
    with np.load(req["inputs"]) as data:
        batches = [data[f"b{i}"] for i in range(req["count"])]
    outs = run_batches(session, req["input_name"], batches)
    np.savez(req["outputs"], **{f"b{i}": o for i, o in enumerate(outs)})
    return 0


if __name__ == "__main__":
    try:
        sys.exit(_child(sys.argv[1]))
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(3)
