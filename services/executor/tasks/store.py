"""Where task records and their output logs live: SQLite by default, Redis when configured
(PostgreSQL in `postgres_store`, on the helpers here).

The pool writes every status transition through the store before it tells
anyone, so a restarted executor finds each task where the last one left it.
Logs are append-only stream-json: one JSON object per line, numbered from 0.
Replicas sharing a store coordinate through it: `update_if` is the one write two
replicas may race on (exactly one wins), and each replica's heartbeat says it is
alive.
"""

from __future__ import annotations

import builtins
import json
import sqlite3
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.executor.tasks.records import (
    LIST_LIMIT_DEFAULT,
    LIST_LIMIT_MAX,
    TASK_STATUSES,
    TERMINAL,
    TaskRecord,
    TaskStatus,
)
from services.executor.tasks.sqlite_schema import MIGRATIONS
from threadline.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from threadline.sqlite import SqliteDatabase, transaction


class TaskStore(Protocol):
    async def create(self, task: TaskRecord) -> None: ...

    async def get(self, tenant: str, task_id: str) -> TaskRecord:
        """NotFound for an unknown id and for another tenant's task alike."""
        ...

    async def list(
        self, tenant: str, *, status: str = "", limit: int = LIST_LIMIT_DEFAULT
    ) -> builtins.list[TaskRecord]:
        """The tenant's tasks, newest first, optionally of one status."""
        ...

    async def update(self, task: TaskRecord) -> None: ...

    async def update_if(self, task: TaskRecord, *, if_status: TaskStatus, if_owner: str) -> bool:
        """Write the record only if the stored one is still in `if_status` and owned by
        `if_owner`, atomically; False (nothing written) if it is not, or is unknown."""
        ...

    async def by_status(self, status: TaskStatus) -> builtins.list[TaskRecord]:
        """Every tenant's tasks in a status, oldest first (restart recovery)."""
        ...

    async def append_log(self, task_id: str, entry: dict[str, Any]) -> int:
        """Store one stream-json object; returns its seq (0, 1, 2, ...)."""
        ...

    async def read_log(self, task_id: str, after: int = -1) -> builtins.list[tuple[int, str]]:
        """(seq, json line) for every entry with seq > after, in order."""
        ...

    async def heartbeat(self, replica: str, ttl_s: float) -> None:
        """`replica` is alive for the next ttl_s seconds; 0 says it has stopped."""
        ...

    async def live_replicas(self) -> builtins.set[str]:
        """The replicas whose last heartbeat has not expired."""
        ...

    async def delete_ended(self, tenant: str, task_id: str) -> TasksRemoved:
        """Remove the tenant's task with its log if it has ended, atomically; nothing
        (an empty result) if it is unknown, another tenant's, or has not ended."""
        ...

    async def delete_tenant_ended(self, tenant: str) -> TasksRemoved:
        """Remove every ended task of the tenant with its log; the others stay."""
        ...

    async def delete_ended_before(self, cutoff: float, limit: int) -> TasksRemoved:
        """Remove up to `limit` tasks of any tenant that ended before `cutoff` (epoch
        seconds), with their logs, oldest first (on Redis: oldest first among the
        oldest created). Replicas may run it at once: each task is removed, and
        reported, by one of them."""
        ...

    async def workspaces_in_use(self, paths: Collection[str]) -> builtins.set[str]:
        """Those of `paths` that a stored task names as its workspace."""
        ...

    async def close(self) -> None: ...


@dataclass
class TasksRemoved:
    """What a deletion took from the store."""

    tasks: list[TaskRecord] = field(default_factory=list)
    log_lines: int = 0

    def __iadd__(self, other: TasksRemoved) -> TasksRemoved:
        self.tasks.extend(other.tasks)
        self.log_lines += other.log_lines
        return self


def task_not_found(task_id: str) -> NotFound:
    return NotFound(f"task {task_id} not found", details={"task_id": task_id})


def task_exists(task_id: str) -> AlreadyExists:
    return AlreadyExists(f"task {task_id} already exists", details={"task_id": task_id})


def log_line(entry: dict[str, Any]) -> str:
    return json.dumps(entry, ensure_ascii=False, separators=(",", ":"))


def check_listing(status: str, limit: int) -> None:
    """InvalidArgument for an unknown status or a limit out of range, before any backend runs."""
    if status and status not in TASK_STATUSES:
        raise InvalidArgument(f"unknown task status {status!r}", details={"status": status})
    if not 0 < limit <= LIST_LIMIT_MAX:
        raise InvalidArgument(f"limit must be between 1 and {LIST_LIMIT_MAX}, got {limit}")


#: A record's fields as the SQL backends' columns, in table order.
TASK_COLUMNS = (
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
    "owner",
    "cancel_requested_at",
)
TASK_COLUMN_LIST = ", ".join(TASK_COLUMNS)


def row_values(task: TaskRecord) -> tuple[Any, ...]:
    """The record's values in TASK_COLUMNS order, for an INSERT or an UPDATE."""
    data = task.to_dict()
    return tuple(data[column] for column in TASK_COLUMNS)


# -- SQLite ---------------------------------------------------------------------


def _task_from_row(row: sqlite3.Row) -> TaskRecord:
    return TaskRecord.from_dict({column: row[column] for column in TASK_COLUMNS})


def _create(conn: sqlite3.Connection, task: TaskRecord) -> None:
    placeholders = ", ".join("?" for _ in TASK_COLUMNS)
    try:
        conn.execute(
            f"INSERT INTO tasks ({TASK_COLUMN_LIST}) VALUES ({placeholders})", row_values(task)
        )
    except sqlite3.IntegrityError as exc:
        raise task_exists(task.id) from exc


def _get(conn: sqlite3.Connection, tenant: str, task_id: str) -> TaskRecord:
    row = conn.execute(
        f"SELECT {TASK_COLUMN_LIST} FROM tasks WHERE id = ? AND tenant = ?", (task_id, tenant)
    ).fetchone()
    if row is None:
        raise task_not_found(task_id)
    return _task_from_row(row)


def _list(
    conn: sqlite3.Connection, tenant: str, status: str, limit: int
) -> builtins.list[TaskRecord]:
    sql = f"SELECT {TASK_COLUMN_LIST} FROM tasks WHERE tenant = ?"
    args: builtins.list[Any] = [tenant]
    if status:
        sql += " AND status = ?"
        args.append(status)
    sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
    args.append(limit)
    return [_task_from_row(row) for row in conn.execute(sql, args)]


def _update(conn: sqlite3.Connection, task: TaskRecord) -> None:
    assignments = ", ".join(f"{column} = ?" for column in TASK_COLUMNS[1:])
    values = row_values(task)
    cursor = conn.execute(f"UPDATE tasks SET {assignments} WHERE id = ?", (*values[1:], task.id))
    if cursor.rowcount == 0:
        raise task_not_found(task.id)


def _update_if(conn: sqlite3.Connection, task: TaskRecord, if_status: str, if_owner: str) -> bool:
    assignments = ", ".join(f"{column} = ?" for column in TASK_COLUMNS[1:])
    values = row_values(task)
    cursor = conn.execute(
        f"UPDATE tasks SET {assignments} WHERE id = ? AND status = ? AND owner = ?",
        (*values[1:], task.id, if_status, if_owner),
    )
    return cursor.rowcount == 1


def _heartbeat(conn: sqlite3.Connection, replica: str, ttl_s: float) -> None:
    # Replicas sharing a file share a machine, hence a clock.
    now = time.time()
    if ttl_s > 0:
        conn.execute(
            "INSERT INTO executor_replicas (replica, expires_at) VALUES (?, ?) "
            "ON CONFLICT (replica) DO UPDATE SET expires_at = excluded.expires_at",
            (replica, now + ttl_s),
        )
    else:
        conn.execute("DELETE FROM executor_replicas WHERE replica = ?", (replica,))
    conn.execute("DELETE FROM executor_replicas WHERE expires_at <= ?", (now,))


def _live_replicas(conn: sqlite3.Connection) -> builtins.set[str]:
    rows = conn.execute(
        "SELECT replica FROM executor_replicas WHERE expires_at > ?", (time.time(),)
    )
    return {str(row["replica"]) for row in rows}


def _by_status(conn: sqlite3.Connection, status: str) -> builtins.list[TaskRecord]:
    rows = conn.execute(
        f"SELECT {TASK_COLUMN_LIST} FROM tasks WHERE status = ? ORDER BY created_at, id",
        (status,),
    )
    return [_task_from_row(row) for row in rows]


def _append_log(conn: sqlite3.Connection, task_id: str, line: str) -> int:
    with transaction(conn, "BEGIN IMMEDIATE"):
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


def _read_log(conn: sqlite3.Connection, task_id: str, after: int) -> builtins.list[tuple[int, str]]:
    rows = conn.execute(
        "SELECT seq, line FROM task_logs WHERE task_id = ? AND seq > ? ORDER BY seq",
        (task_id, after),
    )
    return [(int(row["seq"]), str(row["line"])) for row in rows]


_ENDED = "status IN ('succeeded', 'failed', 'cancelled')"


def _remove(conn: sqlite3.Connection, rows: builtins.list[sqlite3.Row]) -> TasksRemoved:
    """Delete these tasks and their logs; inside the caller's transaction."""
    removed = TasksRemoved()
    for row in rows:
        task = _task_from_row(row)
        cursor = conn.execute("DELETE FROM task_logs WHERE task_id = ?", (task.id,))
        removed.log_lines += cursor.rowcount
        conn.execute("DELETE FROM tasks WHERE id = ?", (task.id,))
        removed.tasks.append(task)
    return removed


def _delete_ended(conn: sqlite3.Connection, tenant: str, task_id: str) -> TasksRemoved:
    with transaction(conn, "BEGIN IMMEDIATE"):
        rows = conn.execute(
            f"SELECT {TASK_COLUMN_LIST} FROM tasks WHERE id = ? AND tenant = ? AND {_ENDED}",
            (task_id, tenant),
        ).fetchall()
        return _remove(conn, rows)


def _delete_tenant_ended(conn: sqlite3.Connection, tenant: str) -> TasksRemoved:
    with transaction(conn, "BEGIN IMMEDIATE"):
        rows = conn.execute(
            f"SELECT {TASK_COLUMN_LIST} FROM tasks WHERE tenant = ? AND {_ENDED}", (tenant,)
        ).fetchall()
        return _remove(conn, rows)


def _delete_ended_before(conn: sqlite3.Connection, cutoff: float, limit: int) -> TasksRemoved:
    with transaction(conn, "BEGIN IMMEDIATE"):
        rows = conn.execute(
            f"SELECT {TASK_COLUMN_LIST} FROM tasks WHERE finished_at < ? AND {_ENDED} "
            "ORDER BY finished_at, id LIMIT ?",
            (cutoff, limit),
        ).fetchall()
        return _remove(conn, rows)


def _workspaces_in_use(conn: sqlite3.Connection, paths: builtins.list[str]) -> builtins.set[str]:
    found: builtins.set[str] = set()
    # In chunks: SQLite bounds the number of parameters of one statement.
    for start in range(0, len(paths), 500):
        chunk = paths[start : start + 500]
        marks = ", ".join("?" for _ in chunk)
        sql = f"SELECT DISTINCT workspace FROM tasks WHERE workspace IN ({marks})"
        rows = conn.execute(sql, chunk)
        found.update(str(row["workspace"]) for row in rows)
    return found


class SqliteTaskStore:
    """TaskStore on a SQLite file. `await open()` before use, `await close()` after.

    Same discipline as the session store (threadline.sqlite): one worker thread
    owns the connection, WAL, synchronous=FULL (an acknowledged transition
    survives a crash).
    """

    def __init__(self, path: Path, *, busy_timeout_ms: int = 5_000) -> None:
        self.path = path
        self._db = SqliteDatabase(path, "task store", MIGRATIONS, busy_timeout_ms=busy_timeout_ms)

    async def open(self) -> None:
        await self._db.open()

    async def close(self) -> None:
        await self._db.close()

    async def create(self, task: TaskRecord) -> None:
        await self._db.run(_create, task)

    async def get(self, tenant: str, task_id: str) -> TaskRecord:
        return await self._db.run(_get, tenant, task_id)

    async def list(
        self, tenant: str, *, status: str = "", limit: int = LIST_LIMIT_DEFAULT
    ) -> builtins.list[TaskRecord]:
        check_listing(status, limit)
        return await self._db.run(_list, tenant, status, limit)

    async def update(self, task: TaskRecord) -> None:
        await self._db.run(_update, task)

    async def update_if(self, task: TaskRecord, *, if_status: TaskStatus, if_owner: str) -> bool:
        return await self._db.run(_update_if, task, if_status, if_owner)

    async def heartbeat(self, replica: str, ttl_s: float) -> None:
        await self._db.run(_heartbeat, replica, ttl_s)

    async def live_replicas(self) -> builtins.set[str]:
        return await self._db.run(_live_replicas)

    async def by_status(self, status: TaskStatus) -> builtins.list[TaskRecord]:
        check_listing(status, 1)
        return await self._db.run(_by_status, status)

    async def append_log(self, task_id: str, entry: dict[str, Any]) -> int:
        return await self._db.run(_append_log, task_id, log_line(entry))

    async def read_log(self, task_id: str, after: int = -1) -> builtins.list[tuple[int, str]]:
        return await self._db.run(_read_log, task_id, after)

    async def delete_ended(self, tenant: str, task_id: str) -> TasksRemoved:
        return await self._db.erase(_delete_ended, tenant, task_id)

    async def delete_tenant_ended(self, tenant: str) -> TasksRemoved:
        return await self._db.erase(_delete_tenant_ended, tenant)

    async def delete_ended_before(self, cutoff: float, limit: int) -> TasksRemoved:
        return await self._db.erase(_delete_ended_before, cutoff, limit)

    async def workspaces_in_use(self, paths: Collection[str]) -> builtins.set[str]:
        return await self._db.run(_workspaces_in_use, list(paths))


# -- Redis ----------------------------------------------------------------------


# KEYS: the record, the index of its stored status, the index of its new status.
# ARGV: the new record as JSON, the status and owner it must have, its id, created_at.
# Compares the decoded record but stores the caller's JSON as it is: cjson would
# re-encode floats with 14 significant digits.
_UPDATE_IF = """
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local stored = cjson.decode(raw)
local owner = stored['owner']
if type(owner) ~= 'string' then owner = '' end
if stored['status'] ~= ARGV[2] or owner ~= ARGV[3] then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[4])
return 1
"""
# Heartbeats are scored by their expiry on the server's clock (replicas' clocks may
# disagree). KEYS: the replicas index. ARGV: the replica, its ttl in ms (0: gone).
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if tonumber(ARGV[2]) > 0 then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
else
  redis.call('ZREM', KEYS[1], ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return 1
"""
# KEYS: the record, its log, the tenant's index, then the index of every status.
# ARGV: the tenant it must belong to, its id. Returns the record as stored and its
# log's length, or nil when it is unknown, another tenant's or has not ended.
_DELETE_ENDED = """
local raw = redis.call('GET', KEYS[1])
if not raw then return nil end
local stored = cjson.decode(raw)
if stored['tenant'] ~= ARGV[1] then return nil end
local status = stored['status']
if status ~= 'succeeded' and status ~= 'failed' and status ~= 'cancelled' then return nil end
local lines = redis.call('LLEN', KEYS[2])
redis.call('DEL', KEYS[1], KEYS[2])
for i = 3, #KEYS do redis.call('ZREM', KEYS[i], ARGV[2]) end
return {raw, lines}
"""
_LIVE_REPLICAS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
"""


def _text(value: object) -> str:
    # The client may or may not decode responses; both must work.
    return value.decode() if isinstance(value, bytes) else str(value)


#: Candidates one read of a status index brings, when expiring tasks on Redis.
_EXPIRY_PAGE = 500


class RedisTaskStore:
    """TaskStore on Redis, for executor replicas that share their tasks.

    Keys under `prefix`: `rec:<id>` the record as JSON, `log:<id>` a list of log
    lines (a line's seq is its index), `tenant:<tenant>` and `status:<status>`
    sorted sets of ids scored by created_at, `replicas` the executor replicas
    scored by when their heartbeat expires (ms, the server's clock).
    """

    def __init__(self, client: aioredis.Redis, prefix: str = "threadline:task:") -> None:
        self._redis = client
        self._prefix = prefix
        self._update_if_script = client.register_script(_UPDATE_IF)
        self._heartbeat_script = client.register_script(_HEARTBEAT)
        self._live_replicas_script = client.register_script(_LIVE_REPLICAS)
        self._delete_ended_script = client.register_script(_DELETE_ENDED)

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
                raise task_exists(task.id)
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
        self, tenant: str, *, status: str = "", limit: int = LIST_LIMIT_DEFAULT
    ) -> builtins.list[TaskRecord]:
        check_listing(status, limit)
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

    async def update_if(self, task: TaskRecord, *, if_status: TaskStatus, if_owner: str) -> bool:
        keys = [self._rec(task.id), self._status(if_status), self._status(task.status)]
        args = [json.dumps(task.to_dict()), if_status, if_owner, task.id, repr(task.created_at)]
        try:
            return bool(await self._update_if_script(keys=keys, args=args))
        except RedisError as exc:
            raise Unavailable(f"task store: {exc}") from exc

    async def heartbeat(self, replica: str, ttl_s: float) -> None:
        ttl_ms = max(0, round(ttl_s * 1000))
        try:
            await self._heartbeat_script(keys=[f"{self._prefix}replicas"], args=[replica, ttl_ms])
        except RedisError as exc:
            raise Unavailable(f"task store: {exc}") from exc

    async def live_replicas(self) -> builtins.set[str]:
        try:
            replicas = await self._live_replicas_script(keys=[f"{self._prefix}replicas"])
        except RedisError as exc:
            raise Unavailable(f"task store: {exc}") from exc
        return {_text(replica) for replica in replicas}

    async def by_status(self, status: TaskStatus) -> builtins.list[TaskRecord]:
        check_listing(status, 1)
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

    async def delete_ended(self, tenant: str, task_id: str) -> TasksRemoved:
        keys = [self._rec(task_id), self._log(task_id), self._tenant(tenant)]
        keys += [self._status(status) for status in sorted(TASK_STATUSES)]
        try:
            reply = await self._delete_ended_script(keys=keys, args=[tenant, task_id])
        except RedisError as exc:
            raise Unavailable(f"task store: {exc}") from exc
        if reply is None:
            return TasksRemoved()
        raw, lines = reply
        return TasksRemoved([TaskRecord.from_dict(json.loads(raw))], int(lines))

    async def delete_tenant_ended(self, tenant: str) -> TasksRemoved:
        try:
            ids = await self._redis.zrange(self._tenant(tenant), 0, -1)
        except RedisError as exc:
            raise Unavailable(f"task store: {exc}") from exc
        removed = TasksRemoved()
        for task_id in ids:
            removed += await self.delete_ended(tenant, _text(task_id))
        return removed

    async def delete_ended_before(self, cutoff: float, limit: int) -> TasksRemoved:
        # A task ends after it was created, so the status indexes (scored by created_at)
        # bound the candidates; each record says when it really ended. Read a page at
        # a time, so a call costs what it removes, not the size of the store.
        removed = TasksRemoved()
        for status in sorted(TERMINAL):
            offset = 0
            while len(removed.tasks) < limit:
                try:
                    ids = await self._redis.zrangebyscore(
                        self._status(status), "-inf", cutoff, start=offset, num=_EXPIRY_PAGE
                    )
                except RedisError as exc:
                    raise Unavailable(f"task store: {exc}") from exc
                if not ids:
                    break
                page = await self._load_many([_text(i) for i in ids])
                expired = sorted(
                    (t for t in page if t.terminal and (t.finished_at or cutoff) < cutoff),
                    key=lambda t: (t.finished_at or 0.0, t.id),
                )
                taken = 0
                for task in expired[: limit - len(removed.tasks)]:
                    step = await self.delete_ended(task.tenant, task.id)
                    removed += step
                    taken += len(step.tasks)
                # What stayed of this page is still before the next one.
                offset += len(ids) - taken
        return removed

    async def workspaces_in_use(self, paths: Collection[str]) -> builtins.set[str]:
        # No workspace index on Redis: every stored record is read. Retention keeps
        # their number bounded; the sweep that asks runs once a minute.
        wanted = set(paths)
        if not wanted:
            return set()
        found: builtins.set[str] = set()
        for status in sorted(TASK_STATUSES):
            try:
                ids = await self._redis.zrange(self._status(status), 0, -1)
            except RedisError as exc:
                raise Unavailable(f"task store: {exc}") from exc
            for start in range(0, len(ids), 500):
                batch = [_text(i) for i in ids[start : start + 500]]
                found.update(t.workspace for t in await self._load_many(batch))
        return found & wanted

    async def close(self) -> None:
        # The client belongs to whoever made it.
        return None
