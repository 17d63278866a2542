"""What session erasure costs, on each session backend, side by side in one run.

    python -m bench.erasure [--sessions 200] [--calls 300] [--rounds 3]

All five services in this process (SQLite memory store, the session store as
named; Redis 127.0.0.1:6379 database 11 and PostgreSQL 127.0.0.1:5432 in a schema
of their own, both flushed or dropped after), owners polling every 50 ms:

- the check every memory call now makes: `Sessions.Get` p50 beside `Memory.Recall`
  p50 (Recall includes one Get), and Get's share of Recall;
- the cascade: `--sessions` sessions, each with a row in memory, deleted one after
  the other; ms per Delete (it also records the erasure) and the time until the
  last `session.erased`, as erasures per second.

Backends take turns within each round, so drift on a shared machine hits all alike.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis

from threadline.config import Settings, load_settings
from threadline.events import InProcessEventBus
from threadline.logs import configure_logging
from threadline.peers import MemoryClient, SessionClient
from threadline.stack import start_stack
from threadline.v1 import memory_pb2, session_pb2

REDIS = "redis://127.0.0.1:6379/11"
POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
TENANT = "bench"
#: The upstream, never called: nothing here asks a model.
NOWHERE = "http://127.0.0.1:9/v1"
BACKENDS = ("sqlite", "redis", "postgres")


def p50(values: list[float]) -> float:
    return statistics.median(values)


@contextlib.asynccontextmanager
async def session_database(kind: str) -> AsyncIterator[str]:
    """The `session.database` setting for `kind`, cleaned up after."""
    if kind == "sqlite":
        yield ""
    elif kind == "redis":
        client = aioredis.from_url(REDIS)
        await client.flushdb()
        try:
            yield REDIS
        finally:
            await client.flushdb()
            await client.aclose()
    else:
        schema = f"bench_{uuid.uuid4().hex[:10]}"
        conn = await asyncpg.connect(POSTGRES)
        await conn.execute(f"CREATE SCHEMA {schema}")
        try:
            yield f"{POSTGRES}?search_path={schema}"
        finally:
            await conn.execute(f"DROP SCHEMA {schema} CASCADE")
            await conn.close()


def settings_for(data: Path, database: str) -> Settings:
    return load_settings(
        environ={},
        overrides={
            "data_dir": str(data),
            "log_level": "error",
            "llm": {
                "upstream": {"name": "none", "base_url": "http://127.0.0.1:9/v1", "model": "m"}
            },
            "session": {"database": database},
            "memory": {"erasure_poll_s": 0.05, "idle_consolidate_s": 0},
            "executor": {"erasure_poll_s": 0.05},
        },
    )


async def timed(call: asyncio.Future[object] | object) -> float:
    started = time.perf_counter()
    await call  # type: ignore[misc]
    return (time.perf_counter() - started) * 1000


async def measure(kind: str, sessions: int, calls: int) -> dict[str, float]:
    async with session_database(kind) as database:
        with tempfile.TemporaryDirectory() as data:
            bus = InProcessEventBus()
            stack = await start_stack(
                settings_for(Path(data), database), bus=bus, ephemeral_ports=True
            )
            subscription = await bus.subscribe()
            store = SessionClient(stack.address("session"))
            memory = MemoryClient(stack.address("memory"))
            try:
                return await _measure(store, memory, subscription, sessions, calls)
            finally:
                await store.close()
                await memory.close()
                await subscription.close()
                await stack.stop(1.0)
                await bus.close()


async def _measure(
    store: SessionClient,
    memory: MemoryClient,
    subscription: object,
    sessions: int,
    calls: int,
) -> dict[str, float]:
    one = await store.create(session_pb2.SessionsCreateRequest(tenant=TENANT))
    gets = [await timed(store.get(TENANT, one.id)) for _ in range(calls)]
    recalls = [await timed(memory.recall(TENANT, one.id)) for _ in range(calls)]
    ids = []
    for _ in range(sessions):
        session = await store.create(session_pb2.SessionsCreateRequest(tenant=TENANT))
        await memory.record_activity(
            memory_pb2.RecordActivityRequest(tenant=TENANT, session_id=session.id)
        )
        ids.append(session.id)
    erased: set[str] = set()

    async def count() -> None:
        async for event in subscription:  # type: ignore[attr-defined]
            if event.type == "session.erased":
                erased.add(event.session_id)
                if erased >= set(ids):
                    return

    waiter = asyncio.create_task(count())
    started = time.perf_counter()
    deletes = [await timed(store.delete(TENANT, session_id)) for session_id in ids]
    await asyncio.wait_for(waiter, 120)
    elapsed = time.perf_counter() - started
    return {
        "get": p50(gets),
        "recall": p50(recalls),
        "delete": p50(deletes),
        "erased_per_s": sessions / elapsed,
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    configure_logging("error")
    results: dict[str, list[dict[str, float]]] = {kind: [] for kind in BACKENDS}
    for _ in range(args.rounds):
        for kind in BACKENDS:
            results[kind].append(await measure(kind, args.sessions, args.calls))
    base = p50([r["erased_per_s"] for r in results["sqlite"]])
    for kind in BACKENDS:
        rows = results[kind]
        get, recall = p50([r["get"] for r in rows]), p50([r["recall"] for r in rows])
        delete = p50([r["delete"] for r in rows])
        rate = p50([r["erased_per_s"] for r in rows])
        rounds = ", ".join(f"{r['erased_per_s']:.0f}" for r in rows)
        print(
            f"{kind:8} Get p50 {get:6.2f} ms   Recall p50 {recall:6.2f} ms   "
            f"Get/Recall {get / recall:4.2f}   Delete p50 {delete:6.2f} ms   "
            f"erased {rate:7.1f}/s ({rate / base:4.2f}x sqlite)   (rounds: {rounds})"
        )


if __name__ == "__main__":
    asyncio.run(main())
