"""The memory store's PostgreSQL schema, as migrations recorded in `memory_migrations`.

The tables match the SQLite file's (services/memory/sqlite_schema.py), times in
Unix microseconds alike; their names start with `memory` because one database
may hold the session and task stores too.
"""

from __future__ import annotations

from threadline.v1 import memory_pb2

_QUEUED, _RUNNING = memory_pb2.JOB_STATE_QUEUED, memory_pb2.JOB_STATE_RUNNING

#: Entry N takes the schema from version N to N+1. Append only: a released
#: migration never changes, since databases already ran it.
MIGRATIONS = [
    [
        """
    CREATE TABLE memories (
        tenant TEXT NOT NULL,
        session_id TEXT NOT NULL,
        summary TEXT NOT NULL,
        next_offset BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        extract_offset BIGINT NOT NULL DEFAULT 0,
        consolidate_failures INTEGER NOT NULL DEFAULT 0,
        compact_failures INTEGER NOT NULL DEFAULT 0,
        compact_failed_head TEXT NOT NULL DEFAULT '',
        -- For a session made by compaction: how many messages it started with.
        compacted_size BIGINT NOT NULL DEFAULT -1,
        PRIMARY KEY (tenant, session_id)
    )
    """,
        """
    CREATE TABLE memory_history (
        tenant TEXT NOT NULL,
        session_id TEXT NOT NULL,
        from_seq BIGINT NOT NULL,
        to_seq BIGINT NOT NULL,
        summary TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        archived BOOLEAN NOT NULL DEFAULT false
    )
    """,
        "CREATE INDEX memory_history_session ON memory_history (tenant, session_id, from_seq)",
        """
    CREATE TABLE memory_activity (
        tenant TEXT NOT NULL,
        session_id TEXT NOT NULL,
        model TEXT NOT NULL,
        prompt_tokens BIGINT NOT NULL,
        context_window BIGINT NOT NULL,
        last_active BIGINT NOT NULL,
        -- Set once the idle check has looked at the session since its last activity.
        idle_checked BOOLEAN NOT NULL DEFAULT false,
        PRIMARY KEY (tenant, session_id)
    )
    """,
        "CREATE INDEX memory_activity_idle ON memory_activity (last_active) WHERE NOT idle_checked",
        """
    CREATE TABLE memory_items (
        tenant TEXT NOT NULL,
        session_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        key TEXT NOT NULL,
        json TEXT NOT NULL,
        from_seq BIGINT NOT NULL,
        to_seq BIGINT NOT NULL,
        mentions INTEGER NOT NULL,
        updated_at BIGINT NOT NULL,
        PRIMARY KEY (tenant, session_id, kind, key)
    )
    """,
        """
    CREATE TABLE memory_jobs (
        id TEXT PRIMARY KEY,
        -- Submission order, for unfinished jobs oldest first (SQLite's rowid).
        seq BIGINT GENERATED ALWAYS AS IDENTITY,
        kind TEXT NOT NULL,
        tenant TEXT NOT NULL,
        session_id TEXT NOT NULL,
        state INTEGER NOT NULL,
        head TEXT NOT NULL,
        record BYTEA NOT NULL
    )
    """,
        "CREATE INDEX memory_jobs_session ON memory_jobs (tenant, session_id, kind, state)",
        # One active job of a kind per session, whichever replica submits it.
        "CREATE UNIQUE INDEX memory_jobs_one_active ON memory_jobs (tenant, session_id, kind) "
        f"WHERE state IN ({_QUEUED}, {_RUNNING})",
    ],
    [
        # Sessions erased here (their session was deleted): no write for them lands
        # after the erasure, whatever job was still running. Ids only.
        """
    CREATE TABLE memory_erased_sessions (
        tenant TEXT NOT NULL,
        session_id TEXT NOT NULL,
        erased_at BIGINT NOT NULL,
        PRIMARY KEY (tenant, session_id)
    )
    """,
    ],
]
