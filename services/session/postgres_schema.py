"""The session store's PostgreSQL schema, as versioned migrations (threadline.postgres).

The tables mirror the SQLite ones (sqlite_schema.py) with two differences that
PostgreSQL forces:

* TEXT cannot hold a NUL character, and message content, titles and tool call
  ids may. Free text therefore lives in JSON documents kept as TEXT (JSON escapes
  NUL as \\u0000; JSONB would refuse it), and the free-form keys that are looked
  up (tool call ids, request ids, model names) are BYTEA holding their UTF-8.
* Foreign keys are always enforced, so a session's rows go with it (ON DELETE
  CASCADE); cleanup_orphans only meets rows written with triggers disabled.

Ids use the "C" collation: byte order, the order of the other backends' listings
whatever the database's locale is.
"""

from __future__ import annotations

#: Forward migrations; entry N takes the schema from version N to N+1. Append only:
#: a released migration never changes, since databases already ran it.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        # Timestamps are integer microseconds since the epoch (UTC): the precision
        # the chain hashes, so a message read back hashes to its stored hash.
        # `details` is JSON: title, model, system_prompt, metadata.
        """
        CREATE TABLE sessions (
            id TEXT COLLATE "C" PRIMARY KEY,
            tenant TEXT COLLATE "C" NOT NULL,
            details TEXT NOT NULL,
            created_at BIGINT NOT NULL,
            updated_at BIGINT NOT NULL,
            head TEXT NOT NULL,
            message_count INTEGER NOT NULL,
            forked_from TEXT NOT NULL,
            compacted_from TEXT NOT NULL
        )
        """,
        # Listing pages backwards through it; retention walks the second forwards.
        "CREATE INDEX sessions_by_tenant_updated ON sessions (tenant, updated_at, id)",
        "CREATE INDEX sessions_by_updated ON sessions (updated_at, id)",
        # `body` is JSON: id, content, tool_calls, tool_call_id, name, interrupted.
        """
        CREATE TABLE messages (
            session_id TEXT COLLATE "C" NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
            seq INTEGER NOT NULL,
            role INTEGER NOT NULL,
            created_at BIGINT NOT NULL,
            token_count INTEGER NOT NULL,
            parent_hash TEXT NOT NULL,
            hash TEXT NOT NULL,
            body TEXT NOT NULL,
            PRIMARY KEY (session_id, seq)
        )
        """,
        # first_user_message without scanning a long session (2 is ROLE_USER).
        "CREATE INDEX messages_first_user ON messages (session_id, seq) WHERE role = 2",
        # Every tool call id of a session, so validating a tool result is an index
        # lookup instead of a scan of every assistant message.
        """
        CREATE TABLE tool_calls (
            session_id TEXT COLLATE "C" NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
            call_id BYTEA NOT NULL,
            seq INTEGER NOT NULL,
            PRIMARY KEY (session_id, call_id)
        )
        """,
        # The result of every append made with a request id (the newest
        # REQUEST_ID_MEMORY per session); the messages are read back from the log.
        """
        CREATE TABLE append_requests (
            session_id TEXT COLLATE "C" NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
            request_id BYTEA NOT NULL,
            fingerprint TEXT NOT NULL,
            first_seq INTEGER NOT NULL,
            message_count INTEGER NOT NULL,
            head TEXT NOT NULL,
            PRIMARY KEY (session_id, request_id)
        )
        """,
        # Pruning finds the oldest results of a session without a scan.
        "CREATE INDEX append_requests_by_seq ON append_requests (session_id, first_seq)",
        """
        CREATE TABLE calibration (
            model BYTEA PRIMARY KEY,
            chars_per_token DOUBLE PRECISION NOT NULL,
            updated_at BIGINT NOT NULL
        )
        """,
    ),
    (
        # A deleted session's tombstone, kept after its erasure finished. No user
        # text: ids, the tenant, why and when.
        """
        CREATE TABLE erasures (
            session_id TEXT COLLATE "C" PRIMARY KEY,
            tenant TEXT COLLATE "C" NOT NULL,
            reason TEXT NOT NULL,
            deleted_at BIGINT NOT NULL,
            completed_at BIGINT NOT NULL DEFAULT 0
        )
        """,
        "CREATE INDEX erasures_unfinished ON erasures (tenant) WHERE completed_at = 0",
        # One row per owner service and deleted session, marked done with counts.
        """
        CREATE TABLE erasure_owners (
            session_id TEXT COLLATE "C" NOT NULL REFERENCES erasures (session_id),
            owner TEXT COLLATE "C" NOT NULL,
            deleted_at BIGINT NOT NULL,
            done BOOLEAN NOT NULL DEFAULT false,
            removed TEXT NOT NULL DEFAULT '{}',
            PRIMARY KEY (session_id, owner)
        )
        """,
        "CREATE INDEX erasure_owners_pending ON erasure_owners (owner, deleted_at, session_id) "
        "WHERE NOT done",
        # Lineage: what derives from a session.
        "CREATE INDEX sessions_by_forked_from ON sessions (forked_from) WHERE forked_from <> ''",
        "CREATE INDEX sessions_by_compacted_from ON sessions (compacted_from) "
        "WHERE compacted_from <> ''",
    ),
)
