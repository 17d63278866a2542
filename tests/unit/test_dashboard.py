"""deploy/grafana/threadline.json asks only for series the services export."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import REGISTRY

import threadline.stack  # noqa: F401  (imports every service, registering its families)

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "threadline.json"


def test_every_series_of_the_dashboard_is_one_threadline_exports() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    asked = {name for q in queries for name in re.findall(r"\bthreadline_[a-z_]+", q)}
    # Every sample name (counter _total, histogram _bucket ...) of the registered families.
    exported = set(REGISTRY._names_to_collectors)

    assert len(queries) >= 15
    assert asked - exported == set()
    # The golden signals of every service: traffic, errors, latency, saturation.
    for family in (
        "threadline_rpc_handled_total",
        "threadline_rpc_handling_seconds_bucket",
        "threadline_rpc_in_flight",
        "threadline_turn_first_delta_seconds_bucket",
    ):
        assert family in asked
