#!/usr/bin/env bash
# The fault tests, RUNS times in a row, while BURNERS CPU-burning processes load the machine:
#   bash scripts/faults-under-load.sh [RUNS=5] [BURNERS=2] [extra pytest options]
# Why: a fault test that passes on a quiet machine and fails under load races the moment it
# tests. These tests make that moment certain (SIGSTOP holds, hooks, barriers); this script is
# how that claim is checked (docs/reliability.md has the figures). Exit status 0 only if every
# run passed; one summary line at the end, per-run logs under $FAULT_LOGS (default /tmp).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
RUNS="${1:-5}"
BURNERS="${2:-2}"
shift $(( $# > 2 ? 2 : $# ))
LOGS="${FAULT_LOGS:-/tmp}/fedclip-faults-$$"
mkdir -p "$LOGS"
TESTS=(
  tests/integration/test_federation.py
  tests/integration/test_transport_mosquitto.py
  tests/integration/test_soak.py
  tests/integration/test_soak_clients.py
  "tests/integration/test_exits.py::test_sigint_aggregate_waiting_for_devices"
  "tests/integration/test_exits.py::test_sigint_broker_run"
  "tests/integration/test_exits.py::test_sigterm_broker_run_is_a_clean_stop"
  tests/unit/broker/test_transport.py
  tests/unit/broker/test_backpressure.py
)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM
for _ in $(seq "$BURNERS"); do
  python -c "while True: pass" &
  pids+=("$!")
done
echo "faults under load: $BURNERS burner(s) started (pids ${pids[*]}), $RUNS run(s); logs in $LOGS"
passed=0
times=()
for i in $(seq "$RUNS"); do
  t0=$(date +%s)
  if python -m pytest "${TESTS[@]}" -q -p no:cacheprovider "$@" \
      >"$LOGS/run-$i.log" 2>&1; then
    verdict=passed; passed=$((passed + 1))
  else
    verdict=FAILED
  fi
  dt=$(( $(date +%s) - t0 ))
  times+=("${dt}s")
  echo "run $i/$RUNS: $verdict in ${dt}s ($(tail -n 1 "$LOGS/run-$i.log")) | load $(cut -d' ' -f1-3 /proc/loadavg)"
done
echo "faults under load: $passed/$RUNS runs passed with $BURNERS burners (${times[*]}) on $(nproc) cores"
[ "$passed" -eq "$RUNS" ]
