#!/usr/bin/env bash
# Writes requirements.lock: every package the image installs (pyproject.toml's
# dependencies, no extras), pinned with hashes, resolved by pip-compile (pip-tools,
# in the dev extra) for the image's Python (3.11, Linux). Run after changing
# dependencies in pyproject.toml; CI (scripts/check_lock.py) fails until you do.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
"$PY" -m piptools compile --quiet --generate-hashes --strip-extras --no-emit-index-url \
  --no-emit-find-links --no-header --output-file "$out" pyproject.toml
{
  echo "# What the image installs (deploy/Dockerfile): written by scripts/lock.sh, checked"
  echo "# against pyproject.toml by scripts/check_lock.py. Do not edit by hand."
  echo "# pyproject-dependencies-sha256: $("$PY" scripts/check_lock.py --digest)"
  cat "$out"
} >requirements.lock
"$PY" scripts/check_lock.py
