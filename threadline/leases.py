"""Named leases: one holder at a time, across replicas when Redis is configured.

In-process leases serve a single process. In Redis a lease is a key set if
absent, with an expiry and a random token, renewed at a third of its expiry
while held and released only by its holder (compare-and-delete), so replicas
exclude each other and a crashed holder's lease expires by itself.

A Redis restart (no persistence) forgets every lease: the holder's next renewal
finds its key gone and takes it again, since nobody else can hold it yet. A
renewal that finds another holder's token means the lease expired (the holder
could not renew for a whole expiry) and was taken: the holder is told through
`lost` and must stop writing as the owner.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Protocol

import redis.asyncio as aioredis

from threadline.cancellation import cancel_and_wait
from threadline.logs import get_logger

log = get_logger(__name__)

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
# 1: renewed; 2: the key was gone (Redis restarted) and is ours again; 0: another holds it.
_RENEW = """
local holder = redis.call('get', KEYS[1])
if holder == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
if not holder then
  redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
return 0
"""


class HeldLease(Protocol):
    @property
    def lost(self) -> bool:
        """True once another holder has the lease: stop acting as its owner."""

    async def release(self) -> None: ...


class Leases(Protocol):
    async def acquire(self, name: str) -> HeldLease | None:
        """The lease on `name`, or None when someone else holds it."""


class _LocalHeld:
    def __init__(self, held: set[str], name: str) -> None:
        self._held = held
        self._name = name

    @property
    def lost(self) -> bool:
        return False

    async def release(self) -> None:
        self._held.discard(self._name)


class LocalLeases:
    def __init__(self) -> None:
        self._held: set[str] = set()

    async def acquire(self, name: str) -> HeldLease | None:
        if name in self._held:
            return None
        self._held.add(name)
        return _LocalHeld(self._held, name)


class _RedisHeld:
    def __init__(self, client: aioredis.Redis, key: str, token: str, ttl_ms: int) -> None:
        self._client = client
        self._key = key
        self._token = token
        self._ttl_ms = ttl_ms
        self._lost = False
        self._released = False
        self._renewer = asyncio.create_task(self._renew(), name=f"lease-renew-{key}")

    @property
    def lost(self) -> bool:
        return self._lost

    async def release(self) -> None:
        # The flag stops a renewer that swallowed its cancellation at its next
        # turn, before it could take the key again after the delete below.
        self._released = True
        await cancel_and_wait(self._renewer)
        try:
            await self._client.eval(_RELEASE, 1, self._key, self._token)
        except Exception:
            # It expires on its own; a failed release only delays the next holder.
            log.warning("lease.release_failed", key=self._key, exc_info=True)

    async def _renew(self) -> None:
        while not self._lost:
            await asyncio.sleep(self._ttl_ms / 3000)
            if self._released:
                return
            try:
                renewed = await self._client.eval(
                    _RENEW, 1, self._key, self._token, str(self._ttl_ms)
                )
            except Exception as exc:
                # Redis away for longer than its client retries: try again next period.
                log.warning("lease.renew_failed", key=self._key, error=str(exc))
                continue
            if renewed == 2:
                log.info("lease.retaken", key=self._key)
            elif not renewed:
                self._lost = True
                log.warning("lease.lost", key=self._key)


class RedisLeases:
    def __init__(self, client: aioredis.Redis, *, ttl_s: float, prefix: str) -> None:
        self._client = client
        self._ttl_ms = int(ttl_s * 1000)
        self._prefix = prefix

    async def acquire(self, name: str) -> HeldLease | None:
        key = self._prefix + name
        token = secrets.token_hex(16)
        if not await self._client.set(key, token, nx=True, px=self._ttl_ms):
            return None
        return _RedisHeld(self._client, key, token, self._ttl_ms)
