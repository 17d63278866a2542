#!/usr/bin/env bash
# The test command: sets up .venv and Redis, then runs every test, real-model ones
# included (pass pytest arguments to narrow it, e.g. `-m "not real_model"`).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh dev,local-model
./scripts/ensure_redis.sh
export THREADLINE_REQUIRE_REAL_MODEL="${THREADLINE_REQUIRE_REAL_MODEL:-1}"
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
