"""The time a request spends in llm_proxy itself, as opposed to waiting.

Measured on the task that relays the answer: the request's wall time minus the
time it waits for the upstream's next batch of events (connect, request, the
model's tokens), for its caller to take a chunk, and for a retry's backoff. What
is left is the proxy's routing, rate limiting, request building and relaying,
plus any time the task waited for the event loop behind other requests: the
latency the proxy adds. Decoding the upstream's bytes happens beside it, in the
stream's reader task, and counts only where the relay waits for it.
"""

from __future__ import annotations

import time

from prometheus_client import Histogram

OVERHEAD = Histogram(
    "threadline_llm_proxy_overhead_seconds",
    "Time a request spent in llm_proxy itself (not waiting on the upstream or the caller)",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1),
)
#: Trailing metadata key of StreamChat and Chat: the same figure, in milliseconds.
TRAILER = "threadline-proxy-overhead-ms"


class RequestClock:
    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.waited = 0.0

    def waiting(self) -> _Wait:
        """A wait that is not the proxy's own work (a context manager)."""
        # A small class, not @contextmanager: this runs twice per relayed chunk.
        return _Wait(self)

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started

    def overhead_s(self) -> float:
        return max(0.0, self.elapsed_s() - self.waited)


class _Wait:
    __slots__ = ("_began", "_clock")

    def __init__(self, clock: RequestClock) -> None:
        self._clock = clock
        self._began = 0.0

    def __enter__(self) -> None:
        self._began = time.perf_counter()

    def __exit__(self, *exc_info: object) -> None:
        self._clock.waited += time.perf_counter() - self._began
