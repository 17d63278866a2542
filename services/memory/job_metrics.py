"""Memory job metrics, derived from the job events this process publishes.

The job runner already says when a job starts and how it ends (`_EVENTS` in
jobs.py); counting from those events keeps the runner free of metric calls and
the metrics exactly in step with what `events tail` shows.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from threadline.events import observe
from threadline.telemetry import metrics
from threadline.v1.events_pb2 import LifecycleEvent

#: Event type prefix -> the `kind` label (the job kinds of jobs.py).
_KINDS = {
    "memory.consolidation": "consolidate",
    "memory.extraction": "extract",
    "compact": "compact",
}
_STARTED = ("started", "start")
#: Jobs that started here and have not ended, by id: their start time. Bounded by
#: the jobs one replica runs at once (each ends with done or failed).
_running: dict[str, tuple[str, float]] = {}


def _on_event(event: LifecycleEvent, attributes: Mapping[str, Any]) -> None:
    prefix, _, stage = event.type.rpartition(".")
    kind = _KINDS.get(prefix)
    job_id = str(attributes.get("job_id", ""))
    if kind is None or not job_id:
        return
    if stage in _STARTED:
        _running[job_id] = (kind, time.perf_counter())
        metrics.MEMORY_JOBS_RUNNING.labels(kind).inc()
        return
    if stage not in ("done", "failed"):
        return
    outcome = "skipped" if attributes.get("skipped") else stage
    metrics.MEMORY_JOBS_FINISHED.labels(kind, outcome).inc()
    started = _running.pop(job_id, None)
    if started is not None:
        metrics.MEMORY_JOBS_RUNNING.labels(kind).dec()
        metrics.MEMORY_JOB_SECONDS.labels(kind).observe(time.perf_counter() - started[1])


def install() -> None:
    """Count from this process's job events from now on (idempotent)."""
    observe(_on_event)
