"""The task store's SQLite schema, as forward migrations counted by `PRAGMA user_version`."""

from __future__ import annotations

#: Forward migrations; entry N takes the schema from user_version N to N+1. Append only.
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
            tokens_in INTEGER NOT NULL,
            tokens_out INTEGER NOT NULL,
            cost REAL NOT NULL,
            budget_tokens INTEGER NOT NULL,
            exit_code INTEGER,
            created_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL
        ) STRICT
        """,
        "CREATE INDEX tasks_by_tenant ON tasks (tenant, created_at DESC, id DESC)",
        "CREATE INDEX tasks_by_status ON tasks (status, created_at, id)",
        """
        CREATE TABLE task_logs (
            task_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            line TEXT NOT NULL,
            PRIMARY KEY (task_id, seq)
        ) STRICT, WITHOUT ROWID
        """,
    ),
    # Replicas sharing one file (several processes on one machine): who owns each
    # task, cancel requests for the owner, and each replica's heartbeat.
    (
        "ALTER TABLE tasks ADD COLUMN owner TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE tasks ADD COLUMN cancel_requested_at REAL",
        """
        CREATE TABLE executor_replicas (
            replica TEXT PRIMARY KEY,
            expires_at REAL NOT NULL
        ) STRICT
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
