"""What removing tasks costs, on each task store backend side by side in one run, and
what physical erasure costs on SQLite.

    python -m bench.task_erasure [--tasks 2000] [--lines 20] [--rounds 3]
        [--redis-url redis://127.0.0.1:6379/13]
        [--postgres-url postgresql://postgres@127.0.0.1:5432/postgres]

SQLite (a temporary file), Redis (keys under a prefix of this run's own) and
PostgreSQL (a database of this run's own, dropped after). Each round, per backend:

- DeleteTask's store step (`delete_ended`: the record and its `--lines` log lines)
  on 200 tasks one after the other: p50 ms;
- retention (`delete_ended_before` in batches of 100, as the sweep does) on
  `--tasks` expired tasks: tasks removed per second;
- the workspace sweep's question (`workspaces_in_use`, 50 paths) with `--tasks`
  tasks stored: ms per sweep (Redis has no index and reads every record).

Then SQLite alone, the same deletion of a task with its log three ways: no
secure_delete and the WAL left as it is, secure_delete only, secure_delete plus
the WAL truncation threadline does (`SqliteDatabase.erase`): p50 ms and the ratio
to the first. Backends take turns within each round, so drift on a shared
machine hits all alike.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import redis.asyncio as aioredis

from bench.processes import postgres_database
from services.executor.tasks.postgres_store import PostgresTaskStore
from services.executor.tasks.records import TaskRecord, new_task_id
from services.executor.tasks.store import RedisTaskStore, SqliteTaskStore, TaskStore
from threadline.sqlite import truncate_wal

DELETES = 200
SWEEP_PATHS = 50


def _task(n: int, finished_at: float) -> TaskRecord:
    return TaskRecord(
        id=new_task_id(),
        tenant=f"tenant-{n % 10}",
        prompt="Review the repository and list what is broken. " * 4,
        agent_type="general",
        runner="local",
        workspace=f"/ws/tasks/{n:06d}",
        status="succeeded",
        created_at=finished_at - 1,
        finished_at=finished_at,
    )


async def _fill(store: TaskStore, count: int, lines: int, finished_at: float) -> list[TaskRecord]:
    tasks = [_task(n, finished_at) for n in range(count)]
    for start in range(0, count, 50):
        batch = tasks[start : start + 50]
        await asyncio.gather(*(store.create(t) for t in batch))
        for n in range(lines):
            entry = {"type": "delta", "text": f"line {n} of the model's answer"}
            await asyncio.gather(*(store.append_log(t.id, entry) for t in batch))
    return tasks


@asynccontextmanager
async def sqlite_store() -> AsyncIterator[TaskStore]:
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteTaskStore(Path(tmp) / "tasks.db")
        await store.open()
        try:
            yield store
        finally:
            await store.close()


@asynccontextmanager
async def redis_store(url: str) -> AsyncIterator[TaskStore]:
    client = aioredis.from_url(url)
    prefix = f"bench:{uuid.uuid4().hex}:"
    try:
        yield RedisTaskStore(client, prefix=prefix)
    finally:
        keys = [key async for key in client.scan_iter(match=prefix + "*", count=1000)]
        for start in range(0, len(keys), 1000):
            await client.delete(*keys[start : start + 1000])
        await client.aclose()


@asynccontextmanager
async def postgres_store(admin_url: str) -> AsyncIterator[TaskStore]:
    async with postgres_database(admin_url) as url:
        store = PostgresTaskStore(url)
        await store.open()
        try:
            yield store
        finally:
            await store.close()


async def measure_backend(store: TaskStore, tasks: int, lines: int) -> dict[str, float]:
    now = time.time()
    doomed = await _fill(store, DELETES, lines, now)
    took: list[float] = []
    for task in doomed:
        started = time.perf_counter()
        await store.delete_ended(task.tenant, task.id)
        took.append((time.perf_counter() - started) * 1000)
    await _fill(store, tasks, lines, now - 3600)
    paths = [f"/ws/tasks/{n:06d}" for n in range(0, tasks, max(1, tasks // SWEEP_PATHS))]
    started = time.perf_counter()
    await store.workspaces_in_use(paths)
    sweep_ms = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    removed = 0
    while step := len((await store.delete_ended_before(now - 60, 100)).tasks):
        removed += step
    expire_s = time.perf_counter() - started
    return {
        "delete_p50_ms": statistics.median(took),
        "expired_per_s": removed / expire_s,
        "sweep_ms": sweep_ms,
    }


def _sqlite_delete(path: Path, lines: int, *, secure: bool, truncate: bool) -> float:
    """One task with its log written, then deleted; ms for the deletion."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute(f"PRAGMA secure_delete = {'ON' if secure else 'OFF'}")
        conn.execute("CREATE TABLE IF NOT EXISTS logs (task TEXT, seq INTEGER, line TEXT)")
        task = uuid.uuid4().hex
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO logs VALUES (?, ?, ?)",
            [(task, n, f"line {n} of the model's answer " * 8) for n in range(lines)],
        )
        conn.execute("COMMIT")
        started = time.perf_counter()
        conn.execute("BEGIN")
        conn.execute("DELETE FROM logs WHERE task = ?", (task,))
        conn.execute("COMMIT")
        if truncate:
            truncate_wal(conn)
        return (time.perf_counter() - started) * 1000
    finally:
        conn.close()


def measure_sqlite_erasure(lines: int, repeats: int = 100) -> dict[str, float]:
    ways: dict[str, Callable[[Path], float]] = {
        "plain": lambda p: _sqlite_delete(p, lines, secure=False, truncate=False),
        "secure_delete": lambda p: _sqlite_delete(p, lines, secure=True, truncate=False),
        "secure_delete+truncate": lambda p: _sqlite_delete(p, lines, secure=True, truncate=True),
    }
    took: dict[str, list[float]] = {name: [] for name in ways}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            for name, way in ways.items():
                took[name].append(way(Path(tmp) / f"{name}.db"))
    return {name: statistics.median(values) for name, values in took.items()}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--lines", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    backends: dict[str, Callable[[], AbstractAsyncContextManager[TaskStore]]] = {
        "sqlite": sqlite_store,
        "redis": lambda: redis_store(args.redis_url),
        "postgresql": lambda: postgres_store(args.postgres_url),
    }
    results: dict[str, list[dict[str, float]]] = {name: [] for name in backends}
    for _ in range(args.rounds):
        for name, opened in backends.items():
            async with opened() as store:
                results[name].append(await measure_backend(store, args.tasks, args.lines))
    print(f"task stores, {args.tasks} tasks of {args.lines} log lines, medians of {args.rounds}")
    print(f"{'backend':<12}{'DeleteTask p50':>16}{'expired/s':>12}{'sweep ms':>10}")
    base = statistics.median(r["expired_per_s"] for r in results["sqlite"])
    for name, rounds in results.items():
        delete = statistics.median(r["delete_p50_ms"] for r in rounds)
        expired = statistics.median(r["expired_per_s"] for r in rounds)
        sweep = statistics.median(r["sweep_ms"] for r in rounds)
        print(
            f"{name:<12}{delete:>13.2f} ms{expired:>12.0f}{sweep:>10.1f}"
            f"   (expiry {expired / base:.2f}x sqlite)"
        )
    erasure = await asyncio.to_thread(measure_sqlite_erasure, args.lines)
    plain = erasure["plain"]
    print(f"\nSQLite: deleting a task's {args.lines} log lines, p50 of 100")
    for name, value in erasure.items():
        print(f"{name:<24}{value:>8.3f} ms  {value / plain:.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
