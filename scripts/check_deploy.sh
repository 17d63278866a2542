#!/usr/bin/env bash
# Renders the Kubernetes manifests (deploy/k8s/base and every overlay) with
# kustomize and validates the output offline and strictly (unknown fields are
# errors, so are kinds without a schema) against the Kubernetes API schemas that
# kubernetes-validate bundles: for 1.27 (the oldest the manifests support), 1.30
# and the newest the package knows. The example Secret is validated too. Then a
# few checks of the topology itself: every workload has a PodDisruptionBudget
# and the pod hardening, every dns:/// peer address names a headless Service on
# that port. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
KUBECTL="${KUBECTL:-kubectl}"
PY="${PYTHON:-.venv/bin/python}"

if ! command -v "$KUBECTL" >/dev/null 2>&1; then
  echo "check_deploy: $KUBECTL not found: install kubectl 1.27 or later (its" \
    "'kubectl kustomize' renders the manifests), or set KUBECTL to its path" >&2
  exit 1
fi
if ! "$PY" -c "import kubernetes_validate" 2>/dev/null; then
  echo "check_deploy: kubernetes-validate is not installed for $PY:" \
    "run ./scripts/bootstrap.sh dev (it is in the dev extra)" >&2
  exit 1
fi

rendered="$(mktemp -d)"
trap 'rm -rf "$rendered"' EXIT
trees=(deploy/k8s/base deploy/k8s/overlays/*/)
for tree in "${trees[@]}"; do
  tree="${tree%/}"
  name="$(basename "$tree")"
  if ! "$KUBECTL" kustomize "$tree" >"$rendered/$name.yaml"; then
    echo "check_deploy: kustomize could not render $tree" >&2
    exit 1
  fi
  echo "rendered $tree: $(grep -c '^kind:' "$rendered/$name.yaml") resources"
done

"$PY" - "$rendered" deploy/k8s/overlays/*/secret.example.yaml <<'EOF'
"""Strict schema validation of each rendered file, then the topology checks."""

import re
import sys
from pathlib import Path

import yaml
from kubernetes_validate import (
    InvalidSchemaError,
    SchemaNotFoundError,
    ValidationError,
    validate,
)
from kubernetes_validate.utils import all_versions, major_minor

rendered_dir, *examples = sys.argv[1:]
files = sorted(Path(rendered_dir).glob("*.yaml")) + [Path(e) for e in examples]
newest = major_minor(all_versions()[-1])
versions = list(dict.fromkeys(["1.27", "1.30", newest]))
failures: list[str] = []


def name_of(doc: dict) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def pod_problems(doc: dict) -> list[str]:
    """What the restricted Pod Security Standard and our hardening need, missing."""
    spec = doc["spec"]["template"]["spec"]
    pod = spec.get("securityContext", {})
    problems = []
    if not pod.get("runAsNonRoot"):
        problems.append("pod runAsNonRoot")
    if pod.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append("pod seccompProfile RuntimeDefault")
    for container in spec.get("initContainers", []) + spec["containers"]:
        ctx = container.get("securityContext", {})
        where = f"container {container['name']}"
        if ctx.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where} allowPrivilegeEscalation false")
        if not ctx.get("readOnlyRootFilesystem"):
            problems.append(f"{where} readOnlyRootFilesystem")
        if ctx.get("capabilities", {}).get("drop") != ["ALL"]:
            problems.append(f"{where} capabilities drop ALL")
        if "resources" not in container or "limits" not in container["resources"]:
            problems.append(f"{where} resource limits")
    return problems


def topology_problems(docs: list[dict]) -> list[str]:
    problems = []
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    budgets = [d["spec"]["selector"]["matchLabels"] for d in docs if d["kind"] == "PodDisruptionBudget"]
    for workload in workloads:
        labels = workload["spec"]["template"]["metadata"].get("labels", {})
        if not any(sel.items() <= labels.items() for sel in budgets):
            problems.append(f"{name_of(workload)} has no PodDisruptionBudget")
        problems += [f"{name_of(workload)} lacks {p}" for p in pod_problems(workload)]
    services = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Service"}
    for config in (d for d in docs if d["kind"] == "ConfigMap"):
        for key, value in config.get("data", {}).items():
            match = re.fullmatch(r"dns:///([a-z0-9-]+):(\d+)", value)
            if not key.startswith("THREADLINE_ADDRESSES__") or not match:
                continue
            host, port = match[1], int(match[2])
            service = services.get(host)
            if service is None or service.get("clusterIP") != "None":
                problems.append(f"{key}={value}: no headless Service {host}")
            elif port not in [p["port"] for p in service["ports"]]:
                problems.append(f"{key}={value}: Service {host} has no port {port}")
    return problems


for path in files:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    for version in versions:
        for doc in docs:
            try:
                validate(doc, version, strict=True)
            except ValidationError as exc:
                where = ".".join(str(p) for p in exc.path)
                failures.append(f"{path.name} {name_of(doc)} (Kubernetes {version}): {where}: {exc.message}")
            except (SchemaNotFoundError, InvalidSchemaError) as exc:
                failures.append(f"{path.name} {name_of(doc)} (Kubernetes {version}): {exc.message}")
    is_rendered = path.parent == Path(rendered_dir)
    if is_rendered:
        failures += [f"{path.name}: {problem}" for problem in topology_problems(docs)]
    label = f"{path.stem} (rendered; topology checked)" if is_rendered else str(path)
    print(f"validated {label}: {len(docs)} resources, strict, Kubernetes {', '.join(versions)}")

for failure in failures:
    print(f"FAIL {failure}", file=sys.stderr)
if failures:
    sys.exit(f"check_deploy: {len(failures)} failures")
print("check_deploy: all manifests valid")
EOF
