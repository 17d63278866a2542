"""The task store's PostgreSQL schema, as versioned migrations (`threadline.postgres`).

The same tables as the SQLite schema. Times and cost are DOUBLE PRECISION so a
record's floats (time.time(), cost) come back exactly as they were written.
"""

from __future__ import annotations

#: Forward migrations; entry N takes the schema from version N to N+1. Append only.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """
        CREATE TABLE tasks (
            id TEXT PRIMARY KEY,
            tenant TEXT NOT NULL,
            prompt TEXT NOT NULL,
            agent_type TEXT NOT NULL,
            runner TEXT NOT NULL,
            workspace TEXT NOT NULL,
            status TEXT NOT NULL,
            reason TEXT NOT NULL,
            model TEXT NOT NULL,
            tokens_in BIGINT NOT NULL,
            tokens_out BIGINT NOT NULL,
            cost DOUBLE PRECISION NOT NULL,
            budget_tokens BIGINT NOT NULL,
            exit_code INTEGER,
            created_at DOUBLE PRECISION NOT NULL,
            started_at DOUBLE PRECISION,
            finished_at DOUBLE PRECISION
        )
        """,
        "CREATE INDEX tasks_by_tenant ON tasks (tenant, created_at DESC, id DESC)",
        "CREATE INDEX tasks_by_status ON tasks (status, created_at, id)",
        # No foreign key to tasks, as in SQLite: no backend requires a record before its log.
        """
        CREATE TABLE task_logs (
            task_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            line TEXT NOT NULL,
            PRIMARY KEY (task_id, seq)
        )
        """,
    ),
    # Replicas sharing the store: who owns each task, cancel requests for the owner,
    # and each replica's heartbeat, timed by the server's clock (replicas' clocks may
    # disagree).
    (
        "ALTER TABLE tasks ADD COLUMN owner TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE tasks ADD COLUMN cancel_requested_at DOUBLE PRECISION",
        """
        CREATE TABLE executor_replicas (
            replica TEXT PRIMARY KEY,
            expires_at TIMESTAMPTZ NOT NULL
        )
        """,
    ),
    # Erasure: retention finds ended tasks by when they ended; the workspace sweep asks
    # which workspaces stored tasks still name.
    (
        "CREATE INDEX tasks_by_finished ON tasks (finished_at) WHERE finished_at IS NOT NULL",
        "CREATE INDEX tasks_by_workspace ON tasks (workspace)",
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)
