#!/usr/bin/env bash
# Regenerates the Python stubs and .pyi files from protos/ into threadline/v1/.
# The output is checked in; CI fails when running this leaves a diff.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
# protoc finds the mypy-protobuf plugins (protoc-gen-mypy) on PATH.
[ -d .venv/bin ] && export PATH="$PWD/.venv/bin:$PATH"
rm -f threadline/v1/*_pb2.py threadline/v1/*_pb2.pyi threadline/v1/*_pb2_grpc.py threadline/v1/*_pb2_grpc.pyi
"$PY" -m grpc_tools.protoc -I protos \
  --python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. \
  protos/threadline/v1/*.proto
