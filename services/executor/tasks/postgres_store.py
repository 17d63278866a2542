"""TaskStore on PostgreSQL, for executor replicas that share their tasks.

The same tables and orderings as the SQLite store (`postgres_schema`), on the
kernel every PostgreSQL store uses (`threadline.postgres`); validation, columns
and errors are the ones `store` gives every backend.
"""

from __future__ import annotations

import builtins
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Any

import asyncpg

from services.executor.tasks.postgres_schema import MIGRATIONS
from services.executor.tasks.records import LIST_LIMIT_DEFAULT, TaskRecord, TaskStatus
from services.executor.tasks.store import (
    TASK_COLUMN_LIST,
    TASK_COLUMNS,
    TasksRemoved,
    check_listing,
    log_line,
    row_values,
    task_exists,
    task_not_found,
)
from threadline.errors import Unavailable
from threadline.postgres import UNREACHABLE, PostgresDatabase

_PLACEHOLDERS = ", ".join(f"${i}" for i in range(1, len(TASK_COLUMNS) + 1))
# $1 is the id; the other columns follow in TASK_COLUMNS order.
_ASSIGNMENTS = ", ".join(f"{column} = ${i}" for i, column in enumerate(TASK_COLUMNS[1:], 2))
_INSERT = (
    f"INSERT INTO tasks ({TASK_COLUMN_LIST}) VALUES ({_PLACEHOLDERS}) "
    "ON CONFLICT (id) DO NOTHING RETURNING id"
)
_UPDATE = f"UPDATE tasks SET {_ASSIGNMENTS} WHERE id = $1 RETURNING id"
# Of two replicas updating one row, the later waits for the first to commit, then
# re-checks its WHERE on the new row: only one finds the status and owner it expects.
_UPDATE_IF = (
    f"UPDATE tasks SET {_ASSIGNMENTS} WHERE id = $1 "
    f"AND status = ${len(TASK_COLUMNS) + 1} AND owner = ${len(TASK_COLUMNS) + 2} RETURNING id"
)
# Heartbeats run on the server's clock: replicas' clocks may disagree.
_HEARTBEAT = (
    "INSERT INTO executor_replicas (replica, expires_at) "
    "VALUES ($1, clock_timestamp() + make_interval(secs => $2)) "
    "ON CONFLICT (replica) DO UPDATE SET expires_at = EXCLUDED.expires_at"
)
# Two appends to one log may compute the same seq: the later one waits for the
# first to commit, then inserts nothing, and tries again with the next seq.
_APPEND = (
    "INSERT INTO task_logs (task_id, seq, line) "
    "SELECT $1, COALESCE(MAX(seq) + 1, 0), $2 FROM task_logs WHERE task_id = $1 "
    "ON CONFLICT (task_id, seq) DO NOTHING RETURNING seq"
)


_ENDED = "status IN ('succeeded', 'failed', 'cancelled')"


def _removing(chosen: str) -> str:
    """One statement that deletes the tasks `chosen` selects (a query of ids, `$n`
    parameters its own) with their logs, and returns each record with its log's size.
    Rows another transaction is deleting are skipped, not waited for: two replicas
    sweeping at once each remove, and report, different tasks."""
    return (
        f"WITH gone AS (DELETE FROM tasks WHERE id IN ({chosen} FOR UPDATE SKIP LOCKED) "
        f"RETURNING {TASK_COLUMN_LIST}), "
        "lines AS (DELETE FROM task_logs WHERE task_id IN (SELECT id FROM gone) "
        "RETURNING task_id) "
        f"SELECT {TASK_COLUMN_LIST}, "
        "(SELECT count(*) FROM lines WHERE lines.task_id = gone.id) AS log_lines FROM gone "
        "ORDER BY finished_at, id"
    )


_DELETE_ENDED = _removing(f"SELECT id FROM tasks WHERE id = $1 AND tenant = $2 AND {_ENDED}")
_DELETE_TENANT_ENDED = _removing(f"SELECT id FROM tasks WHERE tenant = $1 AND {_ENDED}")
_DELETE_ENDED_BEFORE = _removing(
    f"SELECT id FROM tasks WHERE finished_at < $1 AND {_ENDED} ORDER BY finished_at, id LIMIT $2"
)


def _removed(rows: builtins.list[asyncpg.Record]) -> TasksRemoved:
    return TasksRemoved([_task(row) for row in rows], sum(int(row["log_lines"]) for row in rows))


def _task(row: asyncpg.Record) -> TaskRecord:
    return TaskRecord.from_dict(dict(row.items()))


@contextmanager
def _reachable() -> Iterator[None]:
    """A server that is away (restarting, failing over) is UNAVAILABLE, as with Redis."""
    try:
        yield
    except UNREACHABLE as exc:
        raise Unavailable("task store: PostgreSQL is unreachable") from exc


class PostgresTaskStore:
    """TaskStore on a PostgreSQL database. `await open()` before use (it migrates),
    `await close()` after. Each call is one statement, so each commits on its own."""

    def __init__(self, url: str, *, max_connections: int = 10) -> None:
        self._db = PostgresDatabase(
            url, name="task", migrations=MIGRATIONS, max_size=max_connections
        )

    async def open(self) -> None:
        await self._db.open()

    async def close(self) -> None:
        await self._db.close()

    async def create(self, task: TaskRecord) -> None:
        with _reachable():
            created = await self._db.pool.fetchval(_INSERT, *row_values(task))
        if created is None:
            raise task_exists(task.id)

    async def get(self, tenant: str, task_id: str) -> TaskRecord:
        with _reachable():
            row = await self._db.pool.fetchrow(
                f"SELECT {TASK_COLUMN_LIST} FROM tasks WHERE id = $1 AND tenant = $2",
                task_id,
                tenant,
            )
        if row is None:
            raise task_not_found(task_id)
        return _task(row)

    async def list(
        self, tenant: str, *, status: str = "", limit: int = LIST_LIMIT_DEFAULT
    ) -> builtins.list[TaskRecord]:
        check_listing(status, limit)
        sql = f"SELECT {TASK_COLUMN_LIST} FROM tasks WHERE tenant = $1"
        args: builtins.list[Any] = [tenant]
        if status:
            sql += " AND status = $2"
            args.append(status)
        sql += f" ORDER BY created_at DESC, id DESC LIMIT ${len(args) + 1}"
        with _reachable():
            rows = await self._db.pool.fetch(sql, *args, limit)
        return [_task(row) for row in rows]

    async def update(self, task: TaskRecord) -> None:
        with _reachable():
            updated = await self._db.pool.fetchval(_UPDATE, *row_values(task))
        if updated is None:
            raise task_not_found(task.id)

    async def update_if(self, task: TaskRecord, *, if_status: TaskStatus, if_owner: str) -> bool:
        with _reachable():
            updated = await self._db.pool.fetchval(
                _UPDATE_IF, *row_values(task), if_status, if_owner
            )
        return updated is not None

    async def heartbeat(self, replica: str, ttl_s: float) -> None:
        # Separate statements, no transaction: two replicas cleaning up at once never
        # hold one row each while waiting for the other's.
        with _reachable():
            if ttl_s > 0:
                await self._db.pool.execute(_HEARTBEAT, replica, float(ttl_s))
            else:
                await self._db.pool.execute(
                    "DELETE FROM executor_replicas WHERE replica = $1", replica
                )
            await self._db.pool.execute(
                "DELETE FROM executor_replicas WHERE expires_at <= clock_timestamp()"
            )

    async def live_replicas(self) -> builtins.set[str]:
        with _reachable():
            rows = await self._db.pool.fetch(
                "SELECT replica FROM executor_replicas WHERE expires_at > clock_timestamp()"
            )
        return {str(row["replica"]) for row in rows}

    async def by_status(self, status: TaskStatus) -> builtins.list[TaskRecord]:
        check_listing(status, 1)
        with _reachable():
            rows = await self._db.pool.fetch(
                f"SELECT {TASK_COLUMN_LIST} FROM tasks WHERE status = $1 ORDER BY created_at, id",
                status,
            )
        return [_task(row) for row in rows]

    async def append_log(self, task_id: str, entry: dict[str, Any]) -> int:
        line = log_line(entry)
        with _reachable():
            while True:
                seq = await self._db.pool.fetchval(_APPEND, task_id, line)
                if seq is not None:
                    return int(seq)

    async def read_log(self, task_id: str, after: int = -1) -> builtins.list[tuple[int, str]]:
        with _reachable():
            rows = await self._db.pool.fetch(
                "SELECT seq, line FROM task_logs WHERE task_id = $1 AND seq > $2 ORDER BY seq",
                task_id,
                after,
            )
        return [(int(row["seq"]), str(row["line"])) for row in rows]

    async def delete_ended(self, tenant: str, task_id: str) -> TasksRemoved:
        with _reachable():
            return _removed(await self._db.pool.fetch(_DELETE_ENDED, task_id, tenant))

    async def delete_tenant_ended(self, tenant: str) -> TasksRemoved:
        with _reachable():
            return _removed(await self._db.pool.fetch(_DELETE_TENANT_ENDED, tenant))

    async def delete_ended_before(self, cutoff: float, limit: int) -> TasksRemoved:
        with _reachable():
            return _removed(await self._db.pool.fetch(_DELETE_ENDED_BEFORE, cutoff, limit))

    async def workspaces_in_use(self, paths: Collection[str]) -> builtins.set[str]:
        with _reachable():
            rows = await self._db.pool.fetch(
                "SELECT DISTINCT workspace FROM tasks WHERE workspace = ANY($1::text[])",
                list(paths),
            )
        return {str(row["workspace"]) for row in rows}
