"""SQLite adapter for long-term memory: per-session state, history, extracted items, jobs.

A session's summary and consolidation offset move in one transaction with its
history entry, and extracted items with the extract pointer, so no pointer ever
advances past work that was not stored. Replicas that share the file see one
state (WAL; every write is one short transaction).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from threadline.sqlite import SqliteThread, open_database, transaction
from threadline.v1 import memory_pb2

_MIGRATIONS = [
    [
        """
    CREATE TABLE memories (
        tenant TEXT NOT NULL,
        session_id TEXT NOT NULL,
        summary TEXT NOT NULL,
        next_offset INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (tenant, session_id)
    )
    """,
        """
    CREATE TABLE memory_history (
        tenant TEXT NOT NULL,
        session_id TEXT NOT NULL,
        from_seq INTEGER NOT NULL,
        to_seq INTEGER NOT NULL,
        summary TEXT NOT NULL,
        created_at INTEGER NOT NULL
    )
    """,
        "CREATE INDEX memory_history_session ON memory_history (tenant, session_id, from_seq)",
    ],
    [
        "ALTER TABLE memories ADD COLUMN extract_offset INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE memories ADD COLUMN consolidate_failures INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE memories ADD COLUMN compact_failures INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE memories ADD COLUMN compact_failed_head TEXT NOT NULL DEFAULT ''",
        # For a session made by compaction: how many messages it started with.
        "ALTER TABLE memories ADD COLUMN compacted_size INTEGER NOT NULL DEFAULT -1",
        "ALTER TABLE memory_history ADD COLUMN archived INTEGER NOT NULL DEFAULT 0",
        """
    CREATE TABLE activity (
        tenant TEXT NOT NULL,
        session_id TEXT NOT NULL,
        model TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        context_window INTEGER NOT NULL,
        last_active INTEGER NOT NULL,
        -- Set once the idle check has looked at the session since its last activity.
        idle_checked INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (tenant, session_id)
    )
    """,
        "CREATE INDEX activity_last_active ON activity (last_active)",
        """
    CREATE TABLE items (
        tenant TEXT NOT NULL,
        session_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        key TEXT NOT NULL,
        json TEXT NOT NULL,
        from_seq INTEGER NOT NULL,
        to_seq INTEGER NOT NULL,
        mentions INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (tenant, session_id, kind, key)
    )
    """,
        """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        tenant TEXT NOT NULL,
        session_id TEXT NOT NULL,
        state INTEGER NOT NULL,
        head TEXT NOT NULL,
        record BLOB NOT NULL
    )
    """,
        "CREATE INDEX jobs_session ON jobs (tenant, session_id, kind, state)",
    ],
]

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


class SqliteMemoryStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._thread = SqliteThread("memory store", "memory-sqlite")
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        await self._thread.start(self._open_sync)

    async def close(self) -> None:
        await self._thread.stop(self._close_sync)

    # -- session state -----------------------------------------------------------

    async def get(self, tenant: str, session_id: str) -> SessionMemory:
        return await self._thread.run(self._get_sync, tenant, session_id)

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
        await self._thread.run(
            self._save_summary_sync,
            tenant,
            session_id,
            summary,
            from_seq,
            next_offset,
            archived_text,
        )

    async def count_failure(self, tenant: str, session_id: str, kind: str, head: str = "") -> int:
        """One more consecutive failure of `kind` ("consolidate"/"compact"); the new count.

        Compaction failures count per head: a session that changed starts again at 1.
        """
        return await self._thread.run(self._count_failure_sync, tenant, session_id, kind, head)

    async def reset_failures(self, tenant: str, session_id: str, kind: str) -> None:
        await self._thread.run(self._reset_failures_sync, tenant, session_id, kind)

    async def start_compacted(
        self, tenant: str, session_id: str, *, size: int, summary_messages: int
    ) -> None:
        """State for a session compaction created: the summary message is not summarised
        again, and the extract pointer starts at 0."""
        await self._thread.run(
            self._start_compacted_sync, tenant, session_id, size, summary_messages
        )

    # -- activity ----------------------------------------------------------------

    async def record_activity(self, activity: Activity) -> None:
        await self._thread.run(self._record_activity_sync, activity)

    async def activity(self, tenant: str, session_id: str) -> Activity | None:
        return await self._thread.run(self._activity_sync, tenant, session_id)

    async def idle_since(self, before_us: int, limit: int = 100) -> list[Activity]:
        """Sessions last active before `before_us` not yet idle-checked since."""
        return await self._thread.run(self._idle_since_sync, before_us, limit)

    async def mark_idle_checked(self, tenant: str, session_id: str, last_active: int) -> None:
        """The idle check saw this activity; new activity makes the session eligible again."""
        await self._thread.run(self._mark_idle_checked_sync, tenant, session_id, last_active)

    # -- extracted items ---------------------------------------------------------

    async def items(self, tenant: str, session_id: str) -> list[Item]:
        return await self._thread.run(self._items_sync, tenant, session_id)

    async def save_items(
        self, tenant: str, session_id: str, items: Sequence[Item], *, next_pointer: int
    ) -> None:
        """Upsert `items` (already merged with what was stored) and move the extract pointer."""
        await self._thread.run(self._save_items_sync, tenant, session_id, items, next_pointer)

    # -- jobs --------------------------------------------------------------------

    async def put_job(self, job: memory_pb2.Job) -> None:
        await self._thread.run(self._put_job_sync, job)

    async def job(self, job_id: str) -> memory_pb2.Job | None:
        return await self._thread.run(self._job_sync, job_id)

    async def active_job(self, tenant: str, session_id: str, kind: str) -> memory_pb2.Job | None:
        """A queued or running job of `kind` for the session, if any."""
        return await self._thread.run(self._active_job_sync, tenant, session_id, kind)

    async def unfinished_jobs(self) -> list[tuple[str, str]]:
        """(id, kind) of queued or running jobs, oldest first."""
        return await self._thread.run(self._unfinished_jobs_sync)

    async def succeeded_job(
        self, tenant: str, session_id: str, kind: str, head: str
    ) -> memory_pb2.Job | None:
        """A job of `kind` that already succeeded on this head (redelivery, duplicates)."""
        return await self._thread.run(self._succeeded_job_sync, tenant, session_id, kind, head)

    # -- sync side ---------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("memory store is not open")
        return self._conn

    def _open_sync(self) -> None:
        self._conn = open_database(self.path, name="memory store", migrations=_MIGRATIONS)

    def _close_sync(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _get_sync(self, tenant: str, session_id: str) -> SessionMemory:
        row = (
            self._db()
            .execute(
                "SELECT summary, next_offset, extract_offset, consolidate_failures, "
                "compact_failures, compact_failed_head, compacted_size FROM memories "
                "WHERE tenant = ? AND session_id = ?",
                (tenant, session_id),
            )
            .fetchone()
        )
        if row is None:
            return SessionMemory("", 0)
        summary, offset, extract_offset, c_failures, k_failures, failed_head, size = row
        return SessionMemory(
            summary, offset, extract_offset, c_failures, k_failures, failed_head, size
        )

    def _ensure_row(self, conn: sqlite3.Connection, tenant: str, session_id: str) -> None:
        conn.execute(
            "INSERT OR IGNORE INTO memories (tenant, session_id, summary, next_offset, updated_at) "
            "VALUES (?, ?, '', 0, ?)",
            (tenant, session_id, now_us()),
        )

    def _save_summary_sync(
        self,
        tenant: str,
        session_id: str,
        summary: str,
        from_seq: int,
        next_offset: int,
        archived_text: str,
    ) -> None:
        now = now_us()
        with transaction(self._db(), "BEGIN IMMEDIATE") as conn:
            self._ensure_row(conn, tenant, session_id)
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

    def _count_failure_sync(self, tenant: str, session_id: str, kind: str, head: str) -> int:
        with transaction(self._db(), "BEGIN IMMEDIATE") as conn:
            self._ensure_row(conn, tenant, session_id)
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

    def _reset_failures_sync(self, tenant: str, session_id: str, kind: str) -> None:
        column = "compact_failures" if kind == "compact" else "consolidate_failures"
        with transaction(self._db()) as conn:
            conn.execute(
                f"UPDATE memories SET {column} = 0 WHERE tenant = ? AND session_id = ?",
                (tenant, session_id),
            )

    def _start_compacted_sync(
        self, tenant: str, session_id: str, size: int, summary_messages: int
    ) -> None:
        with transaction(self._db(), "BEGIN IMMEDIATE") as conn:
            conn.execute(
                "INSERT INTO memories (tenant, session_id, summary, next_offset, updated_at, "
                "extract_offset, compacted_size) VALUES (?, ?, '', ?, ?, 0, ?) "
                "ON CONFLICT (tenant, session_id) DO UPDATE SET "
                "next_offset = excluded.next_offset, extract_offset = 0, "
                "compacted_size = excluded.compacted_size",
                (tenant, session_id, summary_messages, now_us(), size),
            )

    def _record_activity_sync(self, activity: Activity) -> None:
        with transaction(self._db()) as conn:
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

    def _activity_sync(self, tenant: str, session_id: str) -> Activity | None:
        row = (
            self._db()
            .execute(
                f"SELECT {_ACTIVITY_COLUMNS} FROM activity WHERE tenant = ? AND session_id = ?",
                (tenant, session_id),
            )
            .fetchone()
        )
        return None if row is None else Activity(*row)

    def _idle_since_sync(self, before_us: int, limit: int) -> list[Activity]:
        rows = (
            self._db()
            .execute(
                f"SELECT {_ACTIVITY_COLUMNS} FROM activity WHERE last_active < ? "
                "AND idle_checked = 0 ORDER BY last_active LIMIT ?",
                (before_us, limit),
            )
            .fetchall()
        )
        return [Activity(*row) for row in rows]

    def _mark_idle_checked_sync(self, tenant: str, session_id: str, last_active: int) -> None:
        with transaction(self._db()) as conn:
            conn.execute(
                "UPDATE activity SET idle_checked = 1 WHERE tenant = ? AND session_id = ? "
                "AND last_active = ?",
                (tenant, session_id, last_active),
            )

    def _items_sync(self, tenant: str, session_id: str) -> list[Item]:
        rows = (
            self._db()
            .execute(
                "SELECT kind, key, json, from_seq, to_seq, mentions FROM items "
                "WHERE tenant = ? AND session_id = ? ORDER BY to_seq DESC, kind, key",
                (tenant, session_id),
            )
            .fetchall()
        )
        return [Item(*row) for row in rows]

    def _save_items_sync(
        self, tenant: str, session_id: str, items: Sequence[Item], next_pointer: int
    ) -> None:
        now = now_us()
        with transaction(self._db(), "BEGIN IMMEDIATE") as conn:
            self._ensure_row(conn, tenant, session_id)
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

    def _put_job_sync(self, job: memory_pb2.Job) -> None:
        with transaction(self._db()) as conn:
            conn.execute(
                "INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                "state = excluded.state, head = excluded.head, record = excluded.record",
                (
                    job.id,
                    job.kind,
                    job.tenant,
                    job.session_id,
                    job.state,
                    job.head,
                    job.SerializeToString(),
                ),
            )

    def _job_sync(self, job_id: str) -> memory_pb2.Job | None:
        row = self._db().execute("SELECT record FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else memory_pb2.Job.FromString(row[0])

    def _active_job_sync(self, tenant: str, session_id: str, kind: str) -> memory_pb2.Job | None:
        row = (
            self._db()
            .execute(
                "SELECT record FROM jobs WHERE tenant = ? AND session_id = ? AND kind = ? "
                "AND state IN (?, ?) LIMIT 1",
                (tenant, session_id, kind, *_ACTIVE),
            )
            .fetchone()
        )
        return None if row is None else memory_pb2.Job.FromString(row[0])

    def _unfinished_jobs_sync(self) -> list[tuple[str, str]]:
        rows = (
            self._db()
            .execute("SELECT id, kind FROM jobs WHERE state IN (?, ?) ORDER BY rowid", _ACTIVE)
            .fetchall()
        )
        return [(row[0], row[1]) for row in rows]

    def _succeeded_job_sync(
        self, tenant: str, session_id: str, kind: str, head: str
    ) -> memory_pb2.Job | None:
        row = (
            self._db()
            .execute(
                "SELECT record FROM jobs WHERE tenant = ? AND session_id = ? AND kind = ? "
                "AND head = ? AND state = ? LIMIT 1",
                (tenant, session_id, kind, head, memory_pb2.JOB_STATE_SUCCEEDED),
            )
            .fetchone()
        )
        return None if row is None else memory_pb2.Job.FromString(row[0])
