"""Writes that must outlive the turn that started them.

When a turn is cancelled (the client left, or shutdown passed its grace) what the
user already saw is still stored, and after a turn memory is told what it cost.
Those writes run as tasks of their own, which shutdown waits for (boundedly).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from threadline.logs import get_logger

log = get_logger(__name__)


class DetachedWrites:
    def __init__(self) -> None:
        self._pending: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._pending)

    def start(self, write: Coroutine[Any, Any, None], name: str) -> None:
        """Run `write` to its end even if the caller is cancelled right after."""
        task = asyncio.create_task(write, name=name)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Wait (boundedly) for the writes still running (called on shutdown)."""
        if not self._pending:
            return
        log.info("turn.draining_writes", count=len(self._pending))
        _, pending = await asyncio.wait(self._pending, timeout=timeout_s)
        if pending:
            log.error("turn.partial_writes_abandoned", count=len(pending))
