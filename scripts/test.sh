#!/usr/bin/env bash
# The whole test suite: `bash scripts/test.sh [pytest options]`. CI runs exactly this.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
ruff check .
exec python -m pytest "$@"
