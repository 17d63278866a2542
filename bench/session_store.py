"""Session store costs, both backends side by side in one run.

    python -m bench.session_store [--appends 400] [--sizes 1000,10000,100000]

Append latency (p50/p99) at 1 and 32 concurrent writers (each writer on its own
session, as turns are), and BuildContext time for sessions of 1k, 10k and 100k
messages with the same budget: its cost should follow what it returns, not the
session's length (target: 100k within 3x of 1k).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import redis.asyncio as aioredis

from services.session.context import build_context
from services.session.redis_store import RedisSessionStore
from services.session.sqlite_store import SqliteSessionStore
from services.session.store import SessionStore
from threadline.v1 import common_pb2

TENANT = "bench"


def message(i: int) -> common_pb2.Message:
    role = common_pb2.ROLE_USER if i % 2 == 0 else common_pb2.ROLE_ASSISTANT
    return common_pb2.Message(role=role, content=f"message {i} " + "lorem ipsum " * 20)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def appends(store: SessionStore, writers: int, per_writer: int) -> list[float]:
    latencies: list[float] = []

    async def writer() -> None:
        session = await store.create(
            tenant=TENANT, model="m", system_prompt="", title="", metadata={}
        )
        head = session.head
        for i in range(per_writer):
            started = time.perf_counter()
            head, _ = await store.append(TENANT, session.id, head, [message(i)])
            latencies.append((time.perf_counter() - started) * 1000)

    await asyncio.gather(*(writer() for _ in range(writers)))
    return latencies


async def seeded(store: SessionStore, size: int) -> str:
    session = await store.create(
        tenant=TENANT, model="m", system_prompt="Be brief.", title="", metadata={}
    )
    head = session.head
    for start in range(0, size, 64):
        batch = [message(i) for i in range(start, min(size, start + 64))]
        head, _ = await store.append(TENANT, session.id, head, batch)
    return session.id


async def context_ms(store: SessionStore, session_id: str, rounds: int = 20) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        await build_context(store, TENANT, session_id, budget_tokens=4096)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


async def run(name: str, store: SessionStore, per_writer: int, sizes: list[int]) -> None:
    for writers in (1, 32):
        lat = await appends(store, writers, max(1, per_writer // writers))
        print(
            f"{name:7} append x{writers:<3} p50 {statistics.median(lat):7.2f} ms   "
            f"p99 {pct(lat, 0.99):7.2f} ms   ({len(lat)} appends)"
        )
    base = None
    for size in sizes:
        session_id = await seeded(store, size)
        ms = await context_ms(store, session_id)
        base = base or ms
        print(
            f"{name:7} BuildContext {size:>7} msgs: {ms:7.2f} ms   ({ms / base:4.2f}x of "
            f"{sizes[0]})"
        )


async def main(per_writer: int, sizes: list[int], redis_url: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = SqliteSessionStore(Path(tmp) / "bench.db")
        await sqlite.open()
        try:
            await run("sqlite", sqlite, per_writer, sizes)
        finally:
            await sqlite.close()
    client = aioredis.from_url(redis_url)
    prefix = f"bench:{uuid.uuid4().hex}:"
    try:
        await run("redis", RedisSessionStore(client, prefix=prefix), per_writer, sizes)
    finally:
        keys = [key async for key in client.scan_iter(match=prefix + "*", count=1000)]
        for start in range(0, len(keys), 500):
            await client.delete(*keys[start : start + 500])
        await client.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--appends", type=int, default=400)
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    args = parser.parse_args()
    asyncio.run(main(args.appends, [int(s) for s in args.sizes.split(",")], args.redis_url))
