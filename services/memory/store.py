"""Long-term memory's store: per-session state, history, extracted items, jobs.

`MemoryStore` is what the domain (jobs, consolidation, extraction, compaction,
recall, the servicer) needs; `SqliteMemoryStore` keeps it in a file, and
`services.memory.postgres_store.PostgresMemoryStore` in a database replicas share.

A session's summary and consolidation offset move in one transaction with its
history entry, and extracted items with the extract pointer, so no pointer ever
advances past work that was not stored. A unique index allows one queued or
running job of a kind per session, so replicas submitting at once make one job.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from services.memory.sqlite_schema import MIGRATIONS
from threadline.errors import NotFound
from threadline.sqlite import SqliteDatabase, transaction
from threadline.v1 import memory_pb2

_ACTIVITY_COLUMNS = "tenant, session_id, model, prompt_tokens, context_window, last_active"
_ACTIVE = (memory_pb2.JOB_STATE_QUEUED, memory_pb2.JOB_STATE_RUNNING)


@dataclass(frozen=True)
class SessionMemory:
    summary: str
    #: seq of the first message not yet consolidated.
    offset: int
    #: seq of the first message not yet extracted from.
    extract_offset: int = 0
    consolidate_failures: int = 0
    compact_failures: int = 0
    #: The head at which compaction last failed (failures count per head).
    compact_failed_head: str = ""
    #: Messages the session started with if compaction made it, else -1.
    compacted_size: int = -1


@dataclass(frozen=True)
class Activity:
    tenant: str
    session_id: str
    model: str
    #: What the model server counted for the last turn's last request.
    prompt_tokens: int
    context_window: int
    #: Unix microseconds.
    last_active: int


@dataclass(frozen=True)
class Item:
    kind: str
    #: What identifies the item within its kind (duplicates share it).
    key: str
    json: str
    from_seq: int
    to_seq: int
    mentions: int = 1


def now_us() -> int:
    return time.time_ns() // 1000


class MemoryStore(Protocol):
    """What memory's jobs, servicer and recall need from a store."""

    # -- session state -----------------------------------------------------------

    async def get(self, tenant: str, session_id: str) -> SessionMemory:
        """The session's state; an empty one (offset 0) if nothing is stored."""
        ...

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
        """Store the summary of [from_seq, next_offset) and move the offset there.

        With `archived_text` the span was not summarised: its raw text goes to the
        history instead and the summary stays as it was.
        """
        ...

    async def count_failure(self, tenant: str, session_id: str, kind: str, head: str = "") -> int:
        """One more consecutive failure of `kind` ("consolidate"/"compact"); the new count.

        Compaction failures count per head: a session that changed starts again at 1.
        """
        ...

    async def reset_failures(self, tenant: str, session_id: str, kind: str) -> None: ...

    async def start_compacted(
        self, tenant: str, session_id: str, *, size: int, summary_messages: int
    ) -> None:
        """State for a session compaction created: the summary message is not summarised
        again, and the extract pointer starts at 0."""
        ...

    # -- activity ----------------------------------------------------------------

    async def record_activity(self, activity: Activity) -> None: ...

    async def activity(self, tenant: str, session_id: str) -> Activity | None: ...

    async def idle_since(self, before_us: int, limit: int = 100) -> list[Activity]:
        """Sessions last active before `before_us` not yet idle-checked since."""
        ...

    async def mark_idle_checked(self, tenant: str, session_id: str, last_active: int) -> None:
        """The idle check saw this activity; new activity makes the session eligible again."""
        ...

    # -- extracted items ---------------------------------------------------------

    async def items(self, tenant: str, session_id: str) -> list[Item]: ...

    async def save_items(
        self, tenant: str, session_id: str, items: Sequence[Item], *, next_pointer: int
    ) -> None:
        """Upsert `items` (already merged with what was stored) and move the extract pointer."""
        ...

    # -- jobs --------------------------------------------------------------------

    async def put_job(self, job: memory_pb2.Job) -> None:
        """Store a new job or a new state of one already stored."""
        ...

    async def put_job_if_none_active(self, job: memory_pb2.Job) -> memory_pb2.Job:
        """Store the new queued `job` unless a job of its kind is already queued or
        running for its session: the job now active, `job` or the one found."""
        ...

    async def job(self, job_id: str) -> memory_pb2.Job | None: ...

    async def active_job(self, tenant: str, session_id: str, kind: str) -> memory_pb2.Job | None:
        """A queued or running job of `kind` for the session, if any."""
        ...

    async def unfinished_jobs(self) -> list[tuple[str, str]]:
        """(id, kind) of queued or running jobs, oldest first."""
        ...

    async def latest_job(self, tenant: str, session_id: str, kind: str) -> memory_pb2.Job | None:
        """The session's most recently submitted job of `kind`, in any state."""
        ...

    async def succeeded_job(
        self, tenant: str, session_id: str, kind: str, head: str
    ) -> memory_pb2.Job | None:
        """A job of `kind` that already succeeded on this head (redelivery, duplicates)."""
        ...

    async def erase(self, tenant: str, session_id: str) -> dict[str, int]:
        """Remove everything kept of a deleted session (summary, history, items,
        activity, job records) and refuse its writes from now on; idempotent.

        Returns what went, by kind. Writes for an erased session are dropped (a job
        still running when its session went) or NotFound (a new job).
        """
        ...

    async def close(self) -> None:
        """Release the backend; safe to call more than once."""
        ...


# -- SQLite: statements, each run on the store's worker thread ---------------------


def _get(conn: sqlite3.Connection, tenant: str, session_id: str) -> SessionMemory:
    row = conn.execute(
        "SELECT summary, next_offset, extract_offset, consolidate_failures, "
        "compact_failures, compact_failed_head, compacted_size FROM memories "
        "WHERE tenant = ? AND session_id = ?",
        (tenant, session_id),
    ).fetchone()
    if row is None:
        return SessionMemory("", 0)
    summary, offset, extract_offset, c_failures, k_failures, failed_head, size = row
    return SessionMemory(summary, offset, extract_offset, c_failures, k_failures, failed_head, size)


def _erased(conn: sqlite3.Connection, tenant: str, session_id: str) -> bool:
    """Whether the session was erased: then nothing of it may be written again. Asked
    inside each write's transaction, on the one writer thread, so no write slips in
    after an erasure."""
    row = conn.execute(
        "SELECT 1 FROM erased_sessions WHERE tenant = ? AND session_id = ?",
        (tenant, session_id),
    ).fetchone()
    return row is not None


#: What an erasure removes, as (kind it is counted as, table).
ERASED_TABLES = (
    ("summaries", "memories"),
    ("history", "memory_history"),
    ("items", "items"),
    ("activity", "activity"),
    ("jobs", "jobs"),
)


def _erase(conn: sqlite3.Connection, tenant: str, session_id: str) -> dict[str, int]:
    removed: dict[str, int] = {}
    with transaction(conn, "BEGIN IMMEDIATE"):
        conn.execute(
            "INSERT OR IGNORE INTO erased_sessions VALUES (?, ?, ?)", (tenant, session_id, now_us())
        )
        for kind, table in ERASED_TABLES:
            cursor = conn.execute(
                f"DELETE FROM {table} WHERE tenant = ? AND session_id = ?", (tenant, session_id)
            )
            removed[kind] = cursor.rowcount
    return removed


def erased_session(session_id: str) -> NotFound:
    # The session service's words for a missing session: an erased one is no different.
    return NotFound(f"session {session_id} not found", details={"session_id": session_id})


def _ensure_row(conn: sqlite3.Connection, tenant: str, session_id: str) -> None:
    conn.execute(
        "INSERT OR IGNORE INTO memories (tenant, session_id, summary, next_offset, updated_at) "
        "VALUES (?, ?, '', 0, ?)",
        (tenant, session_id, now_us()),
    )


def _save_summary(
    conn: sqlite3.Connection,
    tenant: str,
    session_id: str,
    summary: str,
    from_seq: int,
    next_offset: int,
    archived_text: str,
) -> None:
    now = now_us()
    with transaction(conn, "BEGIN IMMEDIATE"):
        if _erased(conn, tenant, session_id):
            return
        _ensure_row(conn, tenant, session_id)
        conn.execute(
            "UPDATE memories SET summary = ?, next_offset = ?, consolidate_failures = 0, "
            "updated_at = ? WHERE tenant = ? AND session_id = ?",
            (summary, next_offset, now, tenant, session_id),
        )
        conn.execute(
            "INSERT INTO memory_history (tenant, session_id, from_seq, to_seq, summary, "
            "created_at, archived) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                tenant,
                session_id,
                from_seq,
                next_offset - 1,
                archived_text or summary,
                now,
                int(bool(archived_text)),
            ),
        )


def _count_failure(
    conn: sqlite3.Connection, tenant: str, session_id: str, kind: str, head: str
) -> int:
    with transaction(conn, "BEGIN IMMEDIATE"):
        if _erased(conn, tenant, session_id):
            return 0
        _ensure_row(conn, tenant, session_id)
        if kind == "compact":
            conn.execute(
                "UPDATE memories SET compact_failures = CASE WHEN compact_failed_head = ? "
                "THEN compact_failures + 1 ELSE 1 END, compact_failed_head = ? "
                "WHERE tenant = ? AND session_id = ?",
                (head, head, tenant, session_id),
            )
            column = "compact_failures"
        else:
            conn.execute(
                "UPDATE memories SET consolidate_failures = consolidate_failures + 1 "
                "WHERE tenant = ? AND session_id = ?",
                (tenant, session_id),
            )
            column = "consolidate_failures"
        row = conn.execute(
            f"SELECT {column} FROM memories WHERE tenant = ? AND session_id = ?",
            (tenant, session_id),
        ).fetchone()
    return int(row[0])


def _reset_failures(conn: sqlite3.Connection, tenant: str, session_id: str, kind: str) -> None:
    column = "compact_failures" if kind == "compact" else "consolidate_failures"
    with transaction(conn):
        conn.execute(
            f"UPDATE memories SET {column} = 0 WHERE tenant = ? AND session_id = ?",
            (tenant, session_id),
        )


def _start_compacted(
    conn: sqlite3.Connection, tenant: str, session_id: str, size: int, summary_messages: int
) -> None:
    with transaction(conn, "BEGIN IMMEDIATE"):
        if _erased(conn, tenant, session_id):
            return
        conn.execute(
            "INSERT INTO memories (tenant, session_id, summary, next_offset, updated_at, "
            "extract_offset, compacted_size) VALUES (?, ?, '', ?, ?, 0, ?) "
            "ON CONFLICT (tenant, session_id) DO UPDATE SET "
            "next_offset = excluded.next_offset, extract_offset = 0, "
            "compacted_size = excluded.compacted_size",
            (tenant, session_id, summary_messages, now_us(), size),
        )


def _record_activity(conn: sqlite3.Connection, activity: Activity) -> None:
    with transaction(conn, "BEGIN IMMEDIATE"):
        if _erased(conn, activity.tenant, activity.session_id):
            return
        conn.execute(
            "INSERT INTO activity (tenant, session_id, model, prompt_tokens, context_window, "
            "last_active) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (tenant, session_id) "
            "DO UPDATE SET model = excluded.model, prompt_tokens = excluded.prompt_tokens, "
            "context_window = excluded.context_window, last_active = excluded.last_active, "
            "idle_checked = 0",
            (
                activity.tenant,
                activity.session_id,
                activity.model,
                activity.prompt_tokens,
                activity.context_window,
                activity.last_active,
            ),
        )


def _activity(conn: sqlite3.Connection, tenant: str, session_id: str) -> Activity | None:
    row = conn.execute(
        f"SELECT {_ACTIVITY_COLUMNS} FROM activity WHERE tenant = ? AND session_id = ?",
        (tenant, session_id),
    ).fetchone()
    return None if row is None else Activity(*row)


def _idle_since(conn: sqlite3.Connection, before_us: int, limit: int) -> list[Activity]:
    rows = conn.execute(
        f"SELECT {_ACTIVITY_COLUMNS} FROM activity WHERE last_active < ? "
        "AND idle_checked = 0 ORDER BY last_active LIMIT ?",
        (before_us, limit),
    ).fetchall()
    return [Activity(*row) for row in rows]


def _mark_idle_checked(
    conn: sqlite3.Connection, tenant: str, session_id: str, last_active: int
) -> None:
    with transaction(conn):
        conn.execute(
            "UPDATE activity SET idle_checked = 1 WHERE tenant = ? AND session_id = ? "
            "AND last_active = ?",
            (tenant, session_id, last_active),
        )


def _items(conn: sqlite3.Connection, tenant: str, session_id: str) -> list[Item]:
    rows = conn.execute(
        "SELECT kind, key, json, from_seq, to_seq, mentions FROM items "
        "WHERE tenant = ? AND session_id = ? ORDER BY to_seq DESC, kind, key",
        (tenant, session_id),
    ).fetchall()
    return [Item(*row) for row in rows]


def _save_items(
    conn: sqlite3.Connection, tenant: str, session_id: str, items: Sequence[Item], next_pointer: int
) -> None:
    now = now_us()
    with transaction(conn, "BEGIN IMMEDIATE"):
        if _erased(conn, tenant, session_id):
            return
        _ensure_row(conn, tenant, session_id)
        for item in items:
            conn.execute(
                "INSERT INTO items VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (tenant, session_id, kind, key) DO UPDATE SET "
                "json = excluded.json, from_seq = excluded.from_seq, "
                "to_seq = excluded.to_seq, mentions = excluded.mentions, "
                "updated_at = excluded.updated_at",
                (
                    tenant,
                    session_id,
                    item.kind,
                    item.key,
                    item.json,
                    item.from_seq,
                    item.to_seq,
                    item.mentions,
                    now,
                ),
            )
        conn.execute(
            "UPDATE memories SET extract_offset = ? WHERE tenant = ? AND session_id = ?",
            (next_pointer, tenant, session_id),
        )


def _put_job(conn: sqlite3.Connection, job: memory_pb2.Job) -> None:
    with transaction(conn, "BEGIN IMMEDIATE"):
        if _erased(conn, job.tenant, job.session_id):
            return  # a job that outlived its session: its record must not come back
        conn.execute(
            "INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
            "state = excluded.state, head = excluded.head, record = excluded.record",
            _job_row(job),
        )


def _job_row(job: memory_pb2.Job) -> tuple[object, ...]:
    return (
        job.id,
        job.kind,
        job.tenant,
        job.session_id,
        job.state,
        job.head,
        job.SerializeToString(),
    )


def _put_job_if_none_active(conn: sqlite3.Connection, job: memory_pb2.Job) -> memory_pb2.Job:
    # IMMEDIATE: another process's submit waits for this one, then finds its job.
    with transaction(conn, "BEGIN IMMEDIATE"):
        if _erased(conn, job.tenant, job.session_id):
            raise erased_session(job.session_id)
        active = _active_job(conn, job.tenant, job.session_id, job.kind)
        if active is not None:
            return active
        conn.execute(
            "INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?)",
            _job_row(job),
        )
    return job


def _job(conn: sqlite3.Connection, job_id: str) -> memory_pb2.Job | None:
    row = conn.execute("SELECT record FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return None if row is None else memory_pb2.Job.FromString(row[0])


def _active_job(
    conn: sqlite3.Connection, tenant: str, session_id: str, kind: str
) -> memory_pb2.Job | None:
    row = conn.execute(
        "SELECT record FROM jobs WHERE tenant = ? AND session_id = ? AND kind = ? "
        "AND state IN (?, ?) LIMIT 1",
        (tenant, session_id, kind, *_ACTIVE),
    ).fetchone()
    return None if row is None else memory_pb2.Job.FromString(row[0])


def _latest_job(
    conn: sqlite3.Connection, tenant: str, session_id: str, kind: str
) -> memory_pb2.Job | None:
    row = conn.execute(
        "SELECT record FROM jobs WHERE tenant = ? AND session_id = ? AND kind = ? "
        "ORDER BY rowid DESC LIMIT 1",
        (tenant, session_id, kind),
    ).fetchone()
    return None if row is None else memory_pb2.Job.FromString(row[0])


def _unfinished_jobs(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    rows = conn.execute(
        "SELECT id, kind FROM jobs WHERE state IN (?, ?) ORDER BY rowid", _ACTIVE
    ).fetchall()
    return [(row[0], row[1]) for row in rows]


def _succeeded_job(
    conn: sqlite3.Connection, tenant: str, session_id: str, kind: str, head: str
) -> memory_pb2.Job | None:
    row = conn.execute(
        "SELECT record FROM jobs WHERE tenant = ? AND session_id = ? AND kind = ? "
        "AND head = ? AND state = ? LIMIT 1",
        (tenant, session_id, kind, head, memory_pb2.JOB_STATE_SUCCEEDED),
    ).fetchone()
    return None if row is None else memory_pb2.Job.FromString(row[0])


class SqliteMemoryStore:
    """MemoryStore on a SQLite file. `await open()` before use, `await close()` after."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = SqliteDatabase(path, "memory store", MIGRATIONS)

    async def open(self) -> None:
        await self._db.open()

    async def close(self) -> None:
        await self._db.close()

    # -- session state -----------------------------------------------------------

    async def get(self, tenant: str, session_id: str) -> SessionMemory:
        return await self._db.run(_get, tenant, session_id)

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
        await self._db.run(
            _save_summary,
            tenant,
            session_id,
            summary,
            from_seq,
            next_offset,
            archived_text,
        )

    async def count_failure(self, tenant: str, session_id: str, kind: str, head: str = "") -> int:
        return await self._db.run(_count_failure, tenant, session_id, kind, head)

    async def reset_failures(self, tenant: str, session_id: str, kind: str) -> None:
        await self._db.run(_reset_failures, tenant, session_id, kind)

    async def start_compacted(
        self, tenant: str, session_id: str, *, size: int, summary_messages: int
    ) -> None:
        await self._db.run(_start_compacted, tenant, session_id, size, summary_messages)

    # -- activity ----------------------------------------------------------------

    async def record_activity(self, activity: Activity) -> None:
        await self._db.run(_record_activity, activity)

    async def activity(self, tenant: str, session_id: str) -> Activity | None:
        return await self._db.run(_activity, tenant, session_id)

    async def idle_since(self, before_us: int, limit: int = 100) -> list[Activity]:
        return await self._db.run(_idle_since, before_us, limit)

    async def mark_idle_checked(self, tenant: str, session_id: str, last_active: int) -> None:
        await self._db.run(_mark_idle_checked, tenant, session_id, last_active)

    # -- extracted items ---------------------------------------------------------

    async def items(self, tenant: str, session_id: str) -> list[Item]:
        return await self._db.run(_items, tenant, session_id)

    async def save_items(
        self, tenant: str, session_id: str, items: Sequence[Item], *, next_pointer: int
    ) -> None:
        await self._db.run(_save_items, tenant, session_id, items, next_pointer)

    # -- jobs --------------------------------------------------------------------

    async def put_job(self, job: memory_pb2.Job) -> None:
        await self._db.run(_put_job, job)

    async def put_job_if_none_active(self, job: memory_pb2.Job) -> memory_pb2.Job:
        return await self._db.run(_put_job_if_none_active, job)

    async def job(self, job_id: str) -> memory_pb2.Job | None:
        return await self._db.run(_job, job_id)

    async def active_job(self, tenant: str, session_id: str, kind: str) -> memory_pb2.Job | None:
        return await self._db.run(_active_job, tenant, session_id, kind)

    async def unfinished_jobs(self) -> list[tuple[str, str]]:
        return await self._db.run(_unfinished_jobs)

    async def latest_job(self, tenant: str, session_id: str, kind: str) -> memory_pb2.Job | None:
        return await self._db.run(_latest_job, tenant, session_id, kind)

    async def succeeded_job(
        self, tenant: str, session_id: str, kind: str, head: str
    ) -> memory_pb2.Job | None:
        return await self._db.run(_succeeded_job, tenant, session_id, kind, head)

    # -- erasure -----------------------------------------------------------------

    async def erase(self, tenant: str, session_id: str) -> dict[str, int]:
        # erase: the WAL is truncated after, so the erased text leaves the disk too.
        return await self._db.erase(_erase, tenant, session_id)
