#!/usr/bin/env bash
# GPU check: what only a CUDA machine can measure, in under 8 minutes, with no downloads.
#   1. export ViT-B-32 (random init) and time the torch CUDA extractor against the CPU ones
#      (`bench extractor`: images/s and the golden-set parity of each backend);
#   2. `bench fedavg --device cuda`: ViT-B-32 random init, 2 clients, 3 rounds (FedCLIP vs full
#      FedAvg on the GPU);
#   3. `pytest tests/gpu` (CUDA and TensorRT paths; TensorRT ones skip without TensorRT).
# Writes OUT/gpu-check.json (every figure, each step's status and seconds) and the steps' logs.
#
# usage: scripts/gpu-check.sh [OUT_DIR]        (default: $OUT, else ./gpu-check-out)
#   PYTHON=/path/to/python  the interpreter to use (default: ./.venv/bin/python, then python3);
#                           it must already have torch with CUDA and fedclip-edge installed
#                           (`pip install -e .`): this script installs nothing.
# Exit status: 0 all steps passed; 1 a step failed; 3 no CUDA; 4 something missing.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-${OUT:-$ROOT/gpu-check-out}}"
mkdir -p "$OUT_DIR" || { echo "gpu-check: cannot create $OUT_DIR" >&2; exit 4; }
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
STEPS="$OUT_DIR/steps.tsv"
: > "$STEPS"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export FEDCLIP_EDGE_CACHE="${FEDCLIP_EDGE_CACHE:-$WORK/cache}"

say() { echo "gpu-check: $*" >&2; }

summary() {  # summary STATUS REASON: write gpu-check.json from what the steps left
  "$PY" - "$OUT_DIR" "$1" "$2" <<'PY' || say "could not write $OUT_DIR/gpu-check.json"
import json, sys
from pathlib import Path
out, status, reason = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
rep = {"status": status, "reason": reason, "steps": {}}
env = out / "environment.json"
if env.is_file():
    rep["environment"] = json.loads(env.read_text())
for line in (out / "steps.tsv").read_text().splitlines():
    name, rc, secs = line.split("\t")
    rep["steps"][name] = {"exit": int(rc), "seconds": float(secs), "log": f"{name}.log"}
ext = out / "bench_extractor.json"
if ext.is_file():
    rep["extractor"] = json.loads(ext.read_text())
fed = out / "fedavg" / "bench.json"
if fed.is_file():
    rep["fedavg"] = json.loads(fed.read_text())
junit = out / "pytest-gpu.xml"
if junit.is_file():
    import xml.etree.ElementTree as ET
    root = ET.parse(junit).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    rep["pytest_gpu"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors",
                                                            "skipped")}
    rep["pytest_gpu"]["cases"] = {
        f"{c.get('classname')}::{c.get('name')}":
            "failed" if c.find("failure") is not None or c.find("error") is not None
            else "skipped" if c.find("skipped") is not None else "passed"
        for c in suite.iter("testcase")}
(out / "gpu-check.json").write_text(json.dumps(rep, indent=2))
print(f"gpu-check: {status}{': ' + reason if reason else ''} -> {out / 'gpu-check.json'}",
      file=sys.stderr)
PY
}

# ---------------------------------------------------------------------------- the interpreter
PY=""
for cand in "${PYTHON:-}" "$ROOT/.venv/bin/python" python3; do
  [[ -n "$cand" ]] || continue
  command -v "$cand" >/dev/null 2>&1 || continue
  if "$cand" -c 'import torch' >/dev/null 2>&1; then PY="$(command -v "$cand")"; break; fi
done
if [[ -z "$PY" ]]; then
  PY="$(command -v python3 || true)"
  say "no Python with torch found (tried \$PYTHON, $ROOT/.venv/bin/python, python3): set" \
      "PYTHON to an interpreter that has torch with CUDA and fedclip-edge installed"
  if [[ -n "$PY" ]]; then
    printf 'interpreter\t4\t0\n' > "$STEPS"
    summary missing "no Python with torch"
  fi
  exit 4
fi
say "using $PY"

# CUDA first: on a machine without it there is nothing to measure.
if ! "$PY" - "$OUT_DIR/environment.json" <<'PY'
import json, platform, subprocess, sys
import torch
env = {"python": platform.python_version(), "torch": torch.__version__,
       "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    env["gpu"] = torch.cuda.get_device_name(0)
    env["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    try:
        env["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20).stdout.strip()
    except OSError:
        pass
for mod in ("onnxruntime", "tensorrt"):
    try:
        m = __import__(mod)
        env[mod] = getattr(m, "__version__", None) or "not importable (no bindings: stubs only?)"
    except Exception as exc:
        env[mod] = f"not importable ({type(exc).__name__})"
open(sys.argv[1], "w").write(json.dumps(env, indent=2))
sys.exit(0 if torch.cuda.is_available() else 3)
PY
then
  why="$("$PY" -c 'import torch; print(f"torch {torch.__version__} (built for CUDA {torch.version.cuda}) sees no GPU")' 2>&1 | tail -1)"
  say "no CUDA: $why"
  printf 'cuda\t3\t0\n' > "$STEPS"
  summary no_cuda "$why"
  exit 3
fi

# Everything the steps import, checked before any of them starts.
missing="$("$PY" - <<'PY'
import importlib.util
need = ["fedclip_edge", "fedclip_edge.exporters", "open_clip", "onnx", "onnxruntime", "typer",
        "safetensors", "pytest", "paho"]
print(" ".join(n for n in need if importlib.util.find_spec(n.split(".")[0]) is None
               or (n == "fedclip_edge.exporters" and importlib.util.find_spec(n) is None)))
PY
)"
if [[ -n "$missing" ]]; then
  say "missing in $PY: $missing"
  say "install them there (e.g. $PY -m pip install -e '${ROOT}[dev]' where PyPI is reachable)"
  printf 'imports\t4\t0\n' > "$STEPS"
  summary missing "not importable: $missing"
  exit 4
fi

# ---------------------------------------------------------------------------- the steps
failed=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log, record exit and seconds
  local name="$1" limit="$2"; shift 2
  local t0 t1 rc
  say "$name (at most ${limit}s)"
  t0="$EPOCHREALTIME"
  timeout --kill-after=10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  rc=$?
  t1="$EPOCHREALTIME"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}')" \
    >> "$STEPS"
  if [[ $rc -ne 0 ]]; then
    failed=1
    say "$name failed (exit $rc; 124 = time limit): tail of $OUT_DIR/$name.log"
    tail -n 15 "$OUT_DIR/$name.log" >&2
  fi
  return $rc
}
cli() { "$PY" -m fedclip_edge.cli "$@"; }

step data 60 cli data synth --out "$WORK/data" --per-class 8

if step export 150 cli export --out "$WORK/vitb32" --model ViT-B-32 --pretrained none \
    --max-batch 32 --opt-batch 8 --classes "$WORK/data"; then
  step extractor 120 cli bench extractor --artifacts "$WORK/vitb32" \
    --backends torch:cpu torch:cuda onnxruntime:cpu auto --batch 1 8 32 --repeats 5 \
    --json "$OUT_DIR/bench_extractor.json"
fi

step fedavg 180 cli bench fedavg --data "$WORK/data" --out "$OUT_DIR/fedavg" \
  --model ViT-B-32 --pretrained none --clients 2 --rounds 3 --device cuda

step pytest_gpu 150 "$PY" -m pytest "$ROOT/tests/gpu" -q -rs \
  --junitxml="$OUT_DIR/pytest-gpu.xml"

if [[ $failed -ne 0 ]]; then
  summary failed "a step failed; see its log"
  exit 1
fi
summary passed ""
