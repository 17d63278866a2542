"""MemoryStore on PostgreSQL: one database that every memory replica shares.

It behaves as `SqliteMemoryStore` does, statement for statement: what moves
together there (a summary, its offset and its history entry; items and the
extract pointer) moves in one transaction here. Counters change in one
UPDATE ... RETURNING, which PostgreSQL applies to the latest row, so two
replicas counting failures of one session count both.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from asyncpg.pool import PoolConnectionProxy

from services.memory.postgres_schema import MIGRATIONS
from services.memory.store import Activity, Item, SessionMemory, erased_session, now_us
from threadline.errors import Aborted, Unavailable
from threadline.postgres import UNREACHABLE, PostgresDatabase
from threadline.v1 import memory_pb2

_ACTIVITY_COLUMNS = "tenant, session_id, model, prompt_tokens, context_window, last_active"
_QUEUED, _RUNNING = memory_pb2.JOB_STATE_QUEUED, memory_pb2.JOB_STATE_RUNNING
_ACTIVE = f"state IN ({_QUEUED}, {_RUNNING})"
#: What an erasure removes, as (kind it is counted as, table).
_ERASED_TABLES = (
    ("summaries", "memories"),
    ("history", "memory_history"),
    ("items", "memory_items"),
    ("activity", "memory_activity"),
    ("jobs", "memory_jobs"),
)
#: Tries of put_job_if_none_active: each either inserts or finds the active job,
#: unless that job finished in between; twice running is already rare.
_SUBMIT_TRIES = 3


def _job_args(job: memory_pb2.Job) -> tuple[str, str, str, str, int, str, bytes]:
    return (
        job.id,
        job.kind,
        job.tenant,
        job.session_id,
        job.state,
        job.head,
        job.SerializeToString(),
    )


def _job_of(record: bytes | None) -> memory_pb2.Job | None:
    return None if record is None else memory_pb2.Job.FromString(record)


class PostgresMemoryStore:
    """MemoryStore on a PostgreSQL database. `await open()` before use, `await close()` after."""

    def __init__(self, url: str, *, max_connections: int = 10) -> None:
        self._db = PostgresDatabase(
            url, name="memory", migrations=MIGRATIONS, max_size=max_connections
        )

    async def open(self) -> None:
        await self._db.open()

    async def close(self) -> None:
        await self._db.close()

    @asynccontextmanager
    async def _connection(self, *, transaction: bool = False) -> AsyncIterator[PoolConnectionProxy]:
        """A connection of the pool (in a transaction if asked); a server that went
        away (restart, failover) is UNAVAILABLE, which callers retry, not a bug."""
        try:
            if transaction:
                async with self._db.transaction() as conn:
                    yield conn
            else:
                async with self._db.pool.acquire() as conn:
                    yield conn
        except UNREACHABLE as exc:
            raise Unavailable("the memory store's PostgreSQL is unreachable") from exc

    # -- session state -----------------------------------------------------------

    async def get(self, tenant: str, session_id: str) -> SessionMemory:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "SELECT summary, next_offset, extract_offset, consolidate_failures, "
                "compact_failures, compact_failed_head, compacted_size FROM memories "
                "WHERE tenant = $1 AND session_id = $2",
                tenant,
                session_id,
            )
        return SessionMemory("", 0) if row is None else SessionMemory(*row)

    @staticmethod
    async def _erased(conn: PoolConnectionProxy, tenant: str, session_id: str) -> bool:
        """Whether the session was erased, under a lock its erasure takes too: a write
        that asks this in its transaction either commits before the erasure (which
        then removes it) or sees the tombstone and writes nothing."""
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1 || ':' || $2, 0))",
            tenant,
            session_id,
        )
        found = await conn.fetchval(
            "SELECT 1 FROM memory_erased_sessions WHERE tenant = $1 AND session_id = $2",
            tenant,
            session_id,
        )
        return found is not None

    async def erase(self, tenant: str, session_id: str) -> dict[str, int]:
        removed: dict[str, int] = {}
        async with self._connection(transaction=True) as conn:
            await self._erased(conn, tenant, session_id)  # the lock
            await conn.execute(
                "INSERT INTO memory_erased_sessions VALUES ($1, $2, $3) "
                "ON CONFLICT (tenant, session_id) DO NOTHING",
                tenant,
                session_id,
                now_us(),
            )
            for kind, table in _ERASED_TABLES:
                status = await conn.execute(
                    f"DELETE FROM {table} WHERE tenant = $1 AND session_id = $2",
                    tenant,
                    session_id,
                )
                removed[kind] = int(status.split()[-1])
        return removed

    @staticmethod
    async def _ensure_row(conn: PoolConnectionProxy, tenant: str, session_id: str) -> None:
        """The session's row exists, for the UPDATE that follows."""
        await conn.execute(
            "INSERT INTO memories (tenant, session_id, summary, next_offset, updated_at) "
            "VALUES ($1, $2, '', 0, $3) ON CONFLICT (tenant, session_id) DO NOTHING",
            tenant,
            session_id,
            now_us(),
        )

    async def save_summary(
        self,
        tenant: str,
        session_id: str,
        *,
        summary: str,
        from_seq: int,
        next_offset: int,
        archived_text: str = "",
    ) -> None:
        now = now_us()
        async with self._connection(transaction=True) as conn:
            if await self._erased(conn, tenant, session_id):
                return
            await self._ensure_row(conn, tenant, session_id)
            await conn.execute(
                "UPDATE memories SET summary = $1, next_offset = $2, consolidate_failures = 0, "
                "updated_at = $3 WHERE tenant = $4 AND session_id = $5",
                summary,
                next_offset,
                now,
                tenant,
                session_id,
            )
            await conn.execute(
                "INSERT INTO memory_history (tenant, session_id, from_seq, to_seq, summary, "
                "created_at, archived) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                tenant,
                session_id,
                from_seq,
                next_offset - 1,
                archived_text or summary,
                now,
                bool(archived_text),
            )

    async def count_failure(self, tenant: str, session_id: str, kind: str, head: str = "") -> int:
        async with self._connection(transaction=True) as conn:
            if await self._erased(conn, tenant, session_id):
                return 0
            await self._ensure_row(conn, tenant, session_id)
            if kind == "compact":
                count = await conn.fetchval(
                    "UPDATE memories SET compact_failures = CASE WHEN compact_failed_head = $1 "
                    "THEN compact_failures + 1 ELSE 1 END, compact_failed_head = $1 "
                    "WHERE tenant = $2 AND session_id = $3 RETURNING compact_failures",
                    head,
                    tenant,
                    session_id,
                )
            else:
                count = await conn.fetchval(
                    "UPDATE memories SET consolidate_failures = consolidate_failures + 1 "
                    "WHERE tenant = $1 AND session_id = $2 RETURNING consolidate_failures",
                    tenant,
                    session_id,
                )
        return int(count)

    async def reset_failures(self, tenant: str, session_id: str, kind: str) -> None:
        column = "compact_failures" if kind == "compact" else "consolidate_failures"
        async with self._connection() as conn:
            await conn.execute(
                f"UPDATE memories SET {column} = 0 WHERE tenant = $1 AND session_id = $2",
                tenant,
                session_id,
            )

    async def start_compacted(
        self, tenant: str, session_id: str, *, size: int, summary_messages: int
    ) -> None:
        async with self._connection(transaction=True) as conn:
            if await self._erased(conn, tenant, session_id):
                return
            await conn.execute(
                "INSERT INTO memories (tenant, session_id, summary, next_offset, updated_at, "
                "extract_offset, compacted_size) VALUES ($1, $2, '', $3, $4, 0, $5) "
                "ON CONFLICT (tenant, session_id) DO UPDATE SET "
                "next_offset = excluded.next_offset, extract_offset = 0, "
                "compacted_size = excluded.compacted_size",
                tenant,
                session_id,
                summary_messages,
                now_us(),
                size,
            )

    # -- activity ----------------------------------------------------------------

    async def record_activity(self, activity: Activity) -> None:
        async with self._connection(transaction=True) as conn:
            if await self._erased(conn, activity.tenant, activity.session_id):
                return
            await conn.execute(
                f"INSERT INTO memory_activity ({_ACTIVITY_COLUMNS}) "
                "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tenant, session_id) "
                "DO UPDATE SET model = excluded.model, prompt_tokens = excluded.prompt_tokens, "
                "context_window = excluded.context_window, last_active = excluded.last_active, "
                "idle_checked = false",
                activity.tenant,
                activity.session_id,
                activity.model,
                activity.prompt_tokens,
                activity.context_window,
                activity.last_active,
            )

    async def activity(self, tenant: str, session_id: str) -> Activity | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                f"SELECT {_ACTIVITY_COLUMNS} FROM memory_activity "
                "WHERE tenant = $1 AND session_id = $2",
                tenant,
                session_id,
            )
        return None if row is None else Activity(*row)

    async def idle_since(self, before_us: int, limit: int = 100) -> list[Activity]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"SELECT {_ACTIVITY_COLUMNS} FROM memory_activity WHERE last_active < $1 "
                "AND NOT idle_checked ORDER BY last_active LIMIT $2",
                before_us,
                limit,
            )
        return [Activity(*row) for row in rows]

    async def mark_idle_checked(self, tenant: str, session_id: str, last_active: int) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "UPDATE memory_activity SET idle_checked = true WHERE tenant = $1 "
                "AND session_id = $2 AND last_active = $3",
                tenant,
                session_id,
                last_active,
            )

    # -- extracted items ---------------------------------------------------------

    async def items(self, tenant: str, session_id: str) -> list[Item]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT kind, key, json, from_seq, to_seq, mentions FROM memory_items "
                "WHERE tenant = $1 AND session_id = $2 ORDER BY to_seq DESC, kind, key",
                tenant,
                session_id,
            )
        return [Item(*row) for row in rows]

    async def save_items(
        self, tenant: str, session_id: str, items: Sequence[Item], *, next_pointer: int
    ) -> None:
        now = now_us()
        async with self._connection(transaction=True) as conn:
            if await self._erased(conn, tenant, session_id):
                return
            await self._ensure_row(conn, tenant, session_id)
            await conn.executemany(
                "INSERT INTO memory_items VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) "
                "ON CONFLICT (tenant, session_id, kind, key) DO UPDATE SET "
                "json = excluded.json, from_seq = excluded.from_seq, "
                "to_seq = excluded.to_seq, mentions = excluded.mentions, "
                "updated_at = excluded.updated_at",
                [
                    (
                        tenant,
                        session_id,
                        i.kind,
                        i.key,
                        i.json,
                        i.from_seq,
                        i.to_seq,
                        i.mentions,
                        now,
                    )
                    for i in items
                ],
            )
            await conn.execute(
                "UPDATE memories SET extract_offset = $1 WHERE tenant = $2 AND session_id = $3",
                next_pointer,
                tenant,
                session_id,
            )

    # -- jobs --------------------------------------------------------------------

    async def put_job(self, job: memory_pb2.Job) -> None:
        async with self._connection(transaction=True) as conn:
            if await self._erased(conn, job.tenant, job.session_id):
                return  # a job that outlived its session: its record must not come back
            await conn.execute(
                "INSERT INTO memory_jobs (id, kind, tenant, session_id, state, head, record) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO UPDATE SET "
                "state = excluded.state, head = excluded.head, record = excluded.record",
                *_job_args(job),
            )

    async def put_job_if_none_active(self, job: memory_pb2.Job) -> memory_pb2.Job:
        async with self._connection() as conn:
            for _ in range(_SUBMIT_TRIES):
                async with conn.transaction():
                    if await self._erased(conn, job.tenant, job.session_id):
                        raise erased_session(job.session_id)
                    # A concurrent insert of the same (tenant, session, kind) makes this
                    # one wait for it to commit, then do nothing: the other's job is it.
                    inserted = await conn.fetchval(
                        "INSERT INTO memory_jobs (id, kind, tenant, session_id, state, head, "
                        "record) VALUES ($1, $2, $3, $4, $5, $6, $7) "
                        f"ON CONFLICT (tenant, session_id, kind) WHERE {_ACTIVE} DO NOTHING "
                        "RETURNING id",
                        *_job_args(job),
                    )
                if inserted is not None:
                    return job
                active = await self._active_job(conn, job.tenant, job.session_id, job.kind)
                if active is not None:
                    return active
        raise Aborted(
            f"no {job.kind} job could be submitted for session {job.session_id}: "
            "others kept finishing in between; retry"
        )

    async def job(self, job_id: str) -> memory_pb2.Job | None:
        async with self._connection() as conn:
            record = await conn.fetchval("SELECT record FROM memory_jobs WHERE id = $1", job_id)
        return _job_of(record)

    async def active_job(self, tenant: str, session_id: str, kind: str) -> memory_pb2.Job | None:
        async with self._connection() as conn:
            return await self._active_job(conn, tenant, session_id, kind)

    @staticmethod
    async def _active_job(
        conn: PoolConnectionProxy, tenant: str, session_id: str, kind: str
    ) -> memory_pb2.Job | None:
        record = await conn.fetchval(
            "SELECT record FROM memory_jobs WHERE tenant = $1 AND session_id = $2 "
            f"AND kind = $3 AND {_ACTIVE} LIMIT 1",
            tenant,
            session_id,
            kind,
        )
        return _job_of(record)

    async def unfinished_jobs(self) -> list[tuple[str, str]]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"SELECT id, kind FROM memory_jobs WHERE {_ACTIVE} ORDER BY seq"
            )
        return [(row["id"], row["kind"]) for row in rows]

    async def latest_job(self, tenant: str, session_id: str, kind: str) -> memory_pb2.Job | None:
        async with self._connection() as conn:
            record = await conn.fetchval(
                "SELECT record FROM memory_jobs WHERE tenant = $1 AND session_id = $2 "
                "AND kind = $3 ORDER BY seq DESC LIMIT 1",
                tenant,
                session_id,
                kind,
            )
        return None if record is None else memory_pb2.Job.FromString(record)

    async def succeeded_job(
        self, tenant: str, session_id: str, kind: str, head: str
    ) -> memory_pb2.Job | None:
        async with self._connection() as conn:
            record = await conn.fetchval(
                "SELECT record FROM memory_jobs WHERE tenant = $1 AND session_id = $2 "
                "AND kind = $3 AND head = $4 AND state = $5 LIMIT 1",
                tenant,
                session_id,
                kind,
                head,
                memory_pb2.JOB_STATE_SUCCEEDED,
            )
        return _job_of(record)
