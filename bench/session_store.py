"""Session store costs, every backend side by side in one run.

    python -m bench.session_store [--appends 400] [--writer-appends 50]
        [--sizes 1000,10000,100000] [--rounds 3] [--redis-url redis://127.0.0.1:6379/14]
        [--postgres-url postgresql://postgres@127.0.0.1:5432/postgres]

SQLite (a temporary file), Redis (keys under a prefix of this run's own) and
PostgreSQL (a database of this run's own, created from the admin URL and dropped
at the end). The appends are measured in rounds that take the backends in turn,
so a noisy neighbour on the machine hits each of them alike:

* append latency (p50/p99) with one writer;
* 32 concurrent writers, each on its own session (as turns are): latency and
  appends per second, against SQLite's (its one writer thread serialises them);
* BuildContext on sessions of 1k, 10k and 100k messages with one 4096-token
  budget: its cost should follow what it returns, not the session's length.

Targets, checked at the end: a PostgreSQL append p50 within 2 ms on loopback,
32 PostgreSQL writers at least 4x SQLite's appends per second, BuildContext on
100k messages within 3x of 1k on every backend.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis

from bench.processes import busy_ticks, cpu_seconds, postgres_database
from services.session.context import build_context
from services.session.postgres_store import PostgresSessionStore
from services.session.redis_store import RedisSessionStore
from services.session.sqlite_store import SqliteSessionStore
from services.session.store import SessionStore
from threadline.logs import configure_logging
from threadline.v1 import common_pb2

TENANT = "bench"
WRITERS = 32
#: Targets of issue #14 for the PostgreSQL store.
TARGET_P50_MS = 2.0
TARGET_WRITERS_VS_SQLITE = 4.0
TARGET_CONTEXT_RATIO = 3.0


def message(i: int) -> common_pb2.Message:
    role = common_pb2.ROLE_USER if i % 2 == 0 else common_pb2.ROLE_ASSISTANT
    return common_pb2.Message(role=role, content=f"message {i} " + "lorem ipsum " * 20)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Figures:
    """What one backend measured, over every round."""

    single: list[float] = field(default_factory=list)  # ms per append, one writer
    concurrent: list[float] = field(default_factory=list)  # ms per append, 32 writers
    rates: list[float] = field(default_factory=list)  # appends/s of 32 writers, per round
    #: CPU ms per append of 32 writers: this process, the backend's server processes.
    client_cpu: list[float] = field(default_factory=list)
    server_cpu: list[float] = field(default_factory=list)
    busy_cores: list[float] = field(default_factory=list)  # the whole machine's, meanwhile
    context: dict[int, list[float]] = field(default_factory=dict)  # size -> ms per build


@dataclass
class Backend:
    store: SessionStore
    #: The pids of the server processes that work for this store (none for SQLite).
    server_pids: Callable[[], Awaitable[list[int]]]


async def no_server() -> list[int]:
    return []


def process_cpu(pids: list[int]) -> dict[int, float]:
    seconds = {}
    for pid in pids:
        with contextlib.suppress(OSError):  # gone meanwhile
            seconds[pid] = cpu_seconds(pid)
    return seconds


async def new_session(store: SessionStore) -> tuple[str, str]:
    session = await store.create(tenant=TENANT, model="m", system_prompt="", title="", metadata={})
    return session.id, session.head


async def appends(store: SessionStore, writers: int, per_writer: int) -> tuple[list[float], float]:
    """Latencies (ms) of `writers` writers appending `per_writer` messages each to a
    session of their own, and their appends per second (sessions made beforehand)."""
    sessions = [await new_session(store) for _ in range(writers)]
    return await append_to(store, sessions, per_writer)


async def append_to(
    store: SessionStore, sessions: list[tuple[str, str]], per_writer: int
) -> tuple[list[float], float]:
    """A writer per (session id, head) appending `per_writer` messages: latencies (ms)
    and appends per second."""
    latencies: list[float] = []

    async def writer(session_id: str, head: str) -> None:
        for i in range(per_writer):
            started = time.perf_counter()
            head, _ = await store.append(TENANT, session_id, head, [message(i)])
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(writer(*session) for session in sessions))
    return latencies, len(latencies) / (time.perf_counter() - started)


async def measure_writers(backend: Backend, per_writer: int, fig: Figures) -> None:
    """One round of 32 writers, with the CPU it took here, in the server and in all."""
    sessions = [await new_session(backend.store) for _ in range(WRITERS)]
    servers = process_cpu(await backend.server_pids())
    client = cpu_seconds(os.getpid())
    busy, ticks = busy_ticks()
    latencies, rate = await append_to(backend.store, sessions, per_writer)
    busy_after, ticks_after = busy_ticks()
    client = cpu_seconds(os.getpid()) - client
    # A pooled connection opened meanwhile counts from its start.
    servers_after = process_cpu(await backend.server_pids())
    server = sum(used - servers.get(pid, 0.0) for pid, used in servers_after.items())
    fig.concurrent += latencies
    fig.rates.append(rate)
    fig.client_cpu.append(client * 1000 / len(latencies))
    fig.server_cpu.append(server * 1000 / len(latencies))
    fig.busy_cores.append((os.cpu_count() or 1) * (busy_after - busy) / (ticks_after - ticks))


async def seeded(store: SessionStore, size: int) -> str:
    session = await store.create(
        tenant=TENANT, model="m", system_prompt="Be brief.", title="", metadata={}
    )
    head = session.head
    for start in range(0, size, 64):
        batch = [message(i) for i in range(start, min(size, start + 64))]
        head, _ = await store.append(TENANT, session.id, head, batch)
    return session.id


async def context_ms(store: SessionStore, session_id: str, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        await build_context(store, TENANT, session_id, budget_tokens=4096)
        times.append((time.perf_counter() - started) * 1000)
    return times


@asynccontextmanager
async def sqlite_backend() -> AsyncIterator[Backend]:
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteSessionStore(Path(tmp) / "bench.db")
        await store.open()
        try:
            yield Backend(store, no_server)
        finally:
            await store.close()


@asynccontextmanager
async def redis_backend(url: str) -> AsyncIterator[Backend]:
    client = aioredis.from_url(url)
    prefix = f"bench:{uuid.uuid4().hex}:"
    pid = int((await client.info("server"))["process_id"])

    async def server_pids() -> list[int]:
        return [pid]

    try:
        yield Backend(RedisSessionStore(client, prefix=prefix), server_pids)
    finally:
        keys = [key async for key in client.scan_iter(match=prefix + "*", count=1000)]
        for start in range(0, len(keys), 500):
            await client.delete(*keys[start : start + 500])
        await client.aclose()


@asynccontextmanager
async def postgres_backend(admin_url: str) -> AsyncIterator[Backend]:
    # The pool size the session service uses (PostgresSessionStore's default).
    async with postgres_database(admin_url) as url, PostgresSessionStore(url) as store:
        name = url.rsplit("/", 1)[1]

        async def server_pids() -> list[int]:
            conn = await asyncpg.connect(admin_url)
            try:
                rows = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE datname = $1", name)
            finally:
                await conn.close()
            return [row["pid"] for row in rows]

        yield Backend(store, server_pids)


def print_appends(figures: dict[str, Figures]) -> None:
    sqlite_rate = statistics.median(figures["sqlite"].rates) if "sqlite" in figures else None
    for name, fig in figures.items():
        print(
            f"{name:8} append x1    p50 {statistics.median(fig.single):7.2f} ms   "
            f"p99 {pct(fig.single, 0.99):7.2f} ms   ({len(fig.single)} appends)"
        )
    for name, fig in figures.items():
        rate = statistics.median(fig.rates)
        versus = f"   {rate / sqlite_rate:5.2f}x sqlite" if sqlite_rate else ""
        print(
            f"{name:8} append x{WRITERS:<3}  p50 {statistics.median(fig.concurrent):7.2f} ms   "
            f"p99 {pct(fig.concurrent, 0.99):7.2f} ms   {rate:7.0f} appends/s{versus}   "
            f"(rounds: {', '.join(f'{r:.0f}' for r in fig.rates)})"
        )
    print(
        f"CPU per append of x{WRITERS}, ms (server: PostgreSQL's backends for this run, "
        "the whole redis-server; machine: every process on it)"
    )
    for name, fig in figures.items():
        client, server = statistics.median(fig.client_cpu), statistics.median(fig.server_cpu)
        print(
            f"{name:8} this process {client:5.3f}   server {server:5.3f}   together "
            f"{client + server:5.3f}   machine busy {statistics.median(fig.busy_cores):4.2f} of "
            f"{os.cpu_count()} cores"
        )


def print_context(figures: dict[str, Figures], sizes: list[int]) -> None:
    for name, fig in figures.items():
        base = statistics.median(fig.context[sizes[0]])
        for size in sizes:
            ms = statistics.median(fig.context[size])
            print(
                f"{name:8} BuildContext {size:>7} msgs: {ms:7.2f} ms   "
                f"({ms / base:4.2f}x of {sizes[0]})"
            )


def print_targets(figures: dict[str, Figures], sizes: list[int]) -> None:
    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    print("targets:")
    if "postgres" in figures:
        pg = figures["postgres"]
        p50 = statistics.median(pg.single)
        print(
            f"  postgres append x1 p50 {p50:.2f} ms <= {TARGET_P50_MS} ms: "
            f"{verdict(p50 <= TARGET_P50_MS)}"
        )
        if "sqlite" in figures:
            sqlite_rate = statistics.median(figures["sqlite"].rates)
            ratio = statistics.median(pg.rates) / sqlite_rate
            print(
                f"  postgres x{WRITERS} appends/s {ratio:.2f}x sqlite's >= "
                f"{TARGET_WRITERS_VS_SQLITE}x: {verdict(ratio >= TARGET_WRITERS_VS_SQLITE)}"
            )
            # What every core of the machine could do at the CPU an append took.
            cpu_ms = statistics.median(pg.client_cpu) + statistics.median(pg.server_cpu)
            ceiling = (os.cpu_count() or 1) * 1000 / cpu_ms
            print(
                f"    at {cpu_ms:.3f} ms CPU per append, {os.cpu_count()} cores fully busy "
                f"would do {ceiling:.0f} appends/s, {ceiling / sqlite_rate:.2f}x sqlite's"
            )
    for name, fig in figures.items():
        ratio = statistics.median(fig.context[sizes[-1]]) / statistics.median(fig.context[sizes[0]])
        print(
            f"  {name} BuildContext {sizes[-1]} / {sizes[0]} msgs {ratio:.2f}x <= "
            f"{TARGET_CONTEXT_RATIO}x: {verdict(ratio <= TARGET_CONTEXT_RATIO)}"
        )


async def main(
    single: int,
    per_writer: int,
    sizes: list[int],
    rounds: int,
    redis_url: str,
    postgres_url: str,
) -> None:
    configure_logging("error")
    async with AsyncExitStack() as stack:
        backends = {
            "sqlite": await stack.enter_async_context(sqlite_backend()),
            "redis": await stack.enter_async_context(redis_backend(redis_url)),
            "postgres": await stack.enter_async_context(postgres_backend(postgres_url)),
        }
        figures = {name: Figures() for name in backends}
        names = list(backends)
        for name in names:  # warm-up: caches, prepared statements, pooled connections
            await appends(backends[name].store, WRITERS, 2)
        for round_ in range(rounds):
            # Each round starts with another backend: none always runs first.
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            for name in order:
                latencies, _ = await appends(backends[name].store, 1, single)
                figures[name].single += latencies
                await measure_writers(backends[name], per_writer, figures[name])
        print(
            f"{rounds} rounds, backends in turn; x{WRITERS}: {WRITERS} writers, one session "
            f"each; PostgreSQL pool: the session service's; {os.cpu_count()} cores here, "
            "shared by the bench, the servers and anything else running"
        )
        print_appends(figures)
        seeded_ids = {
            name: {size: await seeded(backends[name].store, size) for size in sizes}
            for name in names
        }
        for _ in range(rounds):
            for name in names:
                for size in sizes:
                    times = await context_ms(backends[name].store, seeded_ids[name][size], 10)
                    figures[name].context.setdefault(size, []).extend(times)
        print_context(figures, sizes)
        print_targets(figures, sizes)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--appends", type=int, default=400, help="one writer's, per round")
    parser.add_argument(
        "--writer-appends", type=int, default=50, help=f"each of {WRITERS} writers', per round"
    )
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="admin URL: the run creates and drops a database of its own there",
    )
    args = parser.parse_args()
    asyncio.run(
        main(
            args.appends,
            args.writer_appends,
            [int(s) for s in args.sizes.split(",")],
            args.rounds,
            args.redis_url,
            args.postgres_url,
        )
    )
