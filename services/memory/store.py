"""SQLite adapter for long-term memory: one summary and offset per session, plus history.

The summary and the offset move in one transaction, so the offset never
advances past messages whose summary was not stored.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from threadline.sqlite import SqliteThread, open_database

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
]


@dataclass(frozen=True)
class SessionMemory:
    summary: str
    #: seq of the first message not yet consolidated.
    offset: int


class SqliteMemoryStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._thread = SqliteThread("memory store", "memory-sqlite")
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        await self._thread.start(self._open_sync)

    async def close(self) -> None:
        await self._thread.stop(self._close_sync)

    async def get(self, tenant: str, session_id: str) -> SessionMemory:
        return await self._thread.run(self._get_sync, tenant, session_id)

    async def save(
        self, tenant: str, session_id: str, *, summary: str, from_seq: int, next_offset: int
    ) -> None:
        await self._thread.run(self._save_sync, tenant, session_id, summary, from_seq, next_offset)

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
                "SELECT summary, next_offset FROM memories WHERE tenant = ? AND session_id = ?",
                (tenant, session_id),
            )
            .fetchone()
        )
        return SessionMemory("", 0) if row is None else SessionMemory(row[0], int(row[1]))

    def _save_sync(
        self, tenant: str, session_id: str, summary: str, from_seq: int, next_offset: int
    ) -> None:
        conn = self._db()
        now = time.time_ns() // 1000
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "INSERT INTO memories (tenant, session_id, summary, next_offset, updated_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (tenant, session_id) DO UPDATE SET "
                "summary = excluded.summary, next_offset = excluded.next_offset, "
                "updated_at = excluded.updated_at",
                (tenant, session_id, summary, next_offset, now),
            )
            conn.execute(
                "INSERT INTO memory_history VALUES (?, ?, ?, ?, ?, ?)",
                (tenant, session_id, from_seq, next_offset - 1, summary, now),
            )
            conn.execute("COMMIT")
        except Exception:
            conn.execute("ROLLBACK")
            raise
