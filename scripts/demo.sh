#!/usr/bin/env bash
# Set up .venv if needed, then record the demo run (mnist1d-cnn) and print its summary.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/trajscope demo "$@"
