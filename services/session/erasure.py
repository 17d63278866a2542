"""Deleting sessions so that nothing derived from them is left: the session side.

A deletion (Delete, retention, tenant erasure) removes the session's own rows and,
in the same transaction, records an erasure: a tombstone of the id and one pending
entry per owner service (memory, executor). Each owner polls `pending`, erases what
it keeps of the session, idempotently, and acknowledges with what it removed; the
last acknowledgement publishes `session.erased` with every owner's counts. Nothing
rides on an event that could be dropped: a pending entry stays until its owner
acknowledges it, across restarts of any service.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.session.store import Erasure, SessionStore
from threadline import errors
from threadline.events import EventPublisher
from threadline.logs import get_logger
from threadline.v1 import session_pb2

log = get_logger(__name__)

#: Sessions a lineage listing (and a Delete with descendants) goes through at most.
MAX_DESCENDANTS = 1_000

#: Sessions read per step of a tenant erasure.
_TENANT_PAGE = 500


@dataclass
class Erasures:
    store: SessionStore
    events: EventPublisher

    async def delete(
        self, tenant: str, session_id: str, *, reason: str, with_descendants: bool = False
    ) -> list[str]:
        """Delete the session (NotFound if it is absent) and, when asked, everything
        derived from it; the ids deleted, the session first."""
        ids = [session_id]
        if with_descendants:
            ids += [s.id for s in await self.descendants(tenant, session_id)]
        deleted: list[str] = []
        for target in ids:
            try:
                await self.store.delete(tenant, target, reason=reason)
            except errors.NotFound:
                if target == session_id:
                    raise
                continue  # a descendant deleted meanwhile: nothing left to do for it
            deleted.append(target)
            self._announce(tenant, target, reason)
        return deleted

    def _announce(self, tenant: str, session_id: str, reason: str) -> None:
        if reason == "deleted":
            self.events.emit("session.deleted", tenant=tenant, session_id=session_id)
        else:
            self.events.emit("session.expired", tenant=tenant, session_id=session_id, reason=reason)

    async def descendants(self, tenant: str, session_id: str) -> list[session_pb2.Session]:
        """Every session forked or compacted from this one, and from those, breadth first.

        NotFound if the session itself is absent; at most MAX_DESCENDANTS.
        """
        await self.store.get(tenant, session_id)
        found: list[session_pb2.Session] = []
        seen = {session_id}
        frontier = [session_id]
        while frontier and len(found) < MAX_DESCENDANTS:
            parent = frontier.pop(0)
            for child in await self.store.derived(tenant, parent):
                if child.id not in seen:
                    seen.add(child.id)
                    found.append(child)
                    frontier.append(child.id)
        return found[:MAX_DESCENDANTS]

    async def erase_tenant(self, tenant: str) -> int:
        """Delete every session of the tenant; how many this call deleted.

        `tenant.erased` follows when every owner has erased every one of them (at
        once, when there is nothing to wait for)."""
        erased = 0
        while True:
            # Always the first page: what was deleted is gone from the listing.
            sessions, _ = await self.store.list(tenant, page_size=_TENANT_PAGE, page_token="")
            if not sessions:
                break
            before = erased
            for session in sessions:
                try:
                    await self.store.delete(tenant, session.id, reason="tenant_erased")
                except errors.NotFound:
                    continue
                erased += 1
                self._announce(tenant, session.id, "tenant_erased")
            if erased == before:
                break  # listed but not deletable: never loop on a store that disagrees
        log.info("session.tenant_erasure_started", tenant=tenant, sessions=erased)
        await self._tenant_done_if_finished(tenant)
        return erased

    async def pending(self, owner: str, limit: int) -> list[Erasure]:
        return await self.store.pending_erasures(owner, limit or 100)

    async def acknowledge(self, owner: str, session_id: str, removed: Mapping[str, int]) -> bool:
        """Record an owner's acknowledgement; True when it was the last one, and then
        `session.erased` is published with what every owner removed."""
        done = await self.store.acknowledge_erasure(owner, session_id, removed)
        if done is None:
            return False
        erasure = done.erasure
        self.events.emit(
            "session.erased",
            tenant=erasure.tenant,
            session_id=erasure.session_id,
            reason=erasure.reason,
            removed=done.removed,
        )
        if erasure.reason == "tenant_erased":
            await self._tenant_done_if_finished(erasure.tenant)
        return True

    async def _tenant_done_if_finished(self, tenant: str) -> None:
        # No session left as well: while an erasure of the tenant is still deleting,
        # the owners may have caught up with what it deleted so far.
        if await self.store.unfinished_erasures(tenant) == 0:
            left, _ = await self.store.list(tenant, page_size=1, page_token="")
            if not left:
                totals = await self.store.tenant_erasure_totals(tenant)
                self.events.emit(
                    "tenant.erased",
                    tenant=tenant,
                    sessions=totals.sessions,
                    removed=totals.removed,
                )
