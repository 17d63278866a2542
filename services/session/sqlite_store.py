"""The embedded session store: one SQLite file, WAL, durable appends.

sqlite3 blocks, so every statement runs on one dedicated worker thread: the event
loop never waits on the disk, and writes serialise in the order they were
submitted without any lock contention inside the process. `synchronous=FULL`
makes an acknowledged append survive kill -9 and power loss, which is what the
executor relies on when it stores a partial answer.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import builtins
import contextlib
import functools
import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, ParamSpec, Self, TypeVar

from services.session.chain import GENESIS_HASH, entry_hash
from services.session.store import page_size_or_default
from services.session.tokens import DEFAULT_ESTIMATOR, TokenEstimator
from services.session.validation import validate_messages
from threadline.errors import (
    FailedPrecondition,
    HeadMismatch,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from threadline.ids import new_message_id, new_session_id, validate_session_id
from threadline.v1 import common_pb2, session_pb2

_log = logging.getLogger(__name__)

_P = ParamSpec("_P")
_T = TypeVar("_T")

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
)

SCHEMA_VERSION = len(MIGRATIONS)

_SESSION_COLUMNS = (
    "id, tenant, title, model, system_prompt, metadata_json, created_at, updated_at, "
    "head, message_count, forked_from, compacted_from"
)
_MESSAGE_COLUMNS = (
    "seq, id, role, content, tool_calls_json, tool_call_id, name, created_at, interrupted, "
    "token_count, parent_hash, hash"
)

# recent() starts small because a context usually needs only the last few
# messages, and grows so a long walk back costs few round trips to the worker.
_RECENT_FIRST_BATCH = 32
_RECENT_MAX_BATCH = 1024

# Below SQLite's default SQLITE_MAX_VARIABLE_NUMBER on every version still in use.
_IN_CHUNK = 500

_INT32_MAX = 2**31 - 1


def _now_micros() -> int:
    return time.time_ns() // 1000


def _json(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _not_found(session_id: str) -> NotFound:
    # One message for "missing" and "another tenant's": no existence leak.
    return NotFound(f"session {session_id} not found", details={"session_id": session_id})


def _encode_page_token(updated_at: int, session_id: str) -> str:
    raw = json.dumps([updated_at, session_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _decode_page_token(token: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError) as exc:
        raise InvalidArgument("malformed page token") from exc
    if (
        isinstance(value, list)
        and len(value) == 2
        and type(value[0]) is int
        and isinstance(value[1], str)
    ):
        return value[0], value[1]
    raise InvalidArgument("malformed page token")


def _session_from_row(row: sqlite3.Row) -> session_pb2.Session:
    session = session_pb2.Session(
        id=row["id"],
        tenant=row["tenant"],
        title=row["title"],
        model=row["model"],
        system_prompt=row["system_prompt"],
        head=row["head"],
        message_count=row["message_count"],
        metadata=json.loads(row["metadata_json"]),
        forked_from=row["forked_from"],
        compacted_from=row["compacted_from"],
    )
    session.created_at.FromMicroseconds(row["created_at"])
    session.updated_at.FromMicroseconds(row["updated_at"])
    return session


def _message_from_row(row: sqlite3.Row) -> common_pb2.Message:
    msg = common_pb2.Message(
        id=row["id"],
        role=row["role"],
        content=row["content"],
        tool_call_id=row["tool_call_id"],
        name=row["name"],
        interrupted=bool(row["interrupted"]),
        token_count=row["token_count"],
        seq=row["seq"],
        parent_hash=row["parent_hash"],
        hash=row["hash"],
    )
    for call in json.loads(row["tool_calls_json"]):
        msg.tool_calls.add(id=call["id"], name=call["name"], arguments_json=call["arguments_json"])
    msg.created_at.FromMicroseconds(row["created_at"])
    return msg


def _message_row(session_id: str, msg: common_pb2.Message) -> tuple[Any, ...]:
    calls = [
        {"id": tc.id, "name": tc.name, "arguments_json": tc.arguments_json} for tc in msg.tool_calls
    ]
    return (
        session_id,
        msg.seq,
        msg.id,
        msg.role,
        msg.content,
        _json(calls),
        msg.tool_call_id,
        msg.name,
        msg.created_at.ToMicroseconds(),
        int(msg.interrupted),
        msg.token_count,
        msg.parent_hash,
        msg.hash,
    )


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection, begin: str = "BEGIN") -> Iterator[sqlite3.Connection]:
    conn.execute(begin)
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


class SqliteSessionStore:
    """SessionStore on a SQLite file. `await open()` before use, `await close()` after.

    Also an async context manager that opens and closes it.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_message_chars: int = 32_000,
        max_messages_per_append: int = 64,
        estimator: TokenEstimator = DEFAULT_ESTIMATOR,
        busy_timeout_ms: int = 5_000,
    ) -> None:
        self.path = path
        self.max_message_chars = max_message_chars
        self.max_messages_per_append = max_messages_per_append
        self._estimator = estimator
        self._busy_timeout_ms = busy_timeout_ms
        self._executor: ThreadPoolExecutor | None = None
        # Created, used and closed on the worker thread only.
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        """Open the file, set the pragmas and apply pending migrations."""
        if self._executor is not None:
            raise RuntimeError(f"session store {self.path} is already open")
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="session-sqlite")
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self._open_sync)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        self._executor = executor

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        try:
            # Queued behind every statement already submitted, so those finish first.
            await asyncio.get_running_loop().run_in_executor(executor, self._close_sync)
        finally:
            executor.shutdown(wait=False)

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _run(self, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        executor = self._executor
        if executor is None:
            raise Unavailable("session store is not open")
        call = functools.partial(fn, *args, **kwargs)
        try:
            # If the caller is cancelled the statement still runs to completion:
            # an append may commit unseen, and a retry then sees the moved head.
            return await asyncio.get_running_loop().run_in_executor(executor, call)
        except sqlite3.OperationalError as exc:
            # Locked, disk full, I/O error: the caller may retry later.
            raise Unavailable(f"session store: {exc}") from exc

    # -- SessionStore ---------------------------------------------------------

    async def create(
        self,
        *,
        tenant: str,
        model: str,
        system_prompt: str,
        title: str,
        metadata: Mapping[str, str],
    ) -> session_pb2.Session:
        if not tenant:
            raise InvalidArgument("tenant is required")
        return await self._run(
            self._create_sync, tenant, model, system_prompt, title, dict(metadata)
        )

    async def get(self, tenant: str, session_id: str) -> session_pb2.Session:
        validate_session_id(session_id)
        return await self._run(self._get_sync, tenant, session_id)

    async def list(
        self, tenant: str, *, page_size: int, page_token: str
    ) -> tuple[builtins.list[session_pb2.Session], str]:
        limit = page_size_or_default(page_size)
        after = _decode_page_token(page_token) if page_token else None
        sessions = await self._run(self._list_sync, tenant, limit + 1, after)
        if len(sessions) <= limit:
            return sessions, ""
        sessions = sessions[:limit]
        last = sessions[-1]
        return sessions, _encode_page_token(last.updated_at.ToMicroseconds(), last.id)

    async def messages(
        self, tenant: str, session_id: str, *, from_seq: int = 0
    ) -> builtins.list[common_pb2.Message]:
        validate_session_id(session_id)
        if from_seq < 0:
            raise InvalidArgument(f"from_seq must be >= 0, got {from_seq}")
        return await self._run(self._messages_sync, tenant, session_id, from_seq)

    async def append(
        self,
        tenant: str,
        session_id: str,
        expected_head: str,
        messages: Sequence[common_pb2.Message],
    ) -> tuple[str, builtins.list[common_pb2.Message]]:
        validate_session_id(session_id)
        # Copies: the store fills in ids, seq and hashes without touching the caller's.
        batch: builtins.list[common_pb2.Message] = []
        for msg in messages:
            copy = common_pb2.Message()
            copy.CopyFrom(msg)
            batch.append(copy)
        return await self._run(self._append_sync, tenant, session_id, expected_head, batch)

    async def recent(
        self, tenant: str, session_id: str, *, before_seq: int | None = None
    ) -> AsyncIterator[common_pb2.Message]:
        validate_session_id(session_id)
        count = (await self._run(self._get_sync, tenant, session_id)).message_count
        upper = count if before_seq is None else max(0, min(before_seq, count))
        batch = _RECENT_FIRST_BATCH
        while upper > 0:
            page = await self._run(self._page_before_sync, session_id, upper, batch)
            if not page:
                return
            for msg in page:
                yield msg
            upper = page[-1].seq
            batch = min(batch * 2, _RECENT_MAX_BATCH)

    async def first_user_message(self, tenant: str, session_id: str) -> common_pb2.Message | None:
        validate_session_id(session_id)
        return await self._run(self._first_user_message_sync, tenant, session_id)

    # -- worker thread ----------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise Unavailable("session store is not open")
        return self._conn

    def _open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: no implicit transactions; every one is explicit.
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            conn.row_factory = sqlite3.Row
            # First, so that the pragmas and the migration wait for other processes.
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise FailedPrecondition(
                    f"session store {self.path}: WAL journal mode unavailable (got {mode})"
                )
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        # One transaction for all pending steps: a failed migration leaves the
        # file exactly as it was, never half-migrated.
        with _transaction(conn, "BEGIN IMMEDIATE"):
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise FailedPrecondition(
                    f"session store {self.path} has schema version {version}; this build "
                    f"supports up to {SCHEMA_VERSION}"
                )
            for step in MIGRATIONS[version:]:
                for statement in step:
                    conn.execute(statement)
            if version < SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                _log.info(
                    "session store %s migrated from schema version %d to %d",
                    self.path,
                    version,
                    SCHEMA_VERSION,
                )

    def _close_sync(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            # Keeps the query planner's statistics current, cheaply, as SQLite advises.
            conn.execute("PRAGMA optimize")
        finally:
            conn.close()

    def _create_sync(
        self, tenant: str, model: str, system_prompt: str, title: str, metadata: dict[str, str]
    ) -> session_pb2.Session:
        conn = self._connection()
        session_id = new_session_id()
        now = _now_micros()
        with _transaction(conn, "BEGIN IMMEDIATE"):
            conn.execute(
                f"INSERT INTO sessions ({_SESSION_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, '', '')",
                (
                    session_id,
                    tenant,
                    title,
                    model,
                    system_prompt,
                    _json(metadata),
                    now,
                    now,
                    GENESIS_HASH,
                    0,
                ),
            )
        session = session_pb2.Session(
            id=session_id,
            tenant=tenant,
            title=title,
            model=model,
            system_prompt=system_prompt,
            head=GENESIS_HASH,
            message_count=0,
            metadata=metadata,
        )
        session.created_at.FromMicroseconds(now)
        session.updated_at.FromMicroseconds(now)
        return session

    def _session_row(self, conn: sqlite3.Connection, tenant: str, session_id: str) -> sqlite3.Row:
        row: sqlite3.Row | None = conn.execute(
            f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE id = ? AND tenant = ?",
            (session_id, tenant),
        ).fetchone()
        if row is None:
            raise _not_found(session_id)
        return row

    def _get_sync(self, tenant: str, session_id: str) -> session_pb2.Session:
        conn = self._connection()
        return _session_from_row(self._session_row(conn, tenant, session_id))

    def _list_sync(
        self, tenant: str, limit: int, after: tuple[int, str] | None
    ) -> builtins.list[session_pb2.Session]:
        conn = self._connection()
        if after is None:
            rows = conn.execute(
                f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE tenant = ? "
                "ORDER BY updated_at DESC, id DESC LIMIT ?",
                (tenant, limit),
            ).fetchall()
        else:
            updated_at, last_id = after
            rows = conn.execute(
                f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE tenant = ? "
                "AND (updated_at < ? OR (updated_at = ? AND id < ?)) "
                "ORDER BY updated_at DESC, id DESC LIMIT ?",
                (tenant, updated_at, updated_at, last_id, limit),
            ).fetchall()
        return [_session_from_row(row) for row in rows]

    def _messages_sync(
        self, tenant: str, session_id: str, from_seq: int
    ) -> builtins.list[common_pb2.Message]:
        conn = self._connection()
        with _transaction(conn):
            self._session_row(conn, tenant, session_id)
            rows = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE session_id = ? AND seq >= ? "
                "ORDER BY seq",
                (session_id, from_seq),
            ).fetchall()
        return [_message_from_row(row) for row in rows]

    def _page_before_sync(
        self, session_id: str, before_seq: int, limit: int
    ) -> builtins.list[common_pb2.Message]:
        rows = (
            self._connection()
            .execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE session_id = ? AND seq < ? "
                "ORDER BY seq DESC LIMIT ?",
                (session_id, before_seq, limit),
            )
            .fetchall()
        )
        return [_message_from_row(row) for row in rows]

    def _first_user_message_sync(self, tenant: str, session_id: str) -> common_pb2.Message | None:
        conn = self._connection()
        with _transaction(conn):
            self._session_row(conn, tenant, session_id)
            row: sqlite3.Row | None = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE session_id = ? AND role = ? "
                "ORDER BY seq LIMIT 1",
                (session_id, common_pb2.ROLE_USER),
            ).fetchone()
        return None if row is None else _message_from_row(row)

    def _known_tool_call_ids(
        self, conn: sqlite3.Connection, session_id: str, batch: Sequence[common_pb2.Message]
    ) -> set[str]:
        # Only the ids this batch mentions matter: results it answers, calls it makes.
        wanted = sorted(
            {msg.tool_call_id for msg in batch if msg.tool_call_id}
            | {call.id for msg in batch for call in msg.tool_calls if call.id}
        )
        known: set[str] = set()
        for start in range(0, len(wanted), _IN_CHUNK):
            chunk = wanted[start : start + _IN_CHUNK]
            marks = ", ".join("?" * len(chunk))
            rows = conn.execute(
                f"SELECT call_id FROM tool_calls WHERE session_id = ? AND call_id IN ({marks})",
                (session_id, *chunk),
            ).fetchall()
            known.update(row[0] for row in rows)
        return known

    def _append_sync(
        self,
        tenant: str,
        session_id: str,
        expected_head: str,
        batch: builtins.list[common_pb2.Message],
    ) -> tuple[str, builtins.list[common_pb2.Message]]:
        conn = self._connection()
        # IMMEDIATE takes the write lock up front, so the head read below cannot
        # change before the commit.
        with _transaction(conn, "BEGIN IMMEDIATE"):
            row = self._session_row(conn, tenant, session_id)
            head: str = row["head"]
            if head != expected_head:
                raise HeadMismatch(session_id, expected_head, head)
            validate_messages(
                batch,
                max_message_chars=self.max_message_chars,
                max_messages=self.max_messages_per_append,
                known_tool_call_ids=self._known_tool_call_ids(conn, session_id, batch),
            )
            now = _now_micros()
            seq: int = row["message_count"]
            for msg in batch:
                if not msg.id:
                    msg.id = new_message_id()
                # Stored and hashed at microsecond precision; truncate now so the
                # returned message hashes the same as the one read back later.
                created = msg.created_at.ToMicroseconds() if msg.HasField("created_at") else now
                msg.created_at.FromMicroseconds(created)
                msg.seq = seq
                msg.parent_hash = head
                msg.token_count = min(self._estimator.estimate(msg), _INT32_MAX)
                msg.hash = entry_hash(head, msg)
                head = msg.hash
                seq += 1
            conn.executemany(
                f"INSERT INTO messages (session_id, {_MESSAGE_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [_message_row(session_id, msg) for msg in batch],
            )
            conn.executemany(
                "INSERT INTO tool_calls (session_id, call_id, seq) VALUES (?, ?, ?)",
                [(session_id, call.id, msg.seq) for msg in batch for call in msg.tool_calls],
            )
            conn.execute(
                "UPDATE sessions SET head = ?, message_count = ?, updated_at = ? WHERE id = ?",
                (head, seq, now, session_id),
            )
        return head, batch
