"""The embedded session store: one SQLite file, WAL, durable appends.

sqlite3 blocks, so every statement runs on the store's one worker thread
(threadline.sqlite.SqliteDatabase): the event loop never waits on the disk, and
writes serialise in the order they were submitted without any lock contention
inside the process. `synchronous=FULL` makes an acknowledged append survive
kill -9 and power loss, which is what the executor relies on when it stores a
partial answer.

The statements are plain functions of the connection; `SqliteSessionStore` is
the async facade that runs them there. The schema is in sqlite_schema.py.
"""

from __future__ import annotations

import builtins
import json
import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Self

from google.protobuf.timestamp_pb2 import Timestamp

from services.session.sqlite_schema import MIGRATIONS
from services.session.store import (
    ERASURE_OWNERS,
    RECENT_FIRST_BATCH,
    RECENT_MAX_BATCH,
    REQUEST_ID_MEMORY,
    AppendRequest,
    Erasure,
    ErasureDone,
    MessageRules,
    SessionBackend,
    TenantErasureTotals,
    check_erasure_reason,
    check_from_seq,
    hash_not_found,
    named_tool_call_ids,
    new_fork,
    no_pending_erasure,
    now_micros,
    reused_request_id,
    session_not_found,
    sum_erasures,
)
from services.session.tokens import DEFAULT_ESTIMATOR, TokenEstimator
from threadline.errors import AlreadyExists, HeadMismatch
from threadline.ids import validate_session_id
from threadline.logs import get_logger
from threadline.sqlite import SqliteDatabase, transaction
from threadline.v1 import common_pb2, session_pb2

_log = get_logger(__name__)

_SESSION_COLUMNS = (
    "id, tenant, title, model, system_prompt, metadata_json, created_at, updated_at, "
    "head, message_count, forked_from, compacted_from"
)
_MESSAGE_COLUMNS = (
    "seq, id, role, content, tool_calls_json, tool_call_id, name, created_at, interrupted, "
    "token_count, parent_hash, hash"
)

# Below SQLite's default SQLITE_MAX_VARIABLE_NUMBER on every version still in use.
_IN_CHUNK = 500

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
    # Run for every message of every context built: the timestamp goes in with the
    # rest, and the common empty list of tool calls is not parsed.
    created_us = row["created_at"]
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
        created_at=Timestamp(seconds=created_us // 1_000_000, nanos=created_us % 1_000_000 * 1_000),
    )
    calls_json = row["tool_calls_json"]
    if calls_json != "[]":
        for call in json.loads(calls_json):
            msg.tool_calls.add(
                id=call["id"], name=call["name"], arguments_json=call["arguments_json"]
            )
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


# -- statements, each run on the worker thread ------------------------------------------


def _insert_new(
    conn: sqlite3.Connection, session: session_pb2.Session, batch: Sequence[common_pb2.Message]
) -> None:
    with transaction(conn, "BEGIN IMMEDIATE"):
        _insert_session(conn, session)
        _insert_messages(conn, session.id, batch)


def _session_row(conn: sqlite3.Connection, tenant: str, session_id: str) -> sqlite3.Row:
    row: sqlite3.Row | None = conn.execute(
        f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE id = ? AND tenant = ?",
        (session_id, tenant),
    ).fetchone()
    if row is None:
        raise session_not_found(session_id)
    return row


def _get(conn: sqlite3.Connection, tenant: str, session_id: str) -> session_pb2.Session:
    return _session_from_row(_session_row(conn, tenant, session_id))


def _list(
    conn: sqlite3.Connection, tenant: str, limit: int, after: tuple[int, str] | None
) -> builtins.list[session_pb2.Session]:
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


def _messages(
    conn: sqlite3.Connection, tenant: str, session_id: str, from_seq: int
) -> builtins.list[common_pb2.Message]:
    with transaction(conn):
        _session_row(conn, tenant, session_id)
        rows = conn.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE session_id = ? AND seq >= ? "
            "ORDER BY seq",
            (session_id, from_seq),
        ).fetchall()
    return [_message_from_row(row) for row in rows]


def _page_before(
    conn: sqlite3.Connection, session_id: str, before_seq: int, limit: int
) -> builtins.list[common_pb2.Message]:
    rows = conn.execute(
        f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE session_id = ? AND seq < ? "
        "ORDER BY seq DESC LIMIT ?",
        (session_id, before_seq, limit),
    ).fetchall()
    return [_message_from_row(row) for row in rows]


def _first_user_message(
    conn: sqlite3.Connection, tenant: str, session_id: str
) -> common_pb2.Message | None:
    with transaction(conn):
        _session_row(conn, tenant, session_id)
        row: sqlite3.Row | None = conn.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE session_id = ? AND role = ? "
            "ORDER BY seq LIMIT 1",
            (session_id, common_pb2.ROLE_USER),
        ).fetchone()
    return None if row is None else _message_from_row(row)


def _known_tool_call_ids(
    conn: sqlite3.Connection, session_id: str, batch: Sequence[common_pb2.Message]
) -> set[str]:
    wanted = named_tool_call_ids(batch)
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


def _append(
    conn: sqlite3.Connection, rules: MessageRules, request: AppendRequest
) -> tuple[str, builtins.list[common_pb2.Message]]:
    session_id, batch = request.session_id, request.batch
    # IMMEDIATE takes the write lock up front, so the request id and head read
    # below cannot change before the commit.
    with transaction(conn, "BEGIN IMMEDIATE"):
        row = _session_row(conn, request.tenant, session_id)
        # Before the head: a retry whose first attempt landed must get that
        # result, although the head has moved (by that very append).
        prior = _prior_result(conn, request)
        if prior is not None:
            return prior
        head: str = row["head"]
        if head != request.expected_head:
            raise HeadMismatch(session_id, request.expected_head, head)
        first_seq: int = row["message_count"]
        head, now = rules.seal_append(
            batch,
            head=head,
            first_seq=first_seq,
            known_tool_call_ids=_known_tool_call_ids(conn, session_id, batch),
        )
        _insert_messages(conn, session_id, batch)
        conn.execute(
            "UPDATE sessions SET head = ?, message_count = ?, updated_at = ? WHERE id = ?",
            (head, first_seq + len(batch), now, session_id),
        )
        if request.request_id:
            _remember_request(conn, request, first_seq, head)
    return head, batch


def _prior_result(
    conn: sqlite3.Connection, request: AppendRequest
) -> tuple[str, builtins.list[common_pb2.Message]] | None:
    """The result of an earlier append with this request id, if one is remembered."""
    if not request.request_id:
        return None
    prior: sqlite3.Row | None = conn.execute(
        "SELECT fingerprint, first_seq, message_count, head FROM append_requests "
        "WHERE session_id = ? AND request_id = ?",
        (request.session_id, request.request_id),
    ).fetchone()
    if prior is None:
        return None
    if prior["fingerprint"] != request.fingerprint:
        raise reused_request_id(request.request_id)
    rows = conn.execute(
        f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE session_id = ? "
        "AND seq >= ? AND seq < ? ORDER BY seq",
        (
            request.session_id,
            prior["first_seq"],
            prior["first_seq"] + prior["message_count"],
        ),
    ).fetchall()
    return prior["head"], [_message_from_row(r) for r in rows]


def _remember_request(
    conn: sqlite3.Connection, request: AppendRequest, first_seq: int, head: str
) -> None:
    session_id = request.session_id
    conn.execute(
        "INSERT INTO append_requests (session_id, request_id, fingerprint, "
        "first_seq, message_count, head) VALUES (?, ?, ?, ?, ?, ?)",
        (session_id, request.request_id, request.fingerprint, first_seq, len(request.batch), head),
    )
    # Keeps exactly the newest REQUEST_ID_MEMORY: first_seq grows with every
    # append, so it orders a session's results by age.
    conn.execute(
        "DELETE FROM append_requests WHERE session_id = ? AND first_seq < ("
        "SELECT first_seq FROM append_requests WHERE session_id = ? "
        "ORDER BY first_seq DESC LIMIT 1 OFFSET ?)",
        (session_id, session_id, REQUEST_ID_MEMORY - 1),
    )


def _fork(
    conn: sqlite3.Connection, tenant: str, session_id: str, at_hash: str
) -> session_pb2.Session:
    with transaction(conn, "BEGIN IMMEDIATE"):
        source = _session_from_row(_session_row(conn, tenant, session_id))
        count = 0
        if at_hash:
            found: sqlite3.Row | None = conn.execute(
                "SELECT seq FROM messages WHERE session_id = ? AND hash = ?",
                (session_id, at_hash),
            ).fetchone()
            if found is None:
                raise hash_not_found(session_id, at_hash)
            count = found["seq"] + 1
        fork = new_fork(source, at_hash, count)
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


def _delete(
    conn: sqlite3.Connection, tenant: str, session_id: str, reason: str, owners: Sequence[str]
) -> None:
    with transaction(conn, "BEGIN IMMEDIATE"):
        _session_row(conn, tenant, session_id)
        # Explicit rather than left to ON DELETE CASCADE, which only acts while
        # foreign_keys is on: a file touched by a tool without it stays correct.
        for table in _SESSION_CHILD_TABLES:
            conn.execute(f"DELETE FROM {table} WHERE session_id = ?", (session_id,))
        conn.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
        now = now_micros()
        conn.execute(
            "INSERT INTO erasures (session_id, tenant, reason, deleted_at) VALUES (?, ?, ?, ?)",
            (session_id, tenant, reason, now),
        )
        conn.executemany(
            "INSERT INTO erasure_owners (session_id, owner, deleted_at) VALUES (?, ?, ?)",
            [(session_id, owner, now) for owner in owners],
        )


def _derived(conn: sqlite3.Connection, tenant: str, session_id: str) -> builtins.list[Any]:
    rows = conn.execute(
        f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE forked_from = ? AND tenant = ? "
        f"UNION SELECT {_SESSION_COLUMNS} FROM sessions WHERE compacted_from = ? AND tenant = ? "
        "ORDER BY created_at, id",
        (session_id, tenant, session_id, tenant),
    ).fetchall()
    return [_session_from_row(row) for row in rows]


def _pending_erasures(conn: sqlite3.Connection, owner: str, limit: int) -> builtins.list[Erasure]:
    rows = conn.execute(
        "SELECT e.session_id, e.tenant, e.reason, e.deleted_at FROM erasure_owners o "
        "JOIN erasures e ON e.session_id = o.session_id WHERE o.owner = ? AND o.done = 0 "
        "ORDER BY o.deleted_at, o.session_id LIMIT ?",
        (owner, limit),
    ).fetchall()
    return [Erasure(*row) for row in rows]


def _acknowledge_erasure(
    conn: sqlite3.Connection, owner: str, session_id: str, removed: dict[str, int]
) -> ErasureDone | None:
    with transaction(conn, "BEGIN IMMEDIATE"):
        row = conn.execute(
            "SELECT done FROM erasure_owners WHERE session_id = ? AND owner = ?",
            (session_id, owner),
        ).fetchone()
        if row is None:
            raise no_pending_erasure(owner, session_id)
        if row["done"]:
            return None  # a repeated acknowledgement: the first one counted
        conn.execute(
            "UPDATE erasure_owners SET done = 1, removed_json = ? "
            "WHERE session_id = ? AND owner = ?",
            (_json(removed), session_id, owner),
        )
        owners = conn.execute(
            "SELECT owner, done, removed_json FROM erasure_owners WHERE session_id = ?",
            (session_id,),
        ).fetchall()
        if not all(o["done"] for o in owners):
            return None
        conn.execute(
            "UPDATE erasures SET completed_at = ? WHERE session_id = ?", (now_micros(), session_id)
        )
        erasure = conn.execute(
            "SELECT session_id, tenant, reason, deleted_at FROM erasures WHERE session_id = ?",
            (session_id,),
        ).fetchone()
    return ErasureDone(
        Erasure(*erasure), {o["owner"]: json.loads(o["removed_json"]) for o in owners}
    )


def _erased_among(conn: sqlite3.Connection, session_ids: Sequence[str]) -> builtins.list[str]:
    found: set[str] = set()
    for i in range(0, len(session_ids), _IN_CHUNK):
        chunk = session_ids[i : i + _IN_CHUNK]
        marks = ",".join("?" * len(chunk))
        rows = conn.execute(
            f"SELECT session_id FROM erasures WHERE session_id IN ({marks})", chunk
        ).fetchall()
        found.update(row[0] for row in rows)
    return [session_id for session_id in session_ids if session_id in found]


def _tenant_erasure_totals(conn: sqlite3.Connection, tenant: str) -> TenantErasureTotals:
    rows = conn.execute(
        "SELECT o.session_id, o.owner, o.removed_json FROM erasures e "
        "JOIN erasure_owners o ON o.session_id = e.session_id "
        "WHERE e.tenant = ? AND e.reason = 'tenant_erased' AND e.completed_at <> 0",
        (tenant,),
    ).fetchall()
    return sum_erasures((r["session_id"], r["owner"], json.loads(r["removed_json"])) for r in rows)


def _unfinished_erasures(conn: sqlite3.Connection, tenant: str) -> int:
    row = conn.execute(
        "SELECT count(*) FROM erasures WHERE tenant = ? AND completed_at = 0", (tenant,)
    ).fetchone()
    return int(row[0])


def _export(
    conn: sqlite3.Connection, tenant: str, session_id: str
) -> tuple[session_pb2.Session, builtins.list[common_pb2.Message]]:
    # One read transaction: the header's head matches the messages exported.
    with transaction(conn):
        session = _session_from_row(_session_row(conn, tenant, session_id))
        rows = conn.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE session_id = ? ORDER BY seq",
            (session_id,),
        ).fetchall()
    return session, [_message_from_row(row) for row in rows]


def _import(
    conn: sqlite3.Connection, session: session_pb2.Session, messages: Sequence[common_pb2.Message]
) -> None:
    with transaction(conn, "BEGIN IMMEDIATE"):
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


def _expired(
    conn: sqlite3.Connection, idle_before: int, limit: int
) -> builtins.list[tuple[str, str]]:
    rows = conn.execute(
        "SELECT tenant, id FROM sessions WHERE updated_at < ? ORDER BY updated_at, id LIMIT ?",
        (idle_before, limit),
    ).fetchall()
    return [(row["tenant"], row["id"]) for row in rows]


def _beyond_cap(conn: sqlite3.Connection, tenant: str, cap: int) -> builtins.list[str]:
    rows = conn.execute(
        "SELECT id FROM sessions WHERE tenant = ? "
        "ORDER BY updated_at DESC, id DESC LIMIT -1 OFFSET ?",
        (tenant, cap),
    ).fetchall()
    return [row["id"] for row in reversed(rows)]


def _orphans(conn: sqlite3.Connection, table: str, after: str) -> tuple[builtins.list[str], str]:
    """Up to _ORPHAN_STEP distinct session ids of `table` after `after`, those
    without a session; and where to go on from ("" at the end)."""
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


def _remove_orphan(conn: sqlite3.Connection, table: str, session_id: str) -> int:
    with transaction(conn, "BEGIN IMMEDIATE"):
        # Re-checked under the write lock: an import may have re-created the id.
        cursor = conn.execute(
            f"DELETE FROM {table} WHERE session_id = ? "
            "AND NOT EXISTS (SELECT 1 FROM sessions WHERE id = ?)",
            (session_id, session_id),
        )
    return cursor.rowcount


def _calibration(conn: sqlite3.Connection, model: str) -> float | None:
    row = conn.execute(
        "SELECT chars_per_token FROM calibration WHERE model = ?", (model,)
    ).fetchone()
    return None if row is None else float(row[0])


def _set_calibration(conn: sqlite3.Connection, model: str, chars_per_token: float) -> None:
    with transaction(conn, "BEGIN IMMEDIATE"):
        conn.execute(
            "INSERT INTO calibration (model, chars_per_token, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT (model) DO UPDATE SET chars_per_token = excluded.chars_per_token, "
            "updated_at = excluded.updated_at",
            (model, chars_per_token, now_micros()),
        )


# -- the store --------------------------------------------------------------------------


class SqliteSessionStore(SessionBackend):
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
        super().__init__(MessageRules(max_message_chars, max_messages_per_append, estimator))
        self.path = path
        self._db = SqliteDatabase(
            path, "session store", MIGRATIONS, busy_timeout_ms=busy_timeout_ms
        )

    async def open(self) -> None:
        """Open the file, set the pragmas and apply pending migrations."""
        await self._db.open()

    async def close(self) -> None:
        await self._db.close()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- SessionBackend --------------------------------------------------------------

    async def _store_new(
        self, session: session_pb2.Session, batch: Sequence[common_pb2.Message]
    ) -> None:
        await self._db.run(_insert_new, session, batch)

    async def _store_append(
        self, request: AppendRequest
    ) -> tuple[str, builtins.list[common_pb2.Message]]:
        return await self._db.run(_append, self.rules, request)

    async def _store_import(
        self, session: session_pb2.Session, messages: Sequence[common_pb2.Message]
    ) -> None:
        await self._db.run(_import, session, messages)

    async def _list_page(
        self, tenant: str, limit: int, after: tuple[int, str] | None
    ) -> tuple[builtins.list[session_pb2.Session], bool]:
        sessions = await self._db.run(_list, tenant, limit + 1, after)
        return sessions[:limit], len(sessions) > limit

    async def _read_all(
        self, tenant: str, session_id: str
    ) -> tuple[session_pb2.Session, builtins.list[common_pb2.Message]]:
        return await self._db.run(_export, tenant, session_id)

    async def _expired(self, idle_before_micros: int, limit: int) -> builtins.list[tuple[str, str]]:
        return await self._db.run(_expired, idle_before_micros, limit)

    async def _beyond_cap(self, tenant: str, cap: int) -> builtins.list[str]:
        return await self._db.run(_beyond_cap, tenant, cap)

    async def _store_calibration(self, model: str, chars_per_token: float) -> None:
        await self._db.run(_set_calibration, model, chars_per_token)

    # -- the rest of SessionStore -----------------------------------------------------

    async def get(self, tenant: str, session_id: str) -> session_pb2.Session:
        validate_session_id(session_id)
        return await self._db.run(_get, tenant, session_id)

    async def messages(
        self, tenant: str, session_id: str, *, from_seq: int = 0
    ) -> builtins.list[common_pb2.Message]:
        check_from_seq(session_id, from_seq)
        return await self._db.run(_messages, tenant, session_id, from_seq)

    async def recent(
        self, tenant: str, session_id: str, *, before_seq: int | None = None
    ) -> AsyncIterator[common_pb2.Message]:
        validate_session_id(session_id)
        count = (await self._db.run(_get, tenant, session_id)).message_count
        upper = count if before_seq is None else max(0, min(before_seq, count))
        batch = RECENT_FIRST_BATCH
        while upper > 0:
            page = await self._db.run(_page_before, session_id, upper, batch)
            if not page:
                return
            for msg in page:
                yield msg
            upper = page[-1].seq
            batch = min(batch * 2, RECENT_MAX_BATCH)

    async def first_user_message(self, tenant: str, session_id: str) -> common_pb2.Message | None:
        validate_session_id(session_id)
        return await self._db.run(_first_user_message, tenant, session_id)

    async def fork(self, tenant: str, session_id: str, at_hash: str) -> session_pb2.Session:
        validate_session_id(session_id)
        return await self._db.run(_fork, tenant, session_id, at_hash)

    async def delete(self, tenant: str, session_id: str, *, reason: str = "deleted") -> None:
        validate_session_id(session_id)
        check_erasure_reason(reason)
        # erase: the WAL is truncated after, so the messages' text leaves the disk too.
        await self._db.erase(_delete, tenant, session_id, reason, ERASURE_OWNERS)

    async def _list_derived(
        self, tenant: str, session_id: str
    ) -> builtins.list[session_pb2.Session]:
        return await self._db.run(_derived, tenant, session_id)

    async def _list_pending_erasures(self, owner: str, limit: int) -> builtins.list[Erasure]:
        return await self._db.run(_pending_erasures, owner, limit)

    async def _store_acknowledgement(
        self, owner: str, session_id: str, counts: dict[str, int]
    ) -> ErasureDone | None:
        return await self._db.run(_acknowledge_erasure, owner, session_id, counts)

    async def unfinished_erasures(self, tenant: str) -> int:
        return await self._db.run(_unfinished_erasures, tenant)

    async def tenant_erasure_totals(self, tenant: str) -> TenantErasureTotals:
        return await self._db.run(_tenant_erasure_totals, tenant)

    async def _find_erased(self, ids: builtins.list[str]) -> builtins.list[str]:
        return await self._db.run(_erased_among, ids) if ids else []

    async def cleanup_orphans(self) -> int:
        # Walked in short steps, each one call on the worker, so appends queued
        # meanwhile wait for one step, never for the whole walk.
        removed = 0
        for table in _SESSION_CHILD_TABLES:
            after = ""
            while True:
                orphans, after = await self._db.run(_orphans, table, after)
                for session_id in orphans:
                    removed += await self._db.run(_remove_orphan, table, session_id)
                if not after:
                    break
        if removed:
            _log.info("session.orphans_removed", path=str(self.path), removed=removed)
        return removed

    async def calibration(self, model: str) -> float | None:
        return await self._db.run(_calibration, model)
