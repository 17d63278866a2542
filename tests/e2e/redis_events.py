"""Lifecycle events as a client of the run's Redis sees them on pub/sub."""

from __future__ import annotations

import asyncio
import json

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub


async def subscribe(client: aioredis.Redis, pattern: str) -> PubSub:
    """A pub/sub on `pattern`, returned once Redis has confirmed the subscription."""
    pubsub = client.pubsub()
    await pubsub.psubscribe(pattern)
    async with asyncio.timeout(5):
        while (await pubsub.get_message(timeout=1)) is None:
            pass
    return pubsub


async def next_types(pubsub: PubSub, count: int, timeout: float = 5) -> list[str]:
    """The types of the next `count` events published on the subscribed channels."""
    types: list[str] = []
    async with asyncio.timeout(timeout):
        while len(types) < count:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
            if message:
                types.append(json.loads(message["data"])["type"])
    return types
