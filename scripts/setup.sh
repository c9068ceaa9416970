#!/usr/bin/env bash
# Create or reuse .venv and install trajscope with the extras given as arguments (e.g. test).
# Installs the CPU build of torch (2.13.0) first where the environment has no torch, so that the
# project's own requirement (torch>=2.5) is met without pulling a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${TRAJSCOPE_VENV:-.venv}"
extras="${1:-}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV" >&2
    "$PY" -m venv "$VENV"
fi
pip_install() { "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@"; }
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    echo "setup: installing the CPU build of torch 2.13.0" >&2
    pip_install "torch==2.13.0"
fi
spec="."
[ -n "$extras" ] && spec=".[$extras]"
stamp="$VENV/.trajscope-installed-$(echo "$extras" | tr ',' '-')"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setup: installing trajscope ($spec)" >&2
    pip_install -e "$spec"
    touch "$stamp"
fi
