#!/usr/bin/env bash
# Fails when the checked-in generated code differs from what the protos generate.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=.venv/bin/python ./scripts/gen_protos.sh >/dev/null
if [ -n "$(git status --porcelain -- threadline/v1)" ]; then
  echo "generated stubs are stale: run scripts/gen_protos.sh and commit threadline/v1" >&2
  git status --short -- threadline/v1 >&2
  exit 1
fi
