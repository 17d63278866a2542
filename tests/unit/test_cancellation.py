"""Background tasks that talk to Redis stop when they are told to."""

from __future__ import annotations

import asyncio
import random

import redis.asyncio as aioredis

from threadline.cancellation import cancel_and_wait


async def test_a_loop_cancelled_mid_command_always_ends(redis_client: aioredis.Redis) -> None:
    # Shaped like a lease renewer or a job keeper: a command, a pause, a flag. A plain
    # `cancel(); await task` hangs for some of these (the client swallows a
    # cancellation that lands during a command and the loop goes on).
    rng = random.Random(7)

    async def renew(stop: asyncio.Event) -> None:
        while not stop.is_set():
            await redis_client.eval("return 1", 0)
            await asyncio.sleep(0.0005)

    for _ in range(300):
        stop = asyncio.Event()
        task = asyncio.create_task(renew(stop))
        await asyncio.sleep(rng.random() * 0.002)
        stop.set()
        assert await cancel_and_wait(task)


async def test_a_task_that_ignores_one_cancel_is_cancelled_again() -> None:
    stubborn = asyncio.Event()

    async def swallows_once() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            stubborn.set()
        await asyncio.sleep(10)

    task = asyncio.create_task(swallows_once())
    await asyncio.sleep(0)
    async with asyncio.timeout(2):
        await cancel_and_wait(task)

    assert stubborn.is_set() and task.cancelled()
