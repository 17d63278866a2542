"""An upstream's connection pool as a wait of its own.

A request that waits for a connection has not reached its upstream yet: the
wait is bounded by `timeouts.pool_wait_s` (not the connect timeout), says
nothing about the upstream's health (when it runs out the request fails over
as `RateLimited`, never a circuit-breaker failure) and is visible while it
lasts (`metrics.Waits`: queue depth and time waited).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from services.llm_proxy.limits import RateLimited
from services.llm_proxy.metrics import Waits

#: The `resource` label of a wait for one of an upstream's pooled connections.
CONNECTION = "connection"


class ConnectionSlots:
    """One upstream's connections, handed out first come, first served.

    The HTTP connector is given the same limit, so a request holding a slot
    never waits inside the connector: its connect timeout bounds the TCP/TLS
    connect alone.
    """

    def __init__(self, upstream: str, size: int, wait_s: float) -> None:
        self.upstream = upstream
        self.size = size
        self.wait_s = wait_s
        self._free = asyncio.Semaphore(size)
        self.waits = Waits(upstream, CONNECTION)
        self.in_use = 0

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[float]:
        """A connection slot for the block; yields the seconds waited for it (0 if none).

        Raises `RateLimited` (limit "connection pool") after `wait_s` without one.
        """
        waited = 0.0
        if self._free.locked():
            started = time.perf_counter()
            with self.waits.waiting():
                try:
                    async with asyncio.timeout(self.wait_s):
                        await self._free.acquire()
                except TimeoutError:
                    raise RateLimited(self.upstream, "connection pool", 1.0) from None
            waited = time.perf_counter() - started
        else:
            await self._free.acquire()
        self.in_use += 1
        try:
            yield waited
        finally:
            self.in_use -= 1
            self._free.release()
