"""The shared session store on PostgreSQL, for many session replicas.

An append is one statement, so one round trip: the hashes do not depend on seq,
so they are computed from expected_head before anything is read, and the
statement (`_APPEND`) locks the session row, checks the request id, the head and
the tool call ids the batch was validated against, and only then writes the
messages, the tool call index, the request record and the new head. When a check
fails it writes nothing and returns what it found, from which `_settle` raises
exactly what the other backends raise, in their order: NotFound, the earlier
result of the request id, HeadMismatch, InvalidArgument.

The row lock (`FOR UPDATE`) serialises appends to one session across replicas:
a second appender waits for the first to commit and then sees its head.

The schema is in postgres_schema.py.
"""

from __future__ import annotations

import builtins
import contextlib
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, Self

import asyncpg

from services.session.postgres_schema import MIGRATIONS
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
    message_extras,
    message_from,
    named_tool_call_ids,
    new_fork,
    no_pending_erasure,
    now_micros,
    reused_request_id,
    session_not_found,
    sum_erasures,
)
from services.session.tokens import DEFAULT_ESTIMATOR, TokenEstimator
from threadline.errors import AlreadyExists, HeadMismatch, InvalidArgument, Unavailable
from threadline.ids import validate_session_id
from threadline.logs import get_logger
from threadline.postgres import UNREACHABLE, PostgresDatabase
from threadline.v1 import common_pb2, session_pb2

_log = get_logger(__name__)

_SESSION_COLUMNS = (
    "id, tenant, details, created_at, updated_at, head, message_count, forked_from, compacted_from"
)
_MESSAGE_COLUMNS = "seq, role, created_at, token_count, parent_hash, hash, body"
_SESSION_INSERT = (
    f"INSERT INTO sessions ({_SESSION_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
)

#: Every table whose rows belong to one session.
_SESSION_CHILD_TABLES = ("messages", "tool_calls", "append_requests")

# The request record inserted by an append is not visible to the prune in the same
# statement: keep REQUEST_ID_MEMORY - 1 older ones beside it.
_PRUNE_OFFSET = max(REQUEST_ID_MEMORY - 2, 0)

_APPEND = f"""
WITH target AS (
    SELECT head, message_count FROM sessions WHERE id = $1 AND tenant = $2 FOR UPDATE
), prior AS (
    SELECT fingerprint, first_seq, message_count, head FROM append_requests
    WHERE session_id = $1 AND request_id = $6
), known AS (
    SELECT coalesce(array_agg(call_id ORDER BY call_id), '{{}}') AS ids FROM tool_calls
    WHERE session_id = $1 AND call_id = ANY($8::bytea[])
), moved AS (
    UPDATE sessions SET head = $4, message_count = target.message_count + $7, updated_at = $5
    FROM target, known
    WHERE sessions.id = $1 AND target.head = $3 AND known.ids = $9::bytea[]
        AND NOT EXISTS (SELECT FROM prior)
    RETURNING target.message_count AS first_seq
), logged AS (
    INSERT INTO messages (session_id, {_MESSAGE_COLUMNS})
    SELECT $1, moved.first_seq + m.i - 1, m.role, m.created_at, m.token_count,
        m.parent_hash, m.hash, m.body
    FROM moved, unnest($10::int4[], $11::int8[], $12::int4[], $13::text[], $14::text[],
        $15::text[]) WITH ORDINALITY AS m(role, created_at, token_count, parent_hash, hash, body, i)
), indexed AS (
    INSERT INTO tool_calls (session_id, call_id, seq)
    SELECT $1, c.call_id, moved.first_seq + c.position
    FROM moved, unnest($16::bytea[], $17::int4[]) AS c(call_id, position)
), remembered AS (
    INSERT INTO append_requests (session_id, request_id, fingerprint, first_seq,
        message_count, head)
    SELECT $1, $6, $18, moved.first_seq, $7, $4 FROM moved WHERE $6::bytea IS NOT NULL
), pruned AS (
    DELETE FROM append_requests
    WHERE $6::bytea IS NOT NULL AND EXISTS (SELECT FROM moved) AND session_id = $1
        AND first_seq < (SELECT first_seq FROM append_requests WHERE session_id = $1
            ORDER BY first_seq DESC OFFSET {_PRUNE_OFFSET} LIMIT 1)
)
SELECT moved.first_seq AS stored_at, target.head, target.head IS NOT NULL AS found,
    known.ids AS known, prior.fingerprint, prior.first_seq, prior.message_count,
    prior.head AS prior_head
FROM known LEFT JOIN target ON true LEFT JOIN prior ON true LEFT JOIN moved ON true
"""

#: What `_APPEND` returns when it writes nothing, read without writing.
_APPEND_FACTS = """
SELECT NULL::int4 AS stored_at, s.head, s.head IS NOT NULL AS found, k.ids AS known,
    p.fingerprint, p.first_seq, p.message_count, p.head AS prior_head
FROM (SELECT coalesce(array_agg(call_id ORDER BY call_id), '{}') AS ids FROM tool_calls
        WHERE session_id = $1 AND call_id = ANY($4::bytea[])) AS k
    LEFT JOIN sessions AS s ON s.id = $1 AND s.tenant = $2
    LEFT JOIN append_requests AS p ON p.session_id = $1 AND p.request_id = $3
"""

_INSERT_NEW = f"""
WITH created AS ({_SESSION_INSERT}), logged AS (
    INSERT INTO messages (session_id, {_MESSAGE_COLUMNS})
    SELECT $1, m.* FROM unnest($10::int4[], $11::int4[], $12::int8[], $13::int4[],
        $14::text[], $15::text[], $16::text[]) AS m
), indexed AS (
    INSERT INTO tool_calls (session_id, call_id, seq)
    SELECT $1, c.call_id, c.seq FROM unnest($17::bytea[], $18::int4[]) AS c(call_id, seq)
)
SELECT
"""

# Copied inside PostgreSQL: a long prefix never crosses into Python.
_INSERT_FORK = f"""
WITH created AS ({_SESSION_INSERT}), logged AS (
    INSERT INTO messages (session_id, {_MESSAGE_COLUMNS})
    SELECT $1, {_MESSAGE_COLUMNS} FROM messages WHERE session_id = $10 AND seq < $7
), indexed AS (
    INSERT INTO tool_calls (session_id, call_id, seq)
    SELECT $1, call_id, seq FROM tool_calls WHERE session_id = $10 AND seq < $7
)
SELECT
"""


def _dumps(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _utf8(values: Sequence[str]) -> builtins.list[bytes]:
    return [value.encode("utf-8") for value in values]


def _session_args(session: session_pb2.Session) -> tuple[Any, ...]:
    details = {
        "title": session.title,
        "model": session.model,
        "system_prompt": session.system_prompt,
        "metadata": dict(session.metadata),
    }
    return (
        session.id,
        session.tenant,
        _dumps(details),
        session.created_at.ToMicroseconds(),
        session.updated_at.ToMicroseconds(),
        session.head,
        session.message_count,
        session.forked_from,
        session.compacted_from,
    )


def _session_from_row(row: asyncpg.Record) -> session_pb2.Session:
    details = json.loads(row["details"])
    session = session_pb2.Session(
        id=row["id"],
        tenant=row["tenant"],
        title=details["title"],
        model=details["model"],
        system_prompt=details["system_prompt"],
        metadata=details["metadata"],
        head=row["head"],
        message_count=row["message_count"],
        forked_from=row["forked_from"],
        compacted_from=row["compacted_from"],
    )
    session.created_at.FromMicroseconds(row["created_at"])
    session.updated_at.FromMicroseconds(row["updated_at"])
    return session


def _body(msg: common_pb2.Message) -> str:
    # Free text goes in JSON: PostgreSQL TEXT cannot hold the NUL a message may.
    return _dumps({"id": msg.id, "content": msg.content, **message_extras(msg)})


def _message_from_row(row: asyncpg.Record) -> common_pb2.Message:
    return message_from({**json.loads(row["body"]), **dict(row)})


def _message_arrays(batch: Sequence[common_pb2.Message]) -> builtins.list[builtins.list[Any]]:
    """role, created_at, token_count, parent_hash, hash and body of each message, as
    columns: one array parameter per column, whatever the batch's length."""
    return [
        [int(m.role) for m in batch],
        [m.created_at.ToMicroseconds() for m in batch],
        [m.token_count for m in batch],
        [m.parent_hash for m in batch],
        [m.hash for m in batch],
        [_body(m) for m in batch],
    ]


def _assumed_known(batch: Sequence[common_pb2.Message]) -> set[str]:
    """The session's tool call ids a valid batch implies: those its tool results
    answer that none of its own earlier calls made. `_APPEND` writes only if the
    session holds exactly these of the ids the batch names."""
    made: set[str] = set()
    answered: set[str] = set()
    for msg in batch:
        made.update(call.id for call in msg.tool_calls)
        if msg.tool_call_id and msg.tool_call_id not in made:
            answered.add(msg.tool_call_id)
    return answered


def _sorted_utf8(ids: set[str]) -> builtins.list[bytes]:
    # Byte order, the order of bytea and of the statement's array_agg.
    return sorted(_utf8(list(ids)))


class PostgresSessionStore(SessionBackend):
    """SessionStore on a PostgreSQL database. `await open()` before use, `await close()` after.

    Also an async context manager that opens and closes it.
    """

    def __init__(
        self,
        url: str,
        *,
        max_message_chars: int = 32_000,
        max_messages_per_append: int = 64,
        estimator: TokenEstimator = DEFAULT_ESTIMATOR,
        max_connections: int = 10,
    ) -> None:
        super().__init__(MessageRules(max_message_chars, max_messages_per_append, estimator))
        self._db = PostgresDatabase(
            url, name="session", migrations=MIGRATIONS, max_size=max_connections
        )
        self._open = False

    async def open(self) -> None:
        """Connect and apply pending migrations."""
        await self._db.open()
        self._open = True

    async def close(self) -> None:
        self._open = False
        await self._db.close()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def _pool(self) -> asyncpg.Pool:
        if not self._open:
            raise Unavailable("session store is not open")
        return self._db.pool

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except UNREACHABLE as exc:
            # Restarting or failing over: the caller may retry later.
            raise Unavailable("session store: PostgreSQL is unreachable") from exc

    # -- appends ---------------------------------------------------------------------

    async def _store_append(
        self, request: AppendRequest
    ) -> tuple[str, builtins.list[common_pb2.Message]]:
        batch = request.batch
        assumed = _assumed_known(batch)
        try:
            self.rules.validate(batch, assumed)
        except InvalidArgument:
            # Invalid whatever the session holds; but a missing session, an earlier
            # result of the request id and a moved head come first on every backend.
            facts = await self._append_facts(request)
            prior = await self._settle(request, facts)
            if prior is not None:
                return prior
            assumed = set(_texts(facts["known"]))
        now = now_micros()
        head = self.rules.seal(batch, parent_hash=request.expected_head, first_seq=0, now=now)
        # Each pass either lands, raises, or learns the session's real tool call ids,
        # which cannot change again without the head moving (HeadMismatch).
        while True:
            facts = await self._run_append(request, head, now, assumed)
            if facts["stored_at"] is not None:
                for offset, msg in enumerate(batch):
                    msg.seq = facts["stored_at"] + offset
                return head, batch
            prior = await self._settle(request, facts)
            if prior is not None:
                return prior
            assumed = set(_texts(facts["known"]))

    async def _run_append(
        self, request: AppendRequest, head: str, now: int, assumed: set[str]
    ) -> asyncpg.Record:
        with self._guard():
            facts = await self._pool.fetchrow(
                _APPEND, *self._append_args(request, head, now, assumed)
            )
        assert facts is not None  # the statement returns one row, always
        return facts

    @staticmethod
    def _append_args(
        request: AppendRequest, head: str, now: int, assumed: set[str]
    ) -> tuple[Any, ...]:
        batch = request.batch
        calls = [
            (call.id.encode("utf-8"), offset)
            for offset, msg in enumerate(batch)
            for call in msg.tool_calls
        ]
        return (
            request.session_id,
            request.tenant,
            request.expected_head,
            head,
            now,
            request.request_id.encode("utf-8") if request.request_id else None,
            len(batch),
            _utf8(named_tool_call_ids(batch)),
            _sorted_utf8(assumed),
            *_message_arrays(batch),
            [call_id for call_id, _ in calls],
            [offset for _, offset in calls],
            request.fingerprint,
        )

    async def _append_facts(self, request: AppendRequest) -> asyncpg.Record:
        request_id = request.request_id.encode("utf-8") if request.request_id else None
        with self._guard():
            facts = await self._pool.fetchrow(
                _APPEND_FACTS,
                request.session_id,
                request.tenant,
                request_id,
                _utf8(named_tool_call_ids(request.batch)),
            )
        assert facts is not None  # an aggregate's row, always
        return facts

    async def _settle(
        self, request: AppendRequest, facts: asyncpg.Record
    ) -> tuple[str, builtins.list[common_pb2.Message]] | None:
        """Raise why an append was not stored, or return the earlier result of its
        request id; None if the batch is valid against the tool call ids found."""
        session_id = request.session_id
        if not facts["found"]:
            raise session_not_found(session_id)
        if facts["fingerprint"] is not None:
            return await self._prior_result(request, facts)
        if facts["head"] != request.expected_head:
            if request.request_id:
                # The statement read the request ids as they were when it began: the
                # append it waited for may have been this very request's first attempt.
                again = await self._append_facts(request)
                if again["fingerprint"] is not None:
                    return await self._prior_result(request, again)
            raise HeadMismatch(session_id, request.expected_head, facts["head"])
        self.rules.validate(request.batch, set(_texts(facts["known"])))
        return None

    async def _prior_result(
        self, request: AppendRequest, facts: asyncpg.Record
    ) -> tuple[str, builtins.list[common_pb2.Message]]:
        if facts["fingerprint"] != request.fingerprint:
            raise reused_request_id(request.request_id)
        first, count = facts["first_seq"], facts["message_count"]
        with self._guard():
            rows = await self._pool.fetch(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE session_id = $1 "
                "AND seq >= $2 AND seq < $3 ORDER BY seq",
                request.session_id,
                first,
                first + count,
            )
        if len(rows) != count:
            raise session_not_found(request.session_id)  # deleted since
        return str(facts["prior_head"]), [_message_from_row(row) for row in rows]

    # -- other writes -------------------------------------------------------------------

    async def _store_new(
        self, session: session_pb2.Session, batch: Sequence[common_pb2.Message]
    ) -> None:
        with self._guard():
            await self._pool.execute(_INSERT_NEW, *_new_session_args(session, batch))

    async def _store_import(
        self, session: session_pb2.Session, messages: Sequence[common_pb2.Message]
    ) -> None:
        with self._guard():
            async with self._pool.acquire() as conn, conn.transaction():
                # Orphaned rows of an earlier session with this id would collide;
                # those of a live session are left alone (the insert then fails).
                for table in _SESSION_CHILD_TABLES:
                    await conn.execute(
                        f"DELETE FROM {table} WHERE session_id = $1 "
                        "AND NOT EXISTS (SELECT FROM sessions WHERE id = $1)",
                        session.id,
                    )
                try:
                    await conn.execute(_INSERT_NEW, *_new_session_args(session, messages))
                except asyncpg.UniqueViolationError as exc:
                    raise AlreadyExists(
                        f"session {session.id} already exists",
                        details={"session_id": session.id},
                    ) from exc

    async def fork(self, tenant: str, session_id: str, at_hash: str) -> session_pb2.Session:
        validate_session_id(session_id)
        with self._guard():
            async with self._pool.acquire() as conn, conn.transaction():
                # FOR SHARE: a delete of the source waits until the prefix is copied.
                row = await conn.fetchrow(
                    f"SELECT {_SESSION_COLUMNS}, (SELECT seq FROM messages "
                    "WHERE session_id = $1 AND hash = $3 ORDER BY seq LIMIT 1) AS at_seq "
                    "FROM sessions WHERE id = $1 AND tenant = $2 FOR SHARE",
                    session_id,
                    tenant,
                    at_hash,
                )
                if row is None:
                    raise session_not_found(session_id)
                count = 0
                if at_hash:
                    if row["at_seq"] is None:
                        raise hash_not_found(session_id, at_hash)
                    count = row["at_seq"] + 1
                fork = new_fork(_session_from_row(row), at_hash, count)
                await conn.execute(_INSERT_FORK, *_session_args(fork), session_id)
        return fork

    async def delete(self, tenant: str, session_id: str, *, reason: str = "deleted") -> None:
        validate_session_id(session_id)
        check_erasure_reason(reason)
        now = now_micros()
        with self._guard():
            async with self._pool.acquire() as conn, conn.transaction():
                # Its messages, tool call index and request ids go by ON DELETE CASCADE.
                status = await conn.execute(
                    "DELETE FROM sessions WHERE id = $1 AND tenant = $2", session_id, tenant
                )
                if status == "DELETE 0":
                    raise session_not_found(session_id)
                await conn.execute(
                    "INSERT INTO erasures (session_id, tenant, reason, deleted_at) "
                    "VALUES ($1, $2, $3, $4)",
                    session_id,
                    tenant,
                    reason,
                    now,
                )
                await conn.executemany(
                    "INSERT INTO erasure_owners (session_id, owner, deleted_at) "
                    "VALUES ($1, $2, $3)",
                    [(session_id, owner, now) for owner in ERASURE_OWNERS],
                )

    async def _list_derived(
        self, tenant: str, session_id: str
    ) -> builtins.list[session_pb2.Session]:
        with self._guard():
            rows = await self._pool.fetch(
                f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE tenant = $2 "
                "AND (forked_from = $1 OR compacted_from = $1) ORDER BY created_at, id",
                session_id,
                tenant,
            )
        return [_session_from_row(row) for row in rows]

    async def _list_pending_erasures(self, owner: str, limit: int) -> builtins.list[Erasure]:
        with self._guard():
            rows = await self._pool.fetch(
                "SELECT e.session_id, e.tenant, e.reason, e.deleted_at FROM erasure_owners o "
                "JOIN erasures e ON e.session_id = o.session_id WHERE o.owner = $1 "
                "AND NOT o.done ORDER BY o.deleted_at, o.session_id LIMIT $2",
                owner,
                limit,
            )
        return [Erasure(*row) for row in rows]

    async def _store_acknowledgement(
        self, owner: str, session_id: str, counts: dict[str, int]
    ) -> ErasureDone | None:
        with self._guard():
            async with self._pool.acquire() as conn, conn.transaction():
                # Every owner row of the session, locked: two owners acknowledging at
                # once see each other, so exactly one of them finishes the erasure.
                rows = await conn.fetch(
                    "SELECT owner, done, removed FROM erasure_owners WHERE session_id = $1 "
                    "ORDER BY owner FOR UPDATE",
                    session_id,
                )
                mine = next((row for row in rows if row["owner"] == owner), None)
                if mine is None:
                    raise no_pending_erasure(owner, session_id)
                if mine["done"]:
                    return None
                await conn.execute(
                    "UPDATE erasure_owners SET done = true, removed = $3 "
                    "WHERE session_id = $1 AND owner = $2",
                    session_id,
                    owner,
                    json.dumps(counts),
                )
                if not all(row["done"] for row in rows if row["owner"] != owner):
                    return None
                erasure = await conn.fetchrow(
                    "UPDATE erasures SET completed_at = $2 WHERE session_id = $1 "
                    "RETURNING session_id, tenant, reason, deleted_at",
                    session_id,
                    now_micros(),
                )
        assert erasure is not None, "erasure_owners rows reference their erasure"
        done = {row["owner"]: json.loads(row["removed"]) for row in rows}
        done[owner] = counts
        return ErasureDone(Erasure(*erasure), done)

    async def _find_erased(self, ids: builtins.list[str]) -> builtins.list[str]:
        if not ids:
            return []
        with self._guard():
            rows = await self._pool.fetch(
                "SELECT session_id FROM erasures WHERE session_id = ANY($1::text[])", ids
            )
        found = {row["session_id"] for row in rows}
        return [session_id for session_id in ids if session_id in found]

    async def unfinished_erasures(self, tenant: str) -> int:
        with self._guard():
            count = await self._pool.fetchval(
                "SELECT count(*) FROM erasures WHERE tenant = $1 AND completed_at = 0", tenant
            )
        return int(count)

    async def tenant_erasure_totals(self, tenant: str) -> TenantErasureTotals:
        with self._guard():
            rows = await self._pool.fetch(
                "SELECT o.session_id, o.owner, o.removed FROM erasures e "
                "JOIN erasure_owners o ON o.session_id = e.session_id "
                "WHERE e.tenant = $1 AND e.reason = 'tenant_erased' AND e.completed_at <> 0",
                tenant,
            )
        return sum_erasures((r["session_id"], r["owner"], json.loads(r["removed"])) for r in rows)

    async def _store_calibration(self, model: str, chars_per_token: float) -> None:
        with self._guard():
            await self._pool.execute(
                "INSERT INTO calibration (model, chars_per_token, updated_at) "
                "VALUES ($1, $2, $3) ON CONFLICT (model) DO UPDATE SET "
                "chars_per_token = excluded.chars_per_token, updated_at = excluded.updated_at",
                model.encode("utf-8"),
                chars_per_token,
                now_micros(),
            )

    # -- reads ---------------------------------------------------------------------------

    async def get(self, tenant: str, session_id: str) -> session_pb2.Session:
        validate_session_id(session_id)
        with self._guard():
            row = await self._pool.fetchrow(
                f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE id = $1 AND tenant = $2",
                session_id,
                tenant,
            )
        if row is None:
            raise session_not_found(session_id)
        return _session_from_row(row)

    async def _list_page(
        self, tenant: str, limit: int, after: tuple[int, str] | None
    ) -> tuple[builtins.list[session_pb2.Session], bool]:
        query = f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE tenant = $1 "
        args: builtins.list[Any] = [tenant]
        if after is not None:
            query += "AND (updated_at, id) < ($3, $4) "
            args += list(after)
        with self._guard():
            rows = await self._pool.fetch(
                query + "ORDER BY updated_at DESC, id DESC LIMIT $2", args[0], limit + 1, *args[1:]
            )
        sessions = [_session_from_row(row) for row in rows]
        return sessions[:limit], len(sessions) > limit

    async def messages(
        self, tenant: str, session_id: str, *, from_seq: int = 0
    ) -> builtins.list[common_pb2.Message]:
        check_from_seq(session_id, from_seq)
        with self._guard():
            # One statement: the tenant check and the log are one moment's state. No
            # row means no session; one with a NULL seq, a session without messages.
            rows = await self._pool.fetch(
                f"SELECT {', '.join('m.' + c for c in _MESSAGE_COLUMNS.split(', '))} "
                "FROM sessions AS s LEFT JOIN messages AS m "
                "ON m.session_id = s.id AND m.seq >= $3 "
                "WHERE s.id = $1 AND s.tenant = $2 ORDER BY m.seq",
                session_id,
                tenant,
                from_seq,
            )
        if not rows:
            raise session_not_found(session_id)
        return [_message_from_row(row) for row in rows if row["seq"] is not None]

    async def recent(
        self, tenant: str, session_id: str, *, before_seq: int | None = None
    ) -> AsyncIterator[common_pb2.Message]:
        count = (await self.get(tenant, session_id)).message_count
        upper = count if before_seq is None else max(0, min(before_seq, count))
        batch = RECENT_FIRST_BATCH
        while upper > 0:
            with self._guard():
                rows = await self._pool.fetch(
                    f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE session_id = $1 "
                    "AND seq < $2 ORDER BY seq DESC LIMIT $3",
                    session_id,
                    upper,
                    batch,
                )
            if not rows:
                return  # deleted meanwhile
            for row in rows:
                yield _message_from_row(row)
            upper = rows[-1]["seq"]
            batch = min(batch * 2, RECENT_MAX_BATCH)

    async def first_user_message(self, tenant: str, session_id: str) -> common_pb2.Message | None:
        validate_session_id(session_id)
        with self._guard():
            rows = await self._pool.fetch(
                f"SELECT m.* FROM sessions AS s LEFT JOIN LATERAL (SELECT {_MESSAGE_COLUMNS} "
                "FROM messages WHERE session_id = s.id AND role = $3 ORDER BY seq LIMIT 1) AS m "
                "ON true WHERE s.id = $1 AND s.tenant = $2",
                session_id,
                tenant,
                common_pb2.ROLE_USER,
            )
        if not rows:
            raise session_not_found(session_id)
        return None if rows[0]["seq"] is None else _message_from_row(rows[0])

    async def _read_all(
        self, tenant: str, session_id: str
    ) -> tuple[session_pb2.Session, builtins.list[common_pb2.Message]]:
        with self._guard():
            async with (
                self._pool.acquire() as conn,
                # One snapshot: the header's head matches the messages exported.
                conn.transaction(isolation="repeatable_read", readonly=True),
            ):
                row = await conn.fetchrow(
                    f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE id = $1 AND tenant = $2",
                    session_id,
                    tenant,
                )
                if row is None:
                    raise session_not_found(session_id)
                rows = await conn.fetch(
                    f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE session_id = $1 ORDER BY seq",
                    session_id,
                )
        return _session_from_row(row), [_message_from_row(r) for r in rows]

    async def calibration(self, model: str) -> float | None:
        with self._guard():
            value = await self._pool.fetchval(
                "SELECT chars_per_token FROM calibration WHERE model = $1", model.encode("utf-8")
            )
        return None if value is None else float(value)

    # -- retention -----------------------------------------------------------------------

    async def _expired(self, idle_before_micros: int, limit: int) -> builtins.list[tuple[str, str]]:
        with self._guard():
            rows = await self._pool.fetch(
                "SELECT tenant, id FROM sessions WHERE updated_at < $1 "
                "ORDER BY updated_at, id LIMIT $2",
                idle_before_micros,
                limit,
            )
        return [(row["tenant"], row["id"]) for row in rows]

    async def _beyond_cap(self, tenant: str, cap: int) -> builtins.list[str]:
        with self._guard():
            rows = await self._pool.fetch(
                "SELECT id FROM sessions WHERE tenant = $1 "
                "ORDER BY updated_at DESC, id DESC OFFSET $2",
                tenant,
                cap,
            )
        return [row["id"] for row in reversed(rows)]

    async def cleanup_orphans(self) -> int:
        removed = 0
        for table in _SESSION_CHILD_TABLES:
            # A skip scan over the distinct session ids (one index seek each), not a
            # scan of every row: with foreign keys enforced there is rarely anything.
            with self._guard():
                status = await self._pool.execute(
                    f"""
                    WITH RECURSIVE ids (session_id) AS (
                        (SELECT session_id FROM {table} ORDER BY session_id LIMIT 1)
                        UNION ALL
                        SELECT (SELECT t.session_id FROM {table} AS t
                            WHERE t.session_id > ids.session_id ORDER BY t.session_id LIMIT 1)
                        FROM ids WHERE ids.session_id IS NOT NULL
                    )
                    DELETE FROM {table} WHERE session_id IN (
                        SELECT session_id FROM ids WHERE session_id IS NOT NULL
                        AND NOT EXISTS (SELECT FROM sessions WHERE id = ids.session_id))
                    """
                )
            removed += int(status.rsplit(" ", 1)[1])
        if removed:
            _log.info("session.orphans_removed", removed=removed)
        return removed


def _texts(values: Sequence[bytes] | None) -> builtins.list[str]:
    return [value.decode("utf-8") for value in values or ()]


def _new_session_args(
    session: session_pb2.Session, messages: Sequence[common_pb2.Message]
) -> tuple[Any, ...]:
    """The parameters of `_INSERT_NEW`: the session, its sealed messages, their calls."""
    columns = _message_arrays(messages)
    calls = [(call.id.encode("utf-8"), msg.seq) for msg in messages for call in msg.tool_calls]
    return (
        *_session_args(session),
        [m.seq for m in messages],
        *columns,
        [call_id for call_id, _ in calls],
        [seq for _, seq in calls],
    )
