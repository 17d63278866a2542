#!/usr/bin/env bash
# Regenerates the Python stubs and .pyi files from protos/ into threadline/v1/.
# The output is checked in; CI fails when running this leaves a diff.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
# protoc finds the mypy-protobuf plugins (protoc-gen-mypy) on PATH.
if [ -d .venv/bin ]; then export PATH="$PWD/.venv/bin:$PATH"; fi
# Generate aside and swap in only on success: a failed run must not delete the stubs.
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
"$PY" -m grpc_tools.protoc -I protos \
  --python_out="$OUT" --grpc_python_out="$OUT" --mypy_out="$OUT" --mypy_grpc_out="$OUT" \
  protos/threadline/v1/*.proto
rm -f threadline/v1/*_pb2.py threadline/v1/*_pb2.pyi threadline/v1/*_pb2_grpc.py threadline/v1/*_pb2_grpc.pyi
cp "$OUT"/threadline/v1/* threadline/v1/
