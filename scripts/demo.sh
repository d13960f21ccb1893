#!/usr/bin/env bash
# The whole FedCLIP pipeline on this machine, no downloads: `bash scripts/demo.sh [demo options]`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
exec fedclip-edge demo "$@"
