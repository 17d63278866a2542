"""Prometheus metrics: the families threadline defines, and /metrics for a process.

A process exports only the families of the services it runs (`serve`): all of
them register in prometheus_client's default registry when imported, since one
package holds all five services, and the endpoint leaves out the families owned
by services that run elsewhere. So `threadline serve session` shows the per-RPC,
store and event families and none of llm_proxy's; `threadline up` shows all.
Per-RPC series carry `service` and `method` (the gRPC path), as the dashboard in
deploy/grafana/ expects.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from threadline.logs import get_logger
from threadline.startup_errors import BindError

log = get_logger("threadline.metrics")

#: Seconds; from a health check (sub-millisecond) to a long streamed turn (minutes).
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

RPC_HANDLED = Counter(
    "threadline_rpc_handled_total",
    "RPCs answered by this service, by gRPC status code (errors: code != OK)",
    ["service", "method", "code"],
)
RPC_SECONDS = Histogram(
    "threadline_rpc_handling_seconds",
    "From an RPC's arrival to its status (a stream: to its last message)",
    ["service", "method"],
    buckets=_LATENCY_BUCKETS,
)
RPC_IN_FLIGHT = Gauge(
    "threadline_rpc_in_flight",
    "RPCs being answered now",
    ["service", "method"],
)

TURNS = Counter(
    "threadline_turns_total",
    "Turns ended, by outcome (completed, interrupted, failed)",
    ["outcome"],
)
TURN_SECONDS = Histogram(
    "threadline_turn_seconds",
    "A turn from its start to its end event, by outcome",
    ["outcome"],
    buckets=_LATENCY_BUCKETS,
)
TURN_FIRST_DELTA = Histogram(
    "threadline_turn_first_delta_seconds",
    "A turn from its start to its first answer delta (what a user waits for)",
    buckets=_LATENCY_BUCKETS,
)

MEMORY_JOBS_QUEUED = Counter(
    "threadline_memory_jobs_queued_total",
    "Memory jobs put on the queue, by kind (consolidation, extraction, compaction)",
    ["kind"],
)
MEMORY_JOBS_RUNNING = Gauge(
    "threadline_memory_jobs_running", "Memory jobs running in this replica", ["kind"]
)
MEMORY_JOBS_FINISHED = Counter(
    "threadline_memory_jobs_finished_total",
    "Memory jobs ended, by kind and outcome (done, skipped, failed)",
    ["kind", "outcome"],
)
MEMORY_JOB_SECONDS = Histogram(
    "threadline_memory_job_seconds",
    "A memory job's run, by kind",
    ["kind"],
    buckets=_LATENCY_BUCKETS,
)

STORE_OPERATIONS = Counter(
    "threadline_store_operations_total",
    "Store calls, by store (session, memory, tasks), backend, operation and outcome",
    ["store", "backend", "operation", "outcome"],
)
STORE_SECONDS = Histogram(
    "threadline_store_operation_seconds",
    "A store call's duration",
    ["store", "backend", "operation"],
    buckets=_LATENCY_BUCKETS,
)

#: Family name prefixes -> the services that own them; families matching no prefix
#: (per-RPC, events, the process's own) belong to every service.
_OWNERS: dict[str, frozenset[str]] = {
    "threadline_llm_": frozenset({"llm_proxy"}),
    "threadline_turn": frozenset({"executor"}),
    "threadline_memory_": frozenset({"memory"}),
    "threadline_store_": frozenset({"session", "memory", "executor"}),
}


class _OwnFamilies(Collector):
    """The default registry, less the families no service of this process owns."""

    def __init__(self, services: Collection[str]) -> None:
        self._left_out = tuple(
            prefix for prefix, owners in _OWNERS.items() if not owners & set(services)
        )

    def collect(self) -> Iterator[Metric]:
        for family in REGISTRY.collect():
            if not family.name.startswith(self._left_out):
                yield family


def serve(port: int, host: str, services: Collection[str]) -> int:
    """/metrics of `services` on `host:port` in a daemon thread; returns the bound port
    (0 picks one)."""
    try:
        server, _thread = start_http_server(port, addr=host, registry=_OwnFamilies(services))
    except OSError:
        raise BindError(
            "metrics", f"{host}:{port}", "metrics_port (THREADLINE_METRICS_PORT)"
        ) from None
    bound = int(server.server_address[1])
    log.info("metrics.listening", port=bound)
    return bound
