#!/usr/bin/env bash
# Makes sure a Redis answers on 127.0.0.1:6379 (or $REDIS_URL): starts redis-server,
# installing it from Debian's packages if it is absent.
set -euo pipefail
ping() { .venv/bin/python -c "import os,redis; redis.Redis.from_url(os.environ.get('REDIS_URL','redis://127.0.0.1:6379/15'), socket_connect_timeout=1).ping()" 2>/dev/null; }
if ping; then exit 0; fi
if [ -n "${REDIS_URL:-}" ]; then echo "REDIS_URL=$REDIS_URL does not answer" >&2; exit 1; fi
if ! command -v redis-server >/dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server >/dev/null
fi
redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
for _ in $(seq 50); do ping && exit 0; sleep 0.1; done
echo "redis-server did not come up on 127.0.0.1:6379" >&2
exit 1
