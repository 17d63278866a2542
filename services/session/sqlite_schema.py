"""The session store's SQLite schema, as forward migrations counted by `PRAGMA user_version`."""

from __future__ import annotations

#: Forward migrations; entry N takes the schema from user_version N to N+1. Append
#: only: a released migration never changes, since databases already ran it.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        # Timestamps are integer microseconds since the epoch (UTC): the precision
        # the chain hashes, so a message read back hashes to its stored hash.
        """
        CREATE TABLE sessions (
            id TEXT PRIMARY KEY,
            tenant TEXT NOT NULL,
            title TEXT NOT NULL,
            model TEXT NOT NULL,
            system_prompt TEXT NOT NULL,
            metadata_json TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL,
            head TEXT NOT NULL,
            message_count INTEGER NOT NULL,
            forked_from TEXT NOT NULL DEFAULT '',
            compacted_from TEXT NOT NULL DEFAULT ''
        ) STRICT
        """,
        "CREATE INDEX sessions_by_tenant_updated ON sessions (tenant, updated_at DESC, id DESC)",
        """
        CREATE TABLE messages (
            session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
            seq INTEGER NOT NULL,
            id TEXT NOT NULL,
            role INTEGER NOT NULL,
            content TEXT NOT NULL,
            tool_calls_json TEXT NOT NULL,
            tool_call_id TEXT NOT NULL,
            name TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            interrupted INTEGER NOT NULL,
            token_count INTEGER NOT NULL,
            parent_hash TEXT NOT NULL,
            hash TEXT NOT NULL,
            PRIMARY KEY (session_id, seq)
        ) STRICT
        """,
        # first_user_message without scanning a long session.
        "CREATE INDEX messages_by_role ON messages (session_id, role, seq)",
        # Every tool call id of a session, so validating a tool result is an index
        # lookup instead of a scan of every assistant message. Anything that copies
        # messages between sessions (fork, compaction) copies these rows too.
        """
        CREATE TABLE tool_calls (
            session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
            call_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            PRIMARY KEY (session_id, call_id)
        ) STRICT, WITHOUT ROWID
        """,
    ),
    (
        # The result of every append made with a request id (the newest
        # REQUEST_ID_MEMORY per session), so a client retry after a lost reply gets
        # the first result back instead of appending twice. The messages themselves
        # are read back from the log by [first_seq, first_seq + message_count).
        """
        CREATE TABLE append_requests (
            session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
            request_id TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            first_seq INTEGER NOT NULL,
            message_count INTEGER NOT NULL,
            head TEXT NOT NULL,
            PRIMARY KEY (session_id, request_id)
        ) STRICT, WITHOUT ROWID
        """,
        # Pruning finds the oldest results of a session without a scan.
        "CREATE INDEX append_requests_by_seq ON append_requests (session_id, first_seq)",
        # Retention walks every tenant's sessions oldest first.
        "CREATE INDEX sessions_by_updated ON sessions (updated_at, id)",
        """
        CREATE TABLE calibration (
            model TEXT PRIMARY KEY,
            chars_per_token REAL NOT NULL,
            updated_at INTEGER NOT NULL
        ) STRICT
        """,
    ),
    (
        # A deleted session's tombstone, kept after its erasure finished: the id stays
        # known as deleted. No user text: ids, the tenant, why and when.
        """
        CREATE TABLE erasures (
            session_id TEXT PRIMARY KEY,
            tenant TEXT NOT NULL,
            reason TEXT NOT NULL,
            deleted_at INTEGER NOT NULL,
            completed_at INTEGER NOT NULL DEFAULT 0
        ) STRICT
        """,
        "CREATE INDEX erasures_unfinished ON erasures (tenant) WHERE completed_at = 0",
        # One row per owner service (memory, executor) and deleted session: the owner
        # erases what it keeps of the session, then marks its row done with counts.
        """
        CREATE TABLE erasure_owners (
            session_id TEXT NOT NULL,
            owner TEXT NOT NULL,
            deleted_at INTEGER NOT NULL,
            done INTEGER NOT NULL DEFAULT 0,
            removed_json TEXT NOT NULL DEFAULT '{}',
            PRIMARY KEY (session_id, owner)
        ) STRICT, WITHOUT ROWID
        """,
        "CREATE INDEX erasure_owners_pending ON erasure_owners (owner, deleted_at, session_id) "
        "WHERE done = 0",
        # Lineage: what derives from a session.
        "CREATE INDEX sessions_by_forked_from ON sessions (forked_from) WHERE forked_from != ''",
        "CREATE INDEX sessions_by_compacted_from ON sessions (compacted_from) "
        "WHERE compacted_from != ''",
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)
