"""Turn leases: one turn at a time per session.

In-process leases serve a single executor; with Redis configured the lease is a
key set-if-absent with an expiry and a random token, renewed while the turn
runs and released only by its holder (compare-and-delete), so executor
replicas exclude each other and a crashed holder's lease expires by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from typing import Protocol

import redis.asyncio as aioredis

from threadline import errors
from threadline.logs import get_logger

log = get_logger(__name__)

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""


def _busy(session_id: str) -> errors.Aborted:
    return errors.Aborted(
        f"session busy: session {session_id} already has a turn running; retry when it ends",
        details={"session_id": session_id, "reason": "session_busy"},
    )


class TurnLeases(Protocol):
    def hold(self, session_id: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold the session's lease for the block; raises Aborted if another turn has it."""


class LocalTurnLeases:
    def __init__(self) -> None:
        self._held: set[str] = set()

    @contextlib.asynccontextmanager
    async def hold(self, session_id: str) -> AsyncIterator[None]:
        if session_id in self._held:
            raise _busy(session_id)
        self._held.add(session_id)
        try:
            yield
        finally:
            self._held.discard(session_id)


class RedisTurnLeases:
    def __init__(
        self, client: aioredis.Redis, *, ttl_s: float, prefix: str = "threadline:turn:"
    ) -> None:
        self._client = client
        self._ttl_ms = int(ttl_s * 1000)
        self._prefix = prefix

    @contextlib.asynccontextmanager
    async def hold(self, session_id: str) -> AsyncIterator[None]:
        key = self._prefix + session_id
        token = secrets.token_hex(16)
        if not await self._client.set(key, token, nx=True, px=self._ttl_ms):
            raise _busy(session_id)
        renewer = asyncio.create_task(self._renew(key, token), name=f"lease-renew-{session_id}")
        try:
            yield
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            try:
                await self._client.eval(_RELEASE, 1, key, token)
            except Exception:
                # It expires on its own; a failed release only delays the next turn.
                log.warning("lease.release_failed", session_id=session_id, exc_info=True)

    async def _renew(self, key: str, token: str) -> None:
        while True:
            await asyncio.sleep(self._ttl_ms / 3000)
            try:
                await self._client.eval(_RENEW, 1, key, token, str(self._ttl_ms))
            except Exception:
                log.warning("lease.renew_failed", key=key, exc_info=True)
