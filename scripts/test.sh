#!/usr/bin/env bash
# Set up .venv with the test extra if needed, then run the test suite (CPU only, ~minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/python -m pytest "$@"
