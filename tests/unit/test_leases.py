"""Leases on real Redis: one holder, renewed, re-taken after Redis forgot them, lost to another."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis

from tests.waiting import eventually
from threadline.leases import LocalLeases, RedisLeases

PREFIX = "test:lease:"


async def test_one_holder_at_a_time_until_released(redis_client: aioredis.Redis) -> None:
    leases = RedisLeases(redis_client, ttl_s=5, prefix=PREFIX)

    held = await leases.acquire("ses_1")
    assert held is not None
    assert await leases.acquire("ses_1") is None
    assert await leases.acquire("ses_2") is not None

    await held.release()
    again = await leases.acquire("ses_1")
    assert again is not None and not again.lost
    await again.release()


async def test_a_held_lease_outlives_its_expiry_while_renewed(redis_client: aioredis.Redis) -> None:
    leases = RedisLeases(redis_client, ttl_s=0.3, prefix=PREFIX)
    held = await leases.acquire("ses_1")
    assert held is not None
    began = time.monotonic()

    async def three_expiries_later() -> bool:
        return time.monotonic() - began > 0.9 and bool(await redis_client.exists(PREFIX + "ses_1"))

    await eventually(three_expiries_later)
    assert await leases.acquire("ses_1") is None
    assert not held.lost
    await held.release()
    assert not await redis_client.exists(PREFIX + "ses_1")


async def test_a_lease_redis_forgot_is_taken_again_by_its_holder(
    redis_client: aioredis.Redis,
) -> None:
    leases = RedisLeases(redis_client, ttl_s=0.3, prefix=PREFIX)
    held = await leases.acquire("ses_1")
    assert held is not None
    token = await redis_client.get(PREFIX + "ses_1")

    await redis_client.flushdb()  # what a Redis restart without persistence does

    async def taken_again() -> bool:
        return bool(await redis_client.get(PREFIX + "ses_1") == token)

    await eventually(taken_again)
    assert not held.lost
    assert await leases.acquire("ses_1") is None
    await held.release()


async def test_a_holder_learns_it_lost_the_lease_and_never_frees_the_new_holders(
    redis_client: aioredis.Redis,
) -> None:
    leases = RedisLeases(redis_client, ttl_s=0.3, prefix=PREFIX)
    held = await leases.acquire("ses_1")
    assert held is not None

    # Its renewals failed past the expiry, and another replica took the session.
    await redis_client.set(PREFIX + "ses_1", "another-holder")

    await eventually(lambda: held.lost)
    await held.release()
    assert await redis_client.get(PREFIX + "ses_1") == "another-holder"


async def test_a_crashed_holders_lease_expires_by_itself(redis_client: aioredis.Redis) -> None:
    crashed = RedisLeases(redis_client, ttl_s=0.3, prefix=PREFIX)
    assert await crashed.acquire("ses_1") is not None
    # The holder's process is gone: nothing renews the key any more.
    for task in asyncio.all_tasks():
        if task.get_name() == f"lease-renew-{PREFIX}ses_1":
            task.cancel()
    other = RedisLeases(redis_client, ttl_s=5, prefix=PREFIX)

    taken = await eventually(lambda: other.acquire("ses_1"), timeout=3)
    assert not taken.lost
    await taken.release()


async def test_local_leases_exclude_within_the_process() -> None:
    leases = LocalLeases()
    held = await leases.acquire("ses_1")
    assert held is not None and not held.lost
    assert await leases.acquire("ses_1") is None
    await held.release()
    assert await leases.acquire("ses_1") is not None
