"""The one way a turn writes to its session: appends that survive a moved head and a retry."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from services.executor.turns.detached import DetachedWrites
from services.executor.turns.leases import lease_lost
from services.executor.turns.peers import Sessions
from threadline import errors
from threadline.leases import HeldLease
from threadline.logs import get_logger
from threadline.v1 import common_pb2, session_pb2

log = get_logger(__name__)
_ATTEMPTS = 5


@dataclass
class SessionWriter:
    sessions: Sessions
    detached: DetachedWrites

    async def append(
        self,
        tenant: str,
        session_id: str,
        head: str,
        messages: Sequence[common_pb2.Message],
        request_id: str,
        lease: HeldLease | None = None,
        *,
        calibration: session_pb2.CalibrateRequest | None = None,
    ) -> str:
        """Append after `head` and return the new head; if someone else appended
        meanwhile, append after theirs.

        While the turn holds the session's lease, a moved head means a direct Append
        by another client: our messages still belong at the end. Once the lease is
        lost another turn owns the session, and a moved head is its work: the append
        is refused. The request id makes a retry after a lost reply safe: the store
        appends it at most once.
        """
        for attempt in range(_ATTEMPTS):
            try:
                response = await self.sessions.append(
                    tenant,
                    session_id,
                    head,
                    messages,
                    request_id=request_id,
                    calibration=calibration,
                )
                return response.head
            except errors.HeadMismatch as exc:
                if lease is not None and lease.lost:
                    raise lease_lost(session_id) from None
                head = exc.current_head
            except (errors.Unavailable, errors.DeadlineExceeded):
                if attempt == _ATTEMPTS - 1:
                    raise
                await asyncio.sleep(0.1 * 2**attempt)
        raise errors.Aborted(f"session {session_id} keeps changing under the turn; retry")

    def append_detached(
        self,
        tenant: str,
        session_id: str,
        head: str,
        messages: Sequence[common_pb2.Message],
        request_id: str,
        *,
        lost: str,
        lease: HeldLease | None = None,
        then: Callable[[], None] | None = None,
    ) -> None:
        """Append even though the caller is being cancelled; a failure is logged as
        `lost`. `then` runs after the write, whether it succeeded or not."""

        async def write() -> None:
            try:
                await self.append(tenant, session_id, head, messages, request_id, lease)
            except errors.ThreadlineError as exc:
                log.error(lost, session_id=session_id, error=exc.message)
            if then is not None:
                then()

        self.detached.start(write(), name=f"append-{request_id}")
