#!/usr/bin/env bash
# Renders the Kubernetes manifests (deploy/k8s/base and every overlay) with
# kustomize and validates the output offline and strictly (unknown fields are
# errors, so are kinds without a schema) against the Kubernetes API schemas that
# kubernetes-validate bundles: for 1.27 (the oldest the manifests support), 1.30
# and the newest the package knows. The example Secret is validated too. Then a
# few checks of the topology itself: every workload has a PodDisruptionBudget
# and the pod hardening, every dns:/// peer address names a headless Service on
# that port, every threadline pod reads the service token from the Secret, and
# the NetworkPolicies deny everything by default and allow exactly threadline's
# edges (evaluated here between the rendered pods); every threadline object
# carries the app.kubernetes.io labels, gateway, executor and llm-proxy have an
# autoscaler that owns their replica count, every pod declares its metrics port,
# and no image runs from a moving tag (latest) that a node may serve from its cache.
# The optional components no overlay includes (components/monitoring) are
# rendered on top of the production overlay and checked the same way; the
# ServiceMonitor (a CRD kubernetes-validate has no schema for) is checked for
# selecting every threadline Service by a port it has. Exits non-zero on any failure.
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
# The optional components no overlay includes, rendered on top of the production
# overlay: what an operator gets by adding them.
for component in deploy/k8s/components/monitoring; do
  name="production+$(basename "$component")"
  mkdir -p "$rendered/$name.d"
  printf 'apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - %s\ncomponents:\n  - %s\n' \
    "$(realpath --relative-to="$rendered/$name.d" deploy/k8s/overlays/production)" \
    "$(realpath --relative-to="$rendered/$name.d" "$component")" >"$rendered/$name.d/kustomization.yaml"
  if ! "$KUBECTL" kustomize "$rendered/$name.d" >"$rendered/$name.yaml"; then
    echo "check_deploy: kustomize could not render the production overlay with $component" >&2
    exit 1
  fi
  echo "rendered production overlay + $component: $(grep -c '^kind:' "$rendered/$name.yaml") resources"
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


#: Kinds of the Prometheus Operator's CRDs: kubernetes-validate has no schema for them,
#: so they are checked for what threadline relies on (crd_problems) instead.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
AUTOSCALED = ("gateway", "executor", "llm-proxy")
METRICS_PORT = 9090


def label_problems(docs: list[dict]) -> list[str]:
    """The recommended app.kubernetes.io labels on every threadline object and pod."""
    problems = []
    for doc in docs:
        labels = doc.get("metadata", {}).get("labels", {})
        if labels.get("app") not in THREADLINE:
            continue
        wanted = {"app.kubernetes.io/name": labels["app"], "app.kubernetes.io/part-of": "threadline"}
        places = [("", labels)]
        if doc["kind"] == "Deployment":
            places.append((" pods", doc["spec"]["template"]["metadata"].get("labels", {})))
        for where, found in places:
            for key, value in wanted.items():
                if found.get(key) != value:
                    problems.append(f"{name_of(doc)}{where}: label {key}={value} missing")
            if "app.kubernetes.io/component" not in found:
                problems.append(f"{name_of(doc)}{where}: label app.kubernetes.io/component missing")
    return problems


def scaling_problems(docs: list[dict]) -> list[str]:
    """An autoscaler for each stateless service, owning its replica count; metrics exposed."""
    problems = []
    targets = {d["spec"]["scaleTargetRef"]["name"] for d in docs if d["kind"] == "HorizontalPodAutoscaler"}
    config = {k: v for d in docs if d["kind"] == "ConfigMap" for k, v in d.get("data", {}).items()}
    for workload in (d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] in THREADLINE):
        name = workload["metadata"]["name"]
        if name in AUTOSCALED and name not in targets:
            problems.append(f"{name_of(workload)} has no HorizontalPodAutoscaler")
        if name in targets and "replicas" in workload["spec"]:
            problems.append(f"{name_of(workload)} sets replicas, which its autoscaler owns")
        ports = {p.get("name"): p["containerPort"] for c in workload["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        if ports.get("metrics") != METRICS_PORT:
            problems.append(f"{name_of(workload)} declares no metrics port {METRICS_PORT}")
    if config and config.get("THREADLINE_METRICS_PORT") != str(METRICS_PORT):
        problems.append(f"THREADLINE_METRICS_PORT is not {METRICS_PORT} in the ConfigMap")
    return problems


def image_problems(docs: list[dict]) -> list[str]:
    """No moving tag (`latest`, or none) on an image a node may serve from its cache."""
    problems = []
    for workload in (d for d in docs if d["kind"] in ("Deployment", "StatefulSet")):
        spec = workload["spec"]["template"]["spec"]
        for container in spec.get("initContainers", []) + spec["containers"]:
            image = container["image"]
            tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
            if "@sha256:" not in image and tag in ("", "latest") and container.get("imagePullPolicy") != "Always":
                problems.append(f"{name_of(workload)} runs {image} (a moving tag) with imagePullPolicy {container.get('imagePullPolicy', 'default')}")
    return problems


def crd_problems(docs: list[dict]) -> list[str]:
    """A ServiceMonitor selects every threadline Service and names a port each one has."""
    problems = []
    services = [d for d in docs if d["kind"] == "Service"]
    for monitor in (d for d in docs if d["kind"] == "ServiceMonitor"):
        spec = monitor["spec"]
        ports = [e.get("port") for e in spec.get("endpoints", [])]
        if not ports or None in ports:
            problems.append(f"{name_of(monitor)}: every endpoint needs a named port")
        chosen = {s["metadata"]["name"]: s for s in services if selects(spec["selector"], s["metadata"].get("labels", {}))}
        for name in THREADLINE:
            if name not in chosen:
                problems.append(f"{name_of(monitor)} does not select Service/{name}")
                continue
            names = {p.get("name") for p in chosen[name]["spec"]["ports"]}
            problems += [f"{name_of(monitor)}: Service/{name} has no port {p}" for p in ports if p not in names]
    return problems


def topology_problems(docs: list[dict]) -> list[str]:
    problems = label_problems(docs) + scaling_problems(docs) + crd_problems(docs) + image_problems(docs)
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


THREADLINE = ("gateway", "executor", "llm-proxy", "session", "memory")
#: Every connection between pods of the namespace; NetworkPolicies must allow these
#: (where both ends are rendered) and nothing else.
EDGES = {
    ("gateway", "executor", 50052),
    ("gateway", "session", 50054),
    ("gateway", "memory", 50055),
    ("executor", "session", 50054),
    ("executor", "memory", 50055),
    ("executor", "llm-proxy", 50053),
    ("memory", "session", 50054),
    ("memory", "llm-proxy", 50053),
    *((service, "redis", 6379) for service in THREADLINE),
    *((service, "postgres", 5432) for service in ("executor", "session", "memory")),
}
#: The only ports open to callers outside the namespace.
PUBLIC = {("gateway", 50051)}


def selects(selector: dict, labels: dict) -> bool:
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        present = key in labels
        if (op == "In" and labels.get(key) not in values) or (op == "NotIn" and labels.get(key) in values):
            return False
        if (op == "Exists" and not present) or (op == "DoesNotExist" and present):
            return False
    return True


def peer_matches(peer: dict, labels: dict | None) -> bool:
    """Whether a from/to peer admits a pod of this namespace (labels) or, with None, an
    outside caller. Only an empty namespaceSelector is taken to include this namespace."""
    if labels is None:
        return "ipBlock" in peer or peer.get("namespaceSelector") == {}
    if "ipBlock" in peer:
        return False
    if "namespaceSelector" in peer and peer["namespaceSelector"] != {}:
        return False
    return selects(peer.get("podSelector", {}), labels)


def allows(policies: list[dict], kind: str, pod: dict, other: dict | None, port: int) -> bool:
    """Whether `pod`'s policies of `kind` (Ingress, Egress) let it talk to `other` on `port`."""
    field, peers = ("ingress", "from") if kind == "Ingress" else ("egress", "to")
    mine = [p["spec"] for p in policies if kind in p["spec"].get("policyTypes", []) and selects(p["spec"]["podSelector"], pod["labels"])]
    if not mine:
        return True
    for rule in (r for spec in mine for r in spec.get(field, [])):
        ports = [p.get("port") for p in rule.get("ports", [])]
        if ports and port not in ports:
            continue
        if not rule.get(peers) or any(peer_matches(peer, other and other["labels"]) for peer in rule[peers]):
            return True
    return False


def network_problems(docs: list[dict]) -> list[str]:
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    if not any(p["spec"]["podSelector"] == {} and {"Ingress", "Egress"} <= set(p["spec"].get("policyTypes", [])) and not p["spec"].get("ingress") and not p["spec"].get("egress") for p in policies):
        return ["no default-deny NetworkPolicy (empty podSelector, Ingress and Egress, no rules)"]
    pods = {}
    for workload in (d for d in docs if d["kind"] in ("Deployment", "StatefulSet")):
        spec = workload["spec"]["template"]
        ports = [p["containerPort"] for c in spec["spec"]["containers"] for p in c.get("ports", [])]
        pods[workload["metadata"]["name"]] = {"labels": spec["metadata"].get("labels", {}), "ports": ports}
    problems = []
    for src, dst in ((s, d) for s in pods for d in pods if s != d):
        for port in pods[dst]["ports"]:
            allowed = allows(policies, "Egress", pods[src], pods[dst], port) and allows(policies, "Ingress", pods[dst], pods[src], port)
            if allowed != ((src, dst, port) in EDGES):
                problems.append(f"NetworkPolicies {'allow' if allowed else 'do not allow'} {src} -> {dst}:{port}")
    for name, pod in pods.items():
        for port in pod["ports"]:
            if allows(policies, "Ingress", pod, None, port) != ((name, port) in PUBLIC):
                problems.append(f"NetworkPolicies {'open' if (name, port) not in PUBLIC else 'close'} {name}:{port} to callers outside the namespace")
        dns = [r for p in policies if "Egress" in p["spec"].get("policyTypes", []) and selects(p["spec"]["podSelector"], pod["labels"]) for r in p["spec"].get("egress", []) if any(q.get("port") == 53 and q.get("protocol") == "UDP" for q in r.get("ports", []))]
        if not dns:
            problems.append(f"NetworkPolicies give {name} no DNS (UDP 53)")
    return problems


def token_problems(docs: list[dict]) -> list[str]:
    problems = []
    for workload in (d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] in THREADLINE):
        env = workload["spec"]["template"]["spec"]["containers"][0].get("env", [])
        token = [e for e in env if e["name"] == "THREADLINE_SERVICE_AUTH__TOKEN"]
        if not token or "secretKeyRef" not in token[0].get("valueFrom", {}):
            problems.append(f"{name_of(workload)} does not read THREADLINE_SERVICE_AUTH__TOKEN from a Secret")
    return problems


for path in files:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    for version in versions:
        for doc in docs:
            if (doc.get("apiVersion"), doc.get("kind")) in CRD_KINDS:
                continue
            try:
                validate(doc, version, strict=True)
            except ValidationError as exc:
                where = ".".join(str(p) for p in exc.path)
                failures.append(f"{path.name} {name_of(doc)} (Kubernetes {version}): {where}: {exc.message}")
            except (SchemaNotFoundError, InvalidSchemaError) as exc:
                failures.append(f"{path.name} {name_of(doc)} (Kubernetes {version}): {exc.message}")
    is_rendered = path.parent == Path(rendered_dir)
    if is_rendered:
        problems = topology_problems(docs) + network_problems(docs) + token_problems(docs)
        failures += [f"{path.name}: {problem}" for problem in problems]
    label = f"{path.stem} (rendered; topology checked)" if is_rendered else str(path)
    print(f"validated {label}: {len(docs)} resources, strict, Kubernetes {', '.join(versions)}")

for failure in failures:
    print(f"FAIL {failure}", file=sys.stderr)
if failures:
    sys.exit(f"check_deploy: {len(failures)} failures")
print("check_deploy: all manifests valid")
EOF
