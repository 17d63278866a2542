"""Prometheus metrics of the proxy (served on /metrics when metrics_port is set)."""

from __future__ import annotations

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
