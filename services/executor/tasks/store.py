"""Where task records and their output logs live: SQLite by default, Redis when configured.

The pool writes every status transition through the store before it tells
anyone, so a restarted executor finds each task where the last one left it.
Logs are append-only stream-json: one JSON object per line, numbered from 0.
"""

from __future__ import annotations

import builtins
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, Protocol, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.executor.tasks.records import TASK_STATUSES, TaskRecord, TaskStatus
from threadline.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from threadline.sqlite import SqliteThread, open_database
from threadline.sqlite import transaction as _transaction

_P = ParamSpec("_P")
_T = TypeVar("_T")

MAX_LIST_LIMIT = 1000


class TaskStore(Protocol):
    async def create(self, task: TaskRecord) -> None: ...

    async def get(self, tenant: str, task_id: str) -> TaskRecord:
        """NotFound for an unknown id and for another tenant's task alike."""
        ...

    async def list(
        self, tenant: str, *, status: str = "", limit: int = 50
    ) -> builtins.list[TaskRecord]:
        """The tenant's tasks, newest first, optionally of one status."""
        ...

    async def update(self, task: TaskRecord) -> None: ...

    async def by_status(self, status: TaskStatus) -> builtins.list[TaskRecord]:
        """Every tenant's tasks in a status, oldest first (restart recovery)."""
        ...

    async def append_log(self, task_id: str, entry: dict[str, Any]) -> int:
        """Store one stream-json object; returns its seq (0, 1, 2, ...)."""
        ...

    async def read_log(self, task_id: str, after: int = -1) -> builtins.list[tuple[int, str]]:
        """(seq, json line) for every entry with seq > after, in order."""
        ...

    async def close(self) -> None: ...


def task_not_found(task_id: str) -> NotFound:
    return NotFound(f"task {task_id} not found", details={"task_id": task_id})


def log_line(entry: dict[str, Any]) -> str:
    return json.dumps(entry, ensure_ascii=False, separators=(",", ":"))


def _check_listing(status: str, limit: int) -> None:
    if status and status not in TASK_STATUSES:
        raise InvalidArgument(f"unknown task status {status!r}", details={"status": status})
    if not 0 < limit <= MAX_LIST_LIMIT:
        raise InvalidArgument(f"limit must be between 1 and {MAX_LIST_LIMIT}, got {limit}")


# -- SQLite ---------------------------------------------------------------------

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
)

SCHEMA_VERSION = len(MIGRATIONS)

_COLUMNS = (
    "id",
    "tenant",
    "prompt",
    "agent_type",
    "runner",
    "workspace",
    "status",
    "reason",
    "model",
    "tokens_in",
    "tokens_out",
    "cost",
    "budget_tokens",
    "exit_code",
    "created_at",
    "started_at",
    "finished_at",
)
_COLUMN_LIST = ", ".join(_COLUMNS)


def _row_values(task: TaskRecord) -> tuple[Any, ...]:
    data = task.to_dict()
    return tuple(data[column] for column in _COLUMNS)


def _task_from_row(row: sqlite3.Row) -> TaskRecord:
    return TaskRecord.from_dict({column: row[column] for column in _COLUMNS})


class SqliteTaskStore:
    """TaskStore on a SQLite file. `await open()` before use, `await close()` after.

    Same discipline as the session store: one worker thread owns the connection,
    WAL, synchronous=FULL (an acknowledged transition survives a crash).
    """

    def __init__(self, path: Path, *, busy_timeout_ms: int = 5_000) -> None:
        self.path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._thread = SqliteThread("task store", "task-sqlite")
        # Created, used and closed on the worker thread only.
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        await self._thread.start(self._open_sync)

    async def close(self) -> None:
        await self._thread.stop(self._close_sync)

    async def _run(self, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        return await self._thread.run(fn, *args, **kwargs)

    # -- TaskStore --------------------------------------------------------------

    async def create(self, task: TaskRecord) -> None:
        await self._run(self._create_sync, task)

    async def get(self, tenant: str, task_id: str) -> TaskRecord:
        return await self._run(self._get_sync, tenant, task_id)

    async def list(
        self, tenant: str, *, status: str = "", limit: int = 50
    ) -> builtins.list[TaskRecord]:
        _check_listing(status, limit)
        return await self._run(self._list_sync, tenant, status, limit)

    async def update(self, task: TaskRecord) -> None:
        await self._run(self._update_sync, task)

    async def by_status(self, status: TaskStatus) -> builtins.list[TaskRecord]:
        _check_listing(status, 1)
        return await self._run(self._by_status_sync, status)

    async def append_log(self, task_id: str, entry: dict[str, Any]) -> int:
        return await self._run(self._append_log_sync, task_id, log_line(entry))

    async def read_log(self, task_id: str, after: int = -1) -> builtins.list[tuple[int, str]]:
        return await self._run(self._read_log_sync, task_id, after)

    # -- worker thread ------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise Unavailable("task store is not open")
        return self._conn

    def _open_sync(self) -> None:
        self._conn = open_database(
            self.path,
            name="task store",
            migrations=MIGRATIONS,
            busy_timeout_ms=self._busy_timeout_ms,
            foreign_keys=False,
        )

    def _close_sync(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            conn.execute("PRAGMA optimize")
        finally:
            conn.close()

    def _create_sync(self, task: TaskRecord) -> None:
        placeholders = ", ".join("?" for _ in _COLUMNS)
        try:
            self._connection().execute(
                f"INSERT INTO tasks ({_COLUMN_LIST}) VALUES ({placeholders})", _row_values(task)
            )
        except sqlite3.IntegrityError as exc:
            raise AlreadyExists(
                f"task {task.id} already exists", details={"task_id": task.id}
            ) from exc

    def _get_sync(self, tenant: str, task_id: str) -> TaskRecord:
        row = (
            self._connection()
            .execute(
                f"SELECT {_COLUMN_LIST} FROM tasks WHERE id = ? AND tenant = ?", (task_id, tenant)
            )
            .fetchone()
        )
        if row is None:
            raise task_not_found(task_id)
        return _task_from_row(row)

    def _list_sync(self, tenant: str, status: str, limit: int) -> builtins.list[TaskRecord]:
        sql = f"SELECT {_COLUMN_LIST} FROM tasks WHERE tenant = ?"
        args: builtins.list[Any] = [tenant]
        if status:
            sql += " AND status = ?"
            args.append(status)
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        args.append(limit)
        return [_task_from_row(row) for row in self._connection().execute(sql, args)]

    def _update_sync(self, task: TaskRecord) -> None:
        assignments = ", ".join(f"{column} = ?" for column in _COLUMNS[1:])
        values = _row_values(task)
        cursor = self._connection().execute(
            f"UPDATE tasks SET {assignments} WHERE id = ?", (*values[1:], task.id)
        )
        if cursor.rowcount == 0:
            raise task_not_found(task.id)

    def _by_status_sync(self, status: str) -> builtins.list[TaskRecord]:
        rows = self._connection().execute(
            f"SELECT {_COLUMN_LIST} FROM tasks WHERE status = ? ORDER BY created_at, id",
            (status,),
        )
        return [_task_from_row(row) for row in rows]

    def _append_log_sync(self, task_id: str, line: str) -> int:
        conn = self._connection()
        with _transaction(conn, "BEGIN IMMEDIATE"):
            seq = int(
                conn.execute(
                    "SELECT COALESCE(MAX(seq) + 1, 0) FROM task_logs WHERE task_id = ?",
                    (task_id,),
                ).fetchone()[0]
            )
            conn.execute(
                "INSERT INTO task_logs (task_id, seq, line) VALUES (?, ?, ?)",
                (task_id, seq, line),
            )
        return seq

    def _read_log_sync(self, task_id: str, after: int) -> builtins.list[tuple[int, str]]:
        rows = self._connection().execute(
            "SELECT seq, line FROM task_logs WHERE task_id = ? AND seq > ? ORDER BY seq",
            (task_id, after),
        )
        return [(int(row["seq"]), str(row["line"])) for row in rows]


# -- Redis ----------------------------------------------------------------------


def _text(value: object) -> str:
    # The client may or may not decode responses; both must work.
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisTaskStore:
    """TaskStore on Redis, for executor replicas that share their tasks.

    Keys under `prefix`: `rec:<id>` the record as JSON, `log:<id>` a list of log
    lines (a line's seq is its index), `tenant:<tenant>` and `status:<status>`
    sorted sets of ids scored by created_at.
    """

    def __init__(self, client: aioredis.Redis, prefix: str = "threadline:task:") -> None:
        self._redis = client
        self._prefix = prefix

    def _rec(self, task_id: str) -> str:
        return f"{self._prefix}rec:{task_id}"

    def _log(self, task_id: str) -> str:
        return f"{self._prefix}log:{task_id}"

    def _tenant(self, tenant: str) -> str:
        return f"{self._prefix}tenant:{tenant}"

    def _status(self, status: str) -> str:
        return f"{self._prefix}status:{status}"

    async def create(self, task: TaskRecord) -> None:
        try:
            created = await self._redis.set(self._rec(task.id), json.dumps(task.to_dict()), nx=True)
            if not created:
                raise AlreadyExists(f"task {task.id} already exists", details={"task_id": task.id})
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.zadd(self._tenant(task.tenant), {task.id: task.created_at})
                pipe.zadd(self._status(task.status), {task.id: task.created_at})
                await pipe.execute()
        except RedisError as exc:
            raise Unavailable(f"task store: {exc}") from exc

    async def _load(self, task_id: str) -> TaskRecord | None:
        try:
            raw = await self._redis.get(self._rec(task_id))
        except RedisError as exc:
            raise Unavailable(f"task store: {exc}") from exc
        return None if raw is None else TaskRecord.from_dict(json.loads(raw))

    async def _load_many(self, ids: builtins.list[str]) -> builtins.list[TaskRecord]:
        if not ids:
            return []
        try:
            raws = await self._redis.mget([self._rec(task_id) for task_id in ids])
        except RedisError as exc:
            raise Unavailable(f"task store: {exc}") from exc
        return [TaskRecord.from_dict(json.loads(raw)) for raw in raws if raw is not None]

    async def get(self, tenant: str, task_id: str) -> TaskRecord:
        task = await self._load(task_id)
        if task is None or task.tenant != tenant:
            raise task_not_found(task_id)
        return task

    async def list(
        self, tenant: str, *, status: str = "", limit: int = 50
    ) -> builtins.list[TaskRecord]:
        _check_listing(status, limit)
        found: builtins.list[TaskRecord] = []
        start, step = 0, max(limit, 50)
        # Walks the tenant's index newest first; a status filter skips the others.
        while len(found) < limit:
            try:
                ids = await self._redis.zrevrange(self._tenant(tenant), start, start + step - 1)
            except RedisError as exc:
                raise Unavailable(f"task store: {exc}") from exc
            if not ids:
                break
            start += len(ids)
            for task in await self._load_many([_text(i) for i in ids]):
                if not status or task.status == status:
                    found.append(task)
        return found[:limit]

    async def update(self, task: TaskRecord) -> None:
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(self._rec(task.id), json.dumps(task.to_dict()), xx=True)
                for status in TASK_STATUSES - {task.status}:
                    pipe.zrem(self._status(status), task.id)
                pipe.zadd(self._status(task.status), {task.id: task.created_at})
                replies = await pipe.execute()
            if not replies[0]:
                # Never existed: take back the status index entry just added.
                await self._redis.zrem(self._status(task.status), task.id)
                raise task_not_found(task.id)
        except RedisError as exc:
            raise Unavailable(f"task store: {exc}") from exc

    async def by_status(self, status: TaskStatus) -> builtins.list[TaskRecord]:
        _check_listing(status, 1)
        try:
            ids = await self._redis.zrange(self._status(status), 0, -1)
        except RedisError as exc:
            raise Unavailable(f"task store: {exc}") from exc
        tasks = await self._load_many([_text(i) for i in ids])
        # The index may lag a concurrent update; the record is the truth.
        return [task for task in tasks if task.status == status]

    async def append_log(self, task_id: str, entry: dict[str, Any]) -> int:
        try:
            length = await self._redis.rpush(self._log(task_id), log_line(entry))
        except RedisError as exc:
            raise Unavailable(f"task store: {exc}") from exc
        return int(length) - 1

    async def read_log(self, task_id: str, after: int = -1) -> builtins.list[tuple[int, str]]:
        first = max(after + 1, 0)
        try:
            lines = await self._redis.lrange(self._log(task_id), first, -1)
        except RedisError as exc:
            raise Unavailable(f"task store: {exc}") from exc
        return [(first + i, _text(line)) for i, line in enumerate(lines)]

    async def close(self) -> None:
        # The client belongs to whoever made it.
        return None
