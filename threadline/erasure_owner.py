"""An owner service's side of the session erasure cascade (services/session/erasure.py).

An owner (memory, executor) keeps something of sessions. Every replica runs one
`ErasureFollower`: it asks the session service for the deletions its owner has
not acknowledged, erases what it keeps of each, and acknowledges with counts.
Erasing is idempotent, so two replicas doing the same one, or a replica killed
halfway and doing it again after its restart, leave the same result; the pending
entry stays in the session store until an acknowledgement lands, so no deletion
is ever lost to a crash, a restart or a dropped event.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from threadline import errors
from threadline.cancellation import cancel_and_wait
from threadline.logs import get_logger
from threadline.v1 import session_pb2

log = get_logger(__name__)

#: Erasures asked for per poll.
BATCH = 100

#: Erases what the owner keeps of one deleted session; what it removed, by kind.
Eraser = Callable[[session_pb2.Erasure], Awaitable[dict[str, int]]]


class ErasureSource(Protocol):
    """What a follower needs of the session service (`threadline.peers.SessionClient`)."""

    async def pending_erasures(self, owner: str, limit: int = 0) -> list[session_pb2.Erasure]: ...

    async def acknowledge_erasure(
        self, owner: str, session_id: str, removed: dict[str, int]
    ) -> bool: ...


@dataclass
class ErasureFollower:
    owner: str
    source: ErasureSource
    erase: Eraser
    interval_s: float = 5.0
    #: Run after each pass, for an owner that also looks for leftovers of its own.
    sweep: Callable[[], Awaitable[int]] | None = None
    _task: asyncio.Task[None] | None = field(default=None, repr=False)
    _stopping: bool = field(default=False, repr=False)

    async def run_once(self) -> int:
        """Erase and acknowledge every pending erasure; how many were acknowledged."""
        done = 0
        while not self._stopping:
            batch = await self.source.pending_erasures(self.owner, BATCH)
            acknowledged = 0
            for erasure in batch:
                try:
                    removed = await self.erase(erasure)
                except errors.Unavailable:
                    raise  # the store is down: the rest would fail alike
                except Exception:
                    # Left pending for the next pass; the others must not wait for it.
                    log.exception("erasure.failed", owner=self.owner, session_id=erasure.session_id)
                    continue
                await self.source.acknowledge_erasure(self.owner, erasure.session_id, removed)
                log.info(
                    "erasure.acknowledged",
                    owner=self.owner,
                    session_id=erasure.session_id,
                    reason=erasure.reason,
                    removed=removed,
                )
                acknowledged += 1
            done += acknowledged
            # A short batch was the last; a batch of failures would come back unchanged.
            if len(batch) < BATCH or not acknowledged:
                break
        return done

    def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self._run(), name=f"erasures-{self.owner}")

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self.run_once()
                if self.sweep is not None:
                    await self.sweep()
            except errors.Unavailable as exc:
                # The session service is down or restarting: the erasures wait for it.
                log.warning("erasure.source_unavailable", owner=self.owner, error=exc.message)
            except Exception:
                log.exception("erasure.pass_failed", owner=self.owner)
            await asyncio.sleep(self.interval_s)

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
