"""Background jobs give way: a model call is followed by a rest in proportion.

Consolidation and extraction are never urgent, and each of their model calls
costs CPU in llm_proxy, the session service and this one, the same CPU a
user's turn needs. Like PostgreSQL's autovacuum cost delay, a worker rests
after each call for `(1 / duty_cycle - 1)` times as long as the call took: at
0.5 it rests as long as it worked. Calls slow down when the system is busy, so
the rests grow with the load. Compaction is not paced: a turn may be waiting.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from services.memory.consolidation import Summariser
from threadline.v1 import llm_pb2


@dataclass
class PacedLlm:
    llm: Summariser
    #: Share of a worker's time spent in model calls, in (0, 1]; 1 never rests.
    duty_cycle: float
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    async def chat(
        self, request: llm_pb2.ChatRequest, *, timeout: float | None = None
    ) -> llm_pb2.ChatResponse:
        started = time.monotonic()
        try:
            response = await self.llm.chat(request, timeout=timeout)
        except Exception:
            await self._rest(started)  # a failing upstream is not asked again at once either
            raise
        await self._rest(started)
        return response

    async def _rest(self, started: float) -> None:
        if self.duty_cycle < 1:
            await self.sleep((time.monotonic() - started) * (1 / self.duty_cycle - 1))
