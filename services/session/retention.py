"""Retention: idle sessions expire, tenants keep at most their cap, orphans go.

The sweep runs in the background every `interval_s`; a failing sweep is logged
and the loop goes on. The per-tenant cap is enforced when a session is created,
so it holds at every moment, not only after the next sweep.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from services.session.store import SessionStore
from threadline import errors
from threadline.cancellation import cancel_and_wait
from threadline.events import EventPublisher
from threadline.logs import get_logger

log = get_logger(__name__)


@dataclass
class Retention:
    store: SessionStore
    events: EventPublisher
    ttl_s: float = 0
    max_sessions_per_tenant: int = 0
    interval_s: float = 300
    clock: Callable[[], float] = time.time
    _task: asyncio.Task[None] | None = field(default=None, repr=False)

    async def enforce_cap(self, tenant: str) -> None:
        if not self.max_sessions_per_tenant:
            return
        for session_id in await self.store.beyond_cap(tenant, self.max_sessions_per_tenant):
            await self._delete(tenant, session_id, reason="tenant_cap")

    async def sweep(self) -> int:
        """One pass: expire idle sessions, remove orphans. Returns sessions expired."""
        expired = 0
        if self.ttl_s:
            idle_before = int((self.clock() - self.ttl_s) * 1_000_000)
            while True:
                batch = await self.store.expired(idle_before, 500)
                for tenant, session_id in batch:
                    expired += await self._delete(tenant, session_id, reason="idle")
                if len(batch) < 500:
                    break
        orphans = await self.store.cleanup_orphans()
        if expired or orphans:
            log.info("retention.swept", expired=expired, orphans_removed=orphans)
        return expired

    async def _delete(self, tenant: str, session_id: str, *, reason: str) -> int:
        try:
            # The erasure (what memory and the executor must remove) is recorded with
            # the delete, in one transaction: an expiry cannot lose its cascade.
            await self.store.delete(tenant, session_id, reason=reason)
        except errors.NotFound:
            return 0  # deleted meanwhile (another replica's sweep, or the user)
        self.events.emit("session.expired", tenant=tenant, session_id=session_id, reason=reason)
        return 1

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="session-retention")

    async def _run(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:
                log.exception("retention.sweep_failed")
            await asyncio.sleep(self.interval_s)

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
