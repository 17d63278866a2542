"""The embedded session store: one SQLite file, WAL, durable appends.

sqlite3 blocks, so every statement runs on one dedicated worker thread: the event
loop never waits on the disk, and writes serialise in the order they were
submitted without any lock contention inside the process. `synchronous=FULL`
makes an acknowledged append survive kill -9 and power loss, which is what the
executor relies on when it stores a partial answer.
"""

from __future__ import annotations

import builtins
import json
import sqlite3
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, ParamSpec, Self, TypeVar

from services.session.chain import GENESIS_HASH, batch_fingerprint, seal_messages
from services.session.store import (
    REQUEST_ID_MEMORY,
    check_calibration,
    check_listing_limit,
    check_new_session,
    check_request_id,
    copy_messages,
    decode_page_token,
    encode_page_token,
    export_lines,
    hash_not_found,
    now_micros,
    page_size_or_default,
    parse_export,
    reused_request_id,
    session_not_found,
)
from services.session.tokens import DEFAULT_ESTIMATOR, TokenEstimator
from services.session.validation import validate_messages
from threadline.errors import (
    AlreadyExists,
    HeadMismatch,
    InvalidArgument,
    Unavailable,
)
from threadline.ids import new_session_id, validate_session_id
from threadline.logs import get_logger
from threadline.sqlite import SqliteThread, open_database
from threadline.sqlite import transaction as _transaction
from threadline.v1 import common_pb2, session_pb2

_log = get_logger(__name__)

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

#: Every table whose rows belong to one session (all keyed by session_id first).
_SESSION_CHILD_TABLES = ("messages", "tool_calls", "append_requests")

# Distinct session ids the orphan walk visits per call on the worker thread.
_ORPHAN_STEP = 256


def _json(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


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


def _insert_session(conn: sqlite3.Connection, session: session_pb2.Session) -> None:
    conn.execute(
        f"INSERT INTO sessions ({_SESSION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            session.id,
            session.tenant,
            session.title,
            session.model,
            session.system_prompt,
            _json(dict(session.metadata)),
            session.created_at.ToMicroseconds(),
            session.updated_at.ToMicroseconds(),
            session.head,
            session.message_count,
            session.forked_from,
            session.compacted_from,
        ),
    )


def _insert_messages(
    conn: sqlite3.Connection, session_id: str, batch: Sequence[common_pb2.Message]
) -> None:
    """Messages already sealed (seq and hashes set), with their tool call index rows."""
    conn.executemany(
        f"INSERT INTO messages (session_id, {_MESSAGE_COLUMNS}) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [_message_row(session_id, msg) for msg in batch],
    )
    conn.executemany(
        "INSERT INTO tool_calls (session_id, call_id, seq) VALUES (?, ?, ?)",
        [(session_id, call.id, msg.seq) for msg in batch for call in msg.tool_calls],
    )


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
        self._thread = SqliteThread("session store", "session-sqlite")
        # Created, used and closed on the worker thread only.
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        """Open the file, set the pragmas and apply pending migrations."""
        await self._thread.start(self._open_sync)

    async def close(self) -> None:
        await self._thread.stop(self._close_sync)

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
        return await self._thread.run(fn, *args, **kwargs)

    # -- SessionStore ---------------------------------------------------------

    async def create(
        self,
        *,
        tenant: str,
        model: str,
        system_prompt: str,
        title: str,
        metadata: Mapping[str, str],
        forked_from: str = "",
        compacted_from: str = "",
        messages: Sequence[common_pb2.Message] = (),
    ) -> session_pb2.Session:
        check_new_session(tenant, forked_from, compacted_from)
        batch = copy_messages(messages)
        if batch:
            # A new session knows no tool calls but those of its own batch.
            validate_messages(
                batch,
                max_message_chars=self.max_message_chars,
                max_messages=self.max_messages_per_append,
            )
        now = now_micros()
        session = session_pb2.Session(
            id=new_session_id(),
            tenant=tenant,
            title=title,
            model=model,
            system_prompt=system_prompt,
            metadata=metadata,
            forked_from=forked_from,
            compacted_from=compacted_from,
            message_count=len(batch),
            head=seal_messages(
                batch,
                parent_hash=GENESIS_HASH,
                first_seq=0,
                now_micros=now,
                token_count=self._token_count,
            ),
        )
        session.created_at.FromMicroseconds(now)
        session.updated_at.FromMicroseconds(now)
        await self._run(self._insert_session_sync, session, batch)
        return session

    async def get(self, tenant: str, session_id: str) -> session_pb2.Session:
        validate_session_id(session_id)
        return await self._run(self._get_sync, tenant, session_id)

    async def list(
        self, tenant: str, *, page_size: int, page_token: str
    ) -> tuple[builtins.list[session_pb2.Session], str]:
        limit = page_size_or_default(page_size)
        after = decode_page_token(page_token) if page_token else None
        sessions = await self._run(self._list_sync, tenant, limit + 1, after)
        if len(sessions) <= limit:
            return sessions, ""
        sessions = sessions[:limit]
        last = sessions[-1]
        return sessions, encode_page_token(last.updated_at.ToMicroseconds(), last.id)

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
        *,
        request_id: str = "",
    ) -> tuple[str, builtins.list[common_pb2.Message]]:
        validate_session_id(session_id)
        check_request_id(request_id)
        batch = copy_messages(messages)
        fingerprint = batch_fingerprint(batch) if request_id else ""
        return await self._run(
            self._append_sync, tenant, session_id, expected_head, batch, request_id, fingerprint
        )

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

    async def fork(self, tenant: str, session_id: str, at_hash: str) -> session_pb2.Session:
        validate_session_id(session_id)
        return await self._run(self._fork_sync, tenant, session_id, at_hash)

    async def delete(self, tenant: str, session_id: str) -> None:
        validate_session_id(session_id)
        await self._run(self._delete_sync, tenant, session_id)

    async def export(self, tenant: str, session_id: str) -> builtins.list[str]:
        validate_session_id(session_id)
        session, messages = await self._run(self._export_sync, tenant, session_id)
        return export_lines(session, messages)

    async def import_session(self, tenant: str, lines: Sequence[str]) -> session_pb2.Session:
        check_new_session(tenant, "", "")
        session, messages = parse_export(lines, max_message_chars=self.max_message_chars)
        session.tenant = tenant
        await self._run(self._import_sync, session, messages)
        return session

    async def expired(self, idle_before_micros: int, limit: int) -> builtins.list[tuple[str, str]]:
        check_listing_limit("limit", limit)
        return await self._run(self._expired_sync, idle_before_micros, limit)

    async def beyond_cap(self, tenant: str, cap: int) -> builtins.list[str]:
        check_listing_limit("cap", cap)
        return await self._run(self._beyond_cap_sync, tenant, cap)

    async def cleanup_orphans(self) -> int:
        # Walked in short steps, each one call on the worker, so appends queued
        # meanwhile wait for one step, never for the whole walk.
        removed = 0
        for table in _SESSION_CHILD_TABLES:
            after = ""
            while True:
                orphans, after = await self._run(self._orphans_sync, table, after)
                for session_id in orphans:
                    removed += await self._run(self._remove_orphan_sync, table, session_id)
                if not after:
                    break
        if removed:
            _log.info("session.orphans_removed", path=str(self.path), removed=removed)
        return removed

    async def calibration(self, model: str) -> float | None:
        return await self._run(self._calibration_sync, model)

    async def set_calibration(self, model: str, chars_per_token: float) -> None:
        check_calibration(model, chars_per_token)
        await self._run(self._set_calibration_sync, model, chars_per_token)

    def _token_count(self, msg: common_pb2.Message) -> int:
        return min(self._estimator.estimate(msg), _INT32_MAX)

    # -- worker thread ----------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise Unavailable("session store is not open")
        return self._conn

    def _open_sync(self) -> None:
        self._conn = open_database(
            self.path,
            name="session store",
            migrations=MIGRATIONS,
            busy_timeout_ms=self._busy_timeout_ms,
            foreign_keys=True,
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

    def _insert_session_sync(
        self, session: session_pb2.Session, batch: Sequence[common_pb2.Message]
    ) -> None:
        conn = self._connection()
        with _transaction(conn, "BEGIN IMMEDIATE"):
            _insert_session(conn, session)
            _insert_messages(conn, session.id, batch)

    def _session_row(self, conn: sqlite3.Connection, tenant: str, session_id: str) -> sqlite3.Row:
        row: sqlite3.Row | None = conn.execute(
            f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE id = ? AND tenant = ?",
            (session_id, tenant),
        ).fetchone()
        if row is None:
            raise session_not_found(session_id)
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
        request_id: str,
        fingerprint: str,
    ) -> tuple[str, builtins.list[common_pb2.Message]]:
        conn = self._connection()
        # IMMEDIATE takes the write lock up front, so the request id and head read
        # below cannot change before the commit.
        with _transaction(conn, "BEGIN IMMEDIATE"):
            row = self._session_row(conn, tenant, session_id)
            if request_id:
                # Before the head: a retry whose first attempt landed must get that
                # result, although the head has moved (by that very append).
                prior: sqlite3.Row | None = conn.execute(
                    "SELECT fingerprint, first_seq, message_count, head FROM append_requests "
                    "WHERE session_id = ? AND request_id = ?",
                    (session_id, request_id),
                ).fetchone()
                if prior is not None:
                    if prior["fingerprint"] != fingerprint:
                        raise reused_request_id(request_id)
                    rows = conn.execute(
                        f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE session_id = ? "
                        "AND seq >= ? AND seq < ? ORDER BY seq",
                        (
                            session_id,
                            prior["first_seq"],
                            prior["first_seq"] + prior["message_count"],
                        ),
                    ).fetchall()
                    return prior["head"], [_message_from_row(r) for r in rows]
            head: str = row["head"]
            if head != expected_head:
                raise HeadMismatch(session_id, expected_head, head)
            validate_messages(
                batch,
                max_message_chars=self.max_message_chars,
                max_messages=self.max_messages_per_append,
                known_tool_call_ids=self._known_tool_call_ids(conn, session_id, batch),
            )
            now = now_micros()
            first_seq: int = row["message_count"]
            head = seal_messages(
                batch,
                parent_hash=head,
                first_seq=first_seq,
                now_micros=now,
                token_count=self._token_count,
            )
            _insert_messages(conn, session_id, batch)
            conn.execute(
                "UPDATE sessions SET head = ?, message_count = ?, updated_at = ? WHERE id = ?",
                (head, first_seq + len(batch), now, session_id),
            )
            if request_id:
                conn.execute(
                    "INSERT INTO append_requests (session_id, request_id, fingerprint, "
                    "first_seq, message_count, head) VALUES (?, ?, ?, ?, ?, ?)",
                    (session_id, request_id, fingerprint, first_seq, len(batch), head),
                )
                # Keeps exactly the newest REQUEST_ID_MEMORY: first_seq grows with every
                # append, so it orders a session's results by age.
                conn.execute(
                    "DELETE FROM append_requests WHERE session_id = ? AND first_seq < ("
                    "SELECT first_seq FROM append_requests WHERE session_id = ? "
                    "ORDER BY first_seq DESC LIMIT 1 OFFSET ?)",
                    (session_id, session_id, REQUEST_ID_MEMORY - 1),
                )
        return head, batch

    def _fork_sync(self, tenant: str, session_id: str, at_hash: str) -> session_pb2.Session:
        conn = self._connection()
        with _transaction(conn, "BEGIN IMMEDIATE"):
            source = _session_from_row(self._session_row(conn, tenant, session_id))
            count = 0
            if at_hash:
                found: sqlite3.Row | None = conn.execute(
                    "SELECT seq FROM messages WHERE session_id = ? AND hash = ?",
                    (session_id, at_hash),
                ).fetchone()
                if found is None:
                    raise hash_not_found(session_id, at_hash)
                count = found["seq"] + 1
            now = now_micros()
            fork = session_pb2.Session(
                id=new_session_id(),
                tenant=tenant,
                title=source.title,
                model=source.model,
                system_prompt=source.system_prompt,
                metadata=source.metadata,
                head=at_hash,
                message_count=count,
                forked_from=session_id,
            )
            fork.created_at.FromMicroseconds(now)
            fork.updated_at.FromMicroseconds(now)
            _insert_session(conn, fork)
            # Copied inside SQLite: a long prefix never crosses into Python.
            conn.execute(
                f"INSERT INTO messages (session_id, {_MESSAGE_COLUMNS}) "
                f"SELECT ?, {_MESSAGE_COLUMNS} FROM messages WHERE session_id = ? AND seq < ?",
                (fork.id, session_id, count),
            )
            conn.execute(
                "INSERT INTO tool_calls (session_id, call_id, seq) "
                "SELECT ?, call_id, seq FROM tool_calls WHERE session_id = ? AND seq < ?",
                (fork.id, session_id, count),
            )
        return fork

    def _delete_sync(self, tenant: str, session_id: str) -> None:
        conn = self._connection()
        with _transaction(conn, "BEGIN IMMEDIATE"):
            self._session_row(conn, tenant, session_id)
            # Explicit rather than left to ON DELETE CASCADE, which only acts while
            # foreign_keys is on: a file touched by a tool without it stays correct.
            for table in _SESSION_CHILD_TABLES:
                conn.execute(f"DELETE FROM {table} WHERE session_id = ?", (session_id,))
            conn.execute("DELETE FROM sessions WHERE id = ?", (session_id,))

    def _export_sync(
        self, tenant: str, session_id: str
    ) -> tuple[session_pb2.Session, builtins.list[common_pb2.Message]]:
        conn = self._connection()
        # One read transaction: the header's head matches the messages exported.
        with _transaction(conn):
            session = _session_from_row(self._session_row(conn, tenant, session_id))
            rows = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE session_id = ? ORDER BY seq",
                (session_id,),
            ).fetchall()
        return session, [_message_from_row(row) for row in rows]

    def _import_sync(
        self, session: session_pb2.Session, messages: Sequence[common_pb2.Message]
    ) -> None:
        conn = self._connection()
        with _transaction(conn, "BEGIN IMMEDIATE"):
            taken = conn.execute("SELECT 1 FROM sessions WHERE id = ?", (session.id,)).fetchone()
            if taken is not None:
                raise AlreadyExists(
                    f"session {session.id} already exists", details={"session_id": session.id}
                )
            # Orphaned rows of an earlier session with this id would collide.
            for table in _SESSION_CHILD_TABLES:
                conn.execute(f"DELETE FROM {table} WHERE session_id = ?", (session.id,))
            _insert_session(conn, session)
            _insert_messages(conn, session.id, messages)

    def _expired_sync(self, idle_before: int, limit: int) -> builtins.list[tuple[str, str]]:
        rows = (
            self._connection()
            .execute(
                "SELECT tenant, id FROM sessions WHERE updated_at < ? "
                "ORDER BY updated_at, id LIMIT ?",
                (idle_before, limit),
            )
            .fetchall()
        )
        return [(row["tenant"], row["id"]) for row in rows]

    def _beyond_cap_sync(self, tenant: str, cap: int) -> builtins.list[str]:
        rows = (
            self._connection()
            .execute(
                "SELECT id FROM sessions WHERE tenant = ? "
                "ORDER BY updated_at DESC, id DESC LIMIT -1 OFFSET ?",
                (tenant, cap),
            )
            .fetchall()
        )
        return [row["id"] for row in reversed(rows)]

    def _orphans_sync(self, table: str, after: str) -> tuple[builtins.list[str], str]:
        """Up to _ORPHAN_STEP distinct session ids of `table` after `after`, those
        without a session; and where to go on from ("" at the end)."""
        conn = self._connection()
        orphans: builtins.list[str] = []
        for _ in range(_ORPHAN_STEP):
            # One index seek per distinct session: a skip scan, not a table scan.
            row = conn.execute(
                f"SELECT session_id FROM {table} WHERE session_id > ? ORDER BY session_id LIMIT 1",
                (after,),
            ).fetchone()
            if row is None:
                return orphans, ""
            after = row[0]
            if conn.execute("SELECT 1 FROM sessions WHERE id = ?", (after,)).fetchone() is None:
                orphans.append(after)
        return orphans, after

    def _remove_orphan_sync(self, table: str, session_id: str) -> int:
        conn = self._connection()
        with _transaction(conn, "BEGIN IMMEDIATE"):
            # Re-checked under the write lock: an import may have re-created the id.
            cursor = conn.execute(
                f"DELETE FROM {table} WHERE session_id = ? "
                "AND NOT EXISTS (SELECT 1 FROM sessions WHERE id = ?)",
                (session_id, session_id),
            )
        return cursor.rowcount

    def _calibration_sync(self, model: str) -> float | None:
        row = (
            self._connection()
            .execute("SELECT chars_per_token FROM calibration WHERE model = ?", (model,))
            .fetchone()
        )
        return None if row is None else float(row[0])

    def _set_calibration_sync(self, model: str, chars_per_token: float) -> None:
        conn = self._connection()
        with _transaction(conn, "BEGIN IMMEDIATE"):
            conn.execute(
                "INSERT INTO calibration (model, chars_per_token, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (model) DO UPDATE SET chars_per_token = excluded.chars_per_token, "
                "updated_at = excluded.updated_at",
                (model, chars_per_token, now_micros()),
            )
