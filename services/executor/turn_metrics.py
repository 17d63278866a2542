"""Turn metrics, derived from the turn events this process publishes.

Every turn ends with exactly one of turn.completed, turn.interrupted or
turn.failed, carrying its latency (and, once the model answered, the time to the
first delta): counting those keeps the turn loop free of metric calls and the
figures the same as the events operators tail.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from threadline.events import observe
from threadline.telemetry import metrics
from threadline.v1.events_pb2 import LifecycleEvent

_OUTCOMES = {
    "turn.completed": "completed",
    "turn.interrupted": "interrupted",
    "turn.failed": "failed",
}


def _on_event(event: LifecycleEvent, attributes: Mapping[str, Any]) -> None:
    outcome = _OUTCOMES.get(event.type)
    if outcome is None:
        return
    metrics.TURNS.labels(outcome).inc()
    latency_ms = attributes.get("latency_ms")
    if isinstance(latency_ms, int | float):
        metrics.TURN_SECONDS.labels(outcome).observe(latency_ms / 1000)
    first_delta_ms = attributes.get("first_delta_ms")
    if isinstance(first_delta_ms, int | float):
        metrics.TURN_FIRST_DELTA.observe(first_delta_ms / 1000)


def install() -> None:
    """Count from this process's turn events from now on (idempotent)."""
    observe(_on_event)
