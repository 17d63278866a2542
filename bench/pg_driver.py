"""psycopg 3 (with psycopg_pool) against asyncpg, on the shape of a session append.

    python -m bench.pg_driver [--dsn postgresql://postgres@127.0.0.1:5432/postgres]

One append is one transaction: lock the session's row, insert the message, move
the head (what the PostgreSQL session store does). Measured side by side in one
run, alternating the drivers: p50/p99 latency with one writer, and appends per
second with 32 writers on 32 sessions. Creates and drops its own database.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable

import asyncpg
import psycopg
from psycopg_pool import AsyncConnectionPool

SCHEMA = """
CREATE TABLE sessions (id TEXT PRIMARY KEY, head TEXT NOT NULL, length INTEGER NOT NULL);
CREATE TABLE messages (
    session_id TEXT NOT NULL, seq INTEGER NOT NULL, hash TEXT NOT NULL, body BYTEA NOT NULL,
    PRIMARY KEY (session_id, seq)
);
"""
#: One round trip: the head check, the insert and the move in one statement.
APPEND = """
WITH current AS (
    SELECT id, length FROM sessions WHERE id = $1 AND head = $2 FOR UPDATE
), inserted AS (
    INSERT INTO messages (session_id, seq, hash, body)
    SELECT id, length, $3, $4 FROM current RETURNING seq
)
UPDATE sessions SET head = $3, length = length + 1
WHERE id = (SELECT id FROM current) RETURNING length
"""
Append = Callable[[str, str, str], Awaitable[None]]


async def _asyncpg(dsn: str, size: int) -> tuple[Append, Callable[[], Awaitable[None]]]:
    pool = await asyncpg.create_pool(dsn, min_size=size, max_size=size)

    async def append(session_id: str, head: str, new_head: str) -> None:
        async with pool.acquire() as conn:
            row = await conn.fetchrow(APPEND, session_id, head, new_head, b"x" * 200)
            assert row is not None

    return append, pool.close


async def _psycopg(dsn: str, size: int) -> tuple[Append, Callable[[], Awaitable[None]]]:
    pool = AsyncConnectionPool(dsn, min_size=size, max_size=size, open=False)
    await pool.open(wait=True)
    query = APPEND.replace("$1", "%(s)s").replace("$2", "%(h)s").replace("$3", "%(n)s")
    query = query.replace("$4", "%(b)s")

    async def append(session_id: str, head: str, new_head: str) -> None:
        async with pool.connection() as conn:
            cursor = await conn.execute(
                query, {"s": session_id, "h": head, "n": new_head, "b": b"x" * 200}
            )
            assert await cursor.fetchone() is not None

    return append, pool.close


async def _writer(append: Append, session_id: str, count: int, latencies: list[float]) -> None:
    head = "h0"
    for _ in range(count):
        new_head = uuid.uuid4().hex
        began = time.perf_counter()
        await append(session_id, head, new_head)
        latencies.append(time.perf_counter() - began)
        head = new_head


async def _round(
    dsn: str, driver: str, writers: int, per_writer: int
) -> tuple[float, float, float]:
    """p50 and p99 latency (ms) and appends per second."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as admin:
        await admin.execute("TRUNCATE sessions, messages")
        ids = [f"s{i}" for i in range(writers)]
        for session_id in ids:
            await admin.execute("INSERT INTO sessions VALUES (%s, 'h0', 0)", (session_id,))
    make = _asyncpg if driver == "asyncpg" else _psycopg
    append, close = await make(dsn, min(writers, 32))
    latencies: list[float] = []
    began = time.perf_counter()
    await asyncio.gather(*(_writer(append, s, per_writer, latencies) for s in ids))
    elapsed = time.perf_counter() - began
    await close()
    ordered = sorted(latencies)
    p99 = ordered[int(len(ordered) * 0.99)]
    return statistics.median(ordered) * 1000, p99 * 1000, len(latencies) / elapsed


async def main(dsn: str, rounds: int) -> None:
    name = "bench_pg_driver_" + uuid.uuid4().hex[:8]
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as admin:
        await admin.execute(f"CREATE DATABASE {name}")
    target = dsn.rsplit("/", 1)[0] + "/" + name
    try:
        async with await psycopg.AsyncConnection.connect(target, autocommit=True) as conn:
            await conn.execute(SCHEMA)
        results: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
        for _ in range(rounds):
            for driver in ("psycopg", "asyncpg"):
                for writers, per_writer in ((1, 2000), (32, 200)):
                    measured = await _round(target, driver, writers, per_writer)
                    results.setdefault((driver, writers), []).append(measured)
        for writers in (1, 32):
            rows = {d: results[(d, writers)] for d in ("psycopg", "asyncpg")}
            for driver, figures in rows.items():
                p50 = statistics.median(f[0] for f in figures)
                p99 = statistics.median(f[1] for f in figures)
                rate = statistics.median(f[2] for f in figures)
                print(
                    f"{driver:8} {writers:2} writer(s): p50 {p50:.3f} ms, p99 {p99:.3f} ms, "
                    f"{rate:,.0f} appends/s"
                )
            ratio = statistics.median(f[2] for f in rows["asyncpg"]) / statistics.median(
                f[2] for f in rows["psycopg"]
            )
            print(f"  asyncpg/psycopg throughput with {writers} writer(s): {ratio:.2f}x")
    finally:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as admin:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.dsn, args.rounds))
