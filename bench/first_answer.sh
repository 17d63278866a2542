#!/usr/bin/env bash
# Time from `git clone` to the first answer of `threadline chat`, install included,
# as a newcomer would follow the README. An empty pip cache makes pip download and
# compile everything (llama-cpp-python included); pass --warm to keep the cache.
#
#   bench/first_answer.sh [--warm]
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d)"
trap 'kill -INT "$UP" 2>/dev/null; wait "$UP" 2>/dev/null; rm -rf "$WORK"' EXIT
[ "${1:-}" = "--warm" ] || export PIP_CACHE_DIR="$WORK/pip-cache"
start=$(date +%s.%N)
git clone -q "$REPO" "$WORK/threadline" && cd "$WORK/threadline" || exit 1
./scripts/up.sh > "$WORK/up.out" 2> "$WORK/up.err" &
UP=$!
until grep -q "^chat with:" "$WORK/up.err"; do
  kill -0 "$UP" 2>/dev/null || { echo "threadline up exited:"; tail "$WORK/up.err"; exit 1; }
  sleep 1
done
up_at=$(date +%s.%N)
read -r -a chat <<< "$(sed -n 's/^chat with:  //p' "$WORK/up.err")"
"${chat[@]}" -m "What is the capital of France?"
end=$(date +%s.%N)
printf 'stack up after %.0f s; first answer after %.0f s\n' \
  "$(echo "$up_at - $start" | bc)" "$(echo "$end - $start" | bc)"
