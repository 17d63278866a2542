"""Rate limits per upstream: a concurrency limit plus RPM and TPM token buckets.

Buckets live in Redis (one atomic script, so every llm_proxy replica draws from
the same budget) when Redis is configured, in process memory otherwise. The
concurrency limit is per replica. A request that cannot get capacity within
`max_wait_s` raises `RateLimited` with the time after which it likely would.

TPM is reserved with an estimate before a request is sent and settled with what
the attempt really used once it has ended (`UpstreamLimiter.settle`), however it
ended, so the shared bucket follows the upstream's own count. Each bucket keeps a
ledger of the tokens charged to it (`charged`), net of refunds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as aioredis

from services.llm_proxy.metrics import Waits


class RateLimited(Exception):
    def __init__(self, upstream: str, limit: str, retry_after_s: float) -> None:
        super().__init__(f"upstream {upstream} is at its {limit} limit")
        self.upstream = upstream
        self.limit = limit
        self.retry_after_s = retry_after_s


class TokenBuckets(Protocol):
    async def take(self, key: str, amount: float, *, capacity: float, per_second: float) -> float:
        """Take `amount` if available and return 0; else take nothing and return the
        seconds until it would be. A negative amount gives tokens back."""

    async def charge(self, key: str, amount: float, *, capacity: float, per_second: float) -> None:
        """Take `amount` whatever the bucket holds (it may go below zero: a debt later
        requests wait out); a negative amount gives tokens back."""

    async def charged(self, key: str) -> float:
        """Tokens charged to the bucket, net of refunds, since it was created."""


class LocalBuckets:
    def __init__(self) -> None:
        self._state: dict[str, tuple[float, float]] = {}
        self._charged: dict[str, float] = {}

    async def take(self, key: str, amount: float, *, capacity: float, per_second: float) -> float:
        now = time.monotonic()
        tokens, updated = self._state.get(key, (capacity, now))
        tokens = min(capacity, tokens + (now - updated) * per_second)
        amount = min(amount, capacity)
        if tokens >= amount:
            # A negative amount is a refund, never past the capacity.
            self._state[key] = (min(capacity, tokens - amount), now)
            self._charged[key] = self._charged.get(key, 0.0) + amount
            return 0.0
        self._state[key] = (tokens, now)
        return (amount - tokens) / per_second

    async def charge(self, key: str, amount: float, *, capacity: float, per_second: float) -> None:
        now = time.monotonic()
        tokens, updated = self._state.get(key, (capacity, now))
        tokens = min(capacity, tokens + (now - updated) * per_second)
        self._state[key] = (min(capacity, tokens - amount), now)
        self._charged[key] = self._charged.get(key, 0.0) + amount

    async def charged(self, key: str) -> float:
        return self._charged.get(key, 0.0)


# Both scripts first refill the bucket for the time since its last update (Redis time).
_REFILL = """
local capacity = tonumber(ARGV[1])
local per_ms = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or capacity
local ts = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + (now - ts) * per_ms)
"""

_TAKE = (
    _REFILL
    + """
local amount = math.min(tonumber(ARGV[3]), capacity)
local wait = 0
if tokens >= amount then
  tokens = math.min(capacity, tokens - amount)
  redis.call('HINCRBYFLOAT', KEYS[1], 'charged', amount)
else wait = (amount - tokens) / per_ms end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / per_ms) + 1000)
return tostring(wait)
"""
)

# Unconditional: settles an attempt with what it used, however little the bucket holds.
_CHARGE = (
    _REFILL
    + """
local amount = tonumber(ARGV[3])
tokens = math.min(capacity, tokens - amount)
redis.call('HINCRBYFLOAT', KEYS[1], 'charged', amount)
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
-- A debt takes longer than a full bucket to refill.
local refill = (capacity - math.min(tokens, 0)) / per_ms
redis.call('PEXPIRE', KEYS[1], math.ceil(refill) + 1000)
return 0
"""
)


class RedisBuckets:
    """Buckets shared by every replica; time comes from the Redis server's clock."""

    def __init__(self, client: aioredis.Redis, prefix: str = "threadline:ratelimit:") -> None:
        self._client = client
        self._prefix = prefix
        self._script = client.register_script(_TAKE)
        self._charge = client.register_script(_CHARGE)

    async def take(self, key: str, amount: float, *, capacity: float, per_second: float) -> float:
        wait_ms = await self._script(
            keys=[self._prefix + key], args=[capacity, per_second / 1000, amount]
        )
        return float(wait_ms) / 1000

    async def charge(self, key: str, amount: float, *, capacity: float, per_second: float) -> None:
        await self._charge(keys=[self._prefix + key], args=[capacity, per_second / 1000, amount])

    async def charged(self, key: str) -> float:
        value = await self._client.hget(self._prefix + key, "charged")
        return float(value or 0)


@dataclass
class UpstreamLimiter:
    upstream: str
    buckets: TokenBuckets
    max_concurrency: int = 0
    rpm: int = 0
    tpm: int = 0
    max_wait_s: float = 5.0

    def __post_init__(self) -> None:
        self._slots = asyncio.Semaphore(self.max_concurrency) if self.max_concurrency else None
        self.waits = Waits(self.upstream, "concurrency")

    @contextlib.asynccontextmanager
    async def slot(self, tokens: int) -> AsyncIterator[None]:
        """Hold capacity for one request of about `tokens` tokens (prompt + max output)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        if self._slots is not None and self._slots.locked():
            try:
                # asyncio.timeout, not wait_for: with no wait allowed a free slot must
                # still be taken (wait_for(..., 0) cancels before trying).
                with self.waits.waiting():
                    async with asyncio.timeout(self.max_wait_s):
                        await self._slots.acquire()
            except TimeoutError:
                raise RateLimited(self.upstream, "concurrency", 1.0) from None
        elif self._slots is not None:
            await self._slots.acquire()
        try:
            if self.tpm:
                await self._draw("tpm", tokens, self.tpm, deadline)
            if self.rpm:
                try:
                    await self._draw("rpm", 1, self.rpm, deadline)
                except RateLimited:
                    # The request is not sent: its tokens go back for others to use.
                    if self.tpm:
                        await self.buckets.take(
                            f"{self.upstream}:tpm",
                            -tokens,
                            capacity=self.tpm,
                            per_second=self.tpm / 60,
                        )
                    raise
            yield
        finally:
            if self._slots is not None:
                self._slots.release()

    def reserved(self, tokens: int) -> int:
        """What `slot(tokens)` took from the TPM bucket (a take is capped at its size)."""
        return min(tokens, self.tpm) if self.tpm else 0

    async def settle(self, reserved: int, used: int) -> None:
        """Correct the TPM bucket once an attempt has ended: it was charged `reserved`
        up front and used `used` (the upstream's count, or the estimate where it
        reported none)."""
        if self.tpm and used != reserved:
            await self.buckets.charge(
                f"{self.upstream}:tpm",
                used - reserved,
                capacity=self.tpm,
                per_second=self.tpm / 60,
            )

    async def _draw(self, limit: str, amount: int, per_minute: int, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            wait = await self.buckets.take(
                f"{self.upstream}:{limit}", amount, capacity=per_minute, per_second=per_minute / 60
            )
            if wait == 0:
                return
            if loop.time() + wait > deadline:
                raise RateLimited(self.upstream, limit, wait)
            await asyncio.sleep(wait)
