"""Prometheus metrics of the proxy (served on /metrics when metrics_port is set)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from prometheus_client import Counter, Gauge, Histogram

ATTEMPTS = Counter(
    "threadline_llm_attempts_total",
    "Attempts against upstreams, by outcome (ok, failed, interrupted)",
    ["upstream", "model", "outcome"],
)
RETRIES = Counter(
    "threadline_llm_retries_total", "Retries on the same upstream", ["upstream", "model", "reason"]
)
FAILOVERS = Counter(
    "threadline_llm_failovers_total",
    "Moves from one upstream to the next",
    ["from_upstream", "to_upstream", "reason"],
)
RATE_LIMITED = Counter(
    "threadline_llm_rate_limited_total", "Requests that found no capacity", ["upstream", "limit"]
)
TTFT = Histogram(
    "threadline_llm_time_to_first_token_seconds",
    "From the start of an attempt to its first delta",
    ["upstream", "model"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
TOKENS = Counter(
    "threadline_llm_tokens_total",
    "Tokens billed by upstreams (prompt, completion)",
    ["upstream", "model", "kind"],
)
CIRCUIT_OPEN = Gauge(
    "threadline_llm_circuit_open", "1 while an upstream's circuit is open", ["upstream"]
)
WAITING = Gauge(
    "threadline_llm_waiting_requests",
    "Requests waiting for local capacity (resource: connection, concurrency)",
    ["upstream", "resource"],
)
WAITED = Histogram(
    "threadline_llm_wait_seconds",
    "How long requests waited for local capacity (resource: connection, concurrency)",
    ["upstream", "resource"],
    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


class Waits:
    """Queue depth and time waited for one resource of one upstream."""

    def __init__(self, upstream: str, resource: str) -> None:
        # Label children resolved once: a labels() lookup per request is measurable.
        self._waiting = WAITING.labels(upstream, resource)
        self._waited = WAITED.labels(upstream, resource)
        self.depth = 0

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        self.depth += 1
        self._waiting.inc()
        started = time.perf_counter()
        try:
            yield
        finally:
            self.depth -= 1
            self._waiting.dec()
            self._waited.observe(time.perf_counter() - started)
