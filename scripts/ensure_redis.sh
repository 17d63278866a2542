#!/usr/bin/env bash
# Makes sure redis-server is installed (from Debian's packages if absent): every test
# run starts one of its own on a free port (tests/redis_server.py). With REDIS_URL
# set, the tests use that server instead, and nothing is installed.
set -euo pipefail
if [ -n "${REDIS_URL:-}" ] || command -v redis-server >/dev/null; then exit 0; fi
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
$SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server >/dev/null
if ! command -v redis-server >/dev/null; then
  echo "redis-server is still not on PATH after installing the redis-server package" >&2
  exit 1
fi
