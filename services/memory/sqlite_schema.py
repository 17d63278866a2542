"""The memory store's SQLite schema, as forward migrations counted by `PRAGMA user_version`."""

from __future__ import annotations

from threadline.v1 import memory_pb2

_QUEUED, _RUNNING = memory_pb2.JOB_STATE_QUEUED, memory_pb2.JOB_STATE_RUNNING
_FAILED = memory_pb2.JOB_STATE_FAILED
#: Appended to a record, this marks it failed: protobuf parses concatenated
#: messages as one merged message, so the later state and error win.
_SUPERSEDED = memory_pb2.Job(
    state=_FAILED,
    error="superseded: another job of its kind was already active for the session",
).SerializeToString()

#: Forward migrations; entry N takes the schema from user_version N to N+1. Append
#: only: a released migration never changes, since databases already ran it.
MIGRATIONS = [
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
    [
        # Files from before the index may hold two active jobs of a kind for a session
        # (two replicas raced in submit): the oldest stays, the others fail, so the
        # index can be built and no job is run twice. (|| makes text: CAST back to a blob.)
        f"""
    UPDATE jobs SET state = {_FAILED}, record = CAST(record || X'{_SUPERSEDED.hex()}' AS BLOB)
    WHERE state IN ({_QUEUED}, {_RUNNING}) AND rowid NOT IN (
        SELECT min(rowid) FROM jobs WHERE state IN ({_QUEUED}, {_RUNNING})
        GROUP BY tenant, session_id, kind
    )
    """,
        # One active job of a kind per session, whichever replica submits it.
        f"CREATE UNIQUE INDEX jobs_one_active ON jobs (tenant, session_id, kind) "
        f"WHERE state IN ({_QUEUED}, {_RUNNING})",
    ],
    [
        # Sessions erased here (their session was deleted): no write for them lands
        # after the erasure, whatever job was still running. Ids only.
        """
    CREATE TABLE erased_sessions (
        tenant TEXT NOT NULL,
        session_id TEXT NOT NULL,
        erased_at INTEGER NOT NULL,
        PRIMARY KEY (tenant, session_id)
    )
    """,
    ],
]
