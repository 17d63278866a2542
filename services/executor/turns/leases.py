"""Turn leases: one turn at a time per session, across executor replicas with Redis."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from threadline import errors
from threadline.leases import HeldLease, Leases


def _busy(session_id: str) -> errors.Aborted:
    return errors.Aborted(
        f"session busy: session {session_id} already has a turn running; retry when it ends",
        details={"session_id": session_id, "reason": "session_busy"},
    )


class TurnLeases:
    def __init__(self, leases: Leases) -> None:
        self._leases = leases

    @contextlib.asynccontextmanager
    async def hold(self, session_id: str) -> AsyncIterator[HeldLease]:
        """Hold the session's lease for the block; raises Aborted if another turn has it."""
        held = await self._leases.acquire(session_id)
        if held is None:
            raise _busy(session_id)
        try:
            yield held
        finally:
            await held.release()


def lease_lost(session_id: str) -> errors.Aborted:
    """The turn's lease expired and another turn took the session: this one stops."""
    return errors.Aborted(
        f"session {session_id} was taken over by another turn while this one could not "
        "renew its lease; retry",
        details={"session_id": session_id, "reason": "lease_lost"},
    )
