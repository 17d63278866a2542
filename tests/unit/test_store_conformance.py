"""One suite, every SessionStore backend: SQLite on a tmp file, Redis and PostgreSQL
on real servers.

Each test runs against SQLite, against Redis with a bytes client (what the session
server passes), against Redis with a `decode_responses=True` client, each with
its own key prefix, and against PostgreSQL in a schema of its own. What differs
between backends (planting orphans, counting the remembered request ids) sits
behind the small `Backend` object.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from services.session.chain import GENESIS_HASH, verify_chain
from services.session.context import ContextResult, build_context
from services.session.postgres_store import PostgresSessionStore
from services.session.redis_store import RedisSessionStore
from services.session.sqlite_store import SqliteSessionStore
from services.session.store import REQUEST_ID_MEMORY, SessionStore
from services.session.tokens import TokenEstimator
from tests.postgres_schema import postgres_schema
from threadline.errors import (
    HeadMismatch,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from threadline.v1 import common_pb2, session_pb2

Message = common_pb2.Message
TENANT = "acme"
MAX_CHARS = 1_000
MAX_MESSAGES = 8
MISSING = "ses_" + "0" * 32


@dataclass
class Backend:
    name: str
    store: SessionStore
    #: Writes rows or keys that belong to no session; returns how many.
    plant_orphans: Callable[[], Awaitable[int]]
    #: How many request ids the store holds for a session.
    remembered_requests: Callable[[str], Awaitable[int]]


async def _delete_prefix(client: aioredis.Redis, prefix: str) -> None:
    async for key in client.scan_iter(match=prefix + "*", count=500):
        await client.unlink(key)


@contextlib.asynccontextmanager
async def sqlite_backend(path: Path) -> AsyncIterator[Backend]:
    store = SqliteSessionStore(
        path, max_message_chars=MAX_CHARS, max_messages_per_append=MAX_MESSAGES
    )
    await store.open()

    async def plant_orphans() -> int:
        # A second connection, foreign keys off (SQLite's default): the way rows are
        # orphaned in practice, by a tool that deletes sessions without cascading.
        with contextlib.closing(sqlite3.connect(path)) as conn:
            conn.execute(
                "INSERT INTO messages VALUES (?, 0, 'msg_x', 1, 'lost', '[]', '', '', 0, 0, 1, "
                "'', 'h')",
                (MISSING,),
            )
            conn.execute("INSERT INTO tool_calls VALUES (?, 'call_x', 0)", (MISSING,))
            conn.execute("INSERT INTO append_requests VALUES (?, 'r', 'f', 0, 1, 'h')", (MISSING,))
            conn.commit()
        return 3

    async def remembered_requests(session_id: str) -> int:
        with contextlib.closing(sqlite3.connect(path)) as conn:
            row = conn.execute(
                "SELECT count(*) FROM append_requests WHERE session_id = ?", (session_id,)
            ).fetchone()
        return int(row[0])

    try:
        yield Backend("sqlite", store, plant_orphans, remembered_requests)
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def redis_backend(client: aioredis.Redis, name: str) -> AsyncIterator[Backend]:
    prefix = f"test:{uuid.uuid4().hex}:"
    store = RedisSessionStore(
        client, prefix=prefix, max_message_chars=MAX_CHARS, max_messages_per_append=MAX_MESSAGES
    )

    async def plant_orphans() -> int:
        await client.rpush(f"{prefix}log:{MISSING}", "{}")
        await client.sadd(f"{prefix}calls:{MISSING}", "call_x")
        await client.hset(f"{prefix}requests:{MISSING}", "r", "{}")
        await client.rpush(f"{prefix}request_order:{MISSING}", "r")
        await client.zadd(f"{prefix}tenant:{TENANT}", {MISSING: 1})
        await client.zadd(f"{prefix}by_updated", {MISSING: 1})
        return 6

    async def remembered_requests(session_id: str) -> int:
        return int(await client.hlen(f"{prefix}requests:{session_id}"))

    try:
        yield Backend(name, store, plant_orphans, remembered_requests)
    finally:
        await store.close()
        await _delete_prefix(client, prefix)


@contextlib.asynccontextmanager
async def postgres_backend(url: str) -> AsyncIterator[Backend]:
    store = PostgresSessionStore(
        url, max_message_chars=MAX_CHARS, max_messages_per_append=MAX_MESSAGES
    )
    await store.open()

    async def plant_orphans() -> int:
        # Foreign keys keep rows from outliving their session, unless triggers are
        # off (a restore, a replica): the way rows are orphaned in practice.
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("SET session_replication_role = replica")
            await conn.execute(
                "INSERT INTO messages VALUES ($1, 0, 1, 0, 1, '', 'h', '{}')", MISSING
            )
            await conn.execute("INSERT INTO tool_calls VALUES ($1, 'call_x', 0)", MISSING)
            await conn.execute(
                "INSERT INTO append_requests VALUES ($1, 'r', 'f', 0, 1, 'h')", MISSING
            )
        finally:
            await conn.close()
        return 3

    async def remembered_requests(session_id: str) -> int:
        conn = await asyncpg.connect(url)
        try:
            count = await conn.fetchval(
                "SELECT count(*) FROM append_requests WHERE session_id = $1", session_id
            )
        finally:
            await conn.close()
        return int(count)

    try:
        yield Backend("postgresql", store, plant_orphans, remembered_requests)
    finally:
        await store.close()


@pytest.fixture(params=["sqlite", "redis", "redis-decoded", "postgresql"])
def backend_kind(request: pytest.FixtureRequest) -> tuple[str, str]:
    """The backend's name and its server's URL ("" for SQLite). A plain fixture: the
    server fixtures start their servers with asyncio.run, outside the test's loop."""
    name = str(request.param)
    if name == "sqlite":
        return name, ""
    return name, request.getfixturevalue("postgres_url" if name == "postgresql" else "redis_url")


@pytest.fixture
async def backend(backend_kind: tuple[str, str], tmp_path: Path) -> AsyncIterator[Backend]:
    name, url = backend_kind
    if name == "sqlite":
        async with sqlite_backend(tmp_path / "sessions.db") as b:
            yield b
        return
    if name == "postgresql":
        async with postgres_schema(url) as schema_url, postgres_backend(schema_url) as b:
            yield b
        return
    # Bytes replies are how the session server creates its client; str replies are
    # how tests/conftest.py does: the store must work with both.
    client = aioredis.from_url(url, decode_responses=name == "redis-decoded")
    try:
        async with redis_backend(client, name) as b:
            yield b
    finally:
        await client.aclose()


@pytest.fixture
def store(backend: Backend) -> SessionStore:
    return backend.store


# -- helpers -----------------------------------------------------------------------


async def _session(store: SessionStore, tenant: str = TENANT) -> session_pb2.Session:
    return await store.create(
        tenant=tenant, model="llama3", system_prompt="Be brief.", title="t", metadata={}
    )


def _user(content: str) -> Message:
    return Message(role=common_pb2.ROLE_USER, content=content)


def _assistant(content: str = "", *call_ids: str) -> Message:
    msg = Message(role=common_pb2.ROLE_ASSISTANT, content=content)
    for call_id in call_ids:
        msg.tool_calls.add(id=call_id, name="search", arguments_json='{"q": "x"}')
    return msg


def _tool(call_id: str, content: str = "result") -> Message:
    return Message(role=common_pb2.ROLE_TOOL, tool_call_id=call_id, content=content, name="search")


def _fixed(msg: Message, n: int) -> Message:
    """The message with a fixed id and time: it hashes the same in every store."""
    msg.id = f"msg_fixed_{n}"
    msg.created_at.FromMicroseconds(1_700_000_000_000_000 + n)
    return msg


async def _fill(store: SessionStore, session_id: str, contents: list[str]) -> str:
    head = (await store.get(TENANT, session_id)).head
    for i in range(0, len(contents), MAX_MESSAGES):
        head, _ = await store.append(
            TENANT, session_id, head, [_user(c) for c in contents[i : i + MAX_MESSAGES]]
        )
    return head


async def _contents(store: SessionStore, session_id: str, tenant: str = TENANT) -> list[str]:
    return [m.content for m in await store.messages(tenant, session_id)]


async def _verified(store: SessionStore, session_id: str, tenant: str = TENANT) -> list[Message]:
    """The log, after checking its chain and that the session's head and count match it."""
    messages = await store.messages(tenant, session_id)
    verify_chain(messages)
    session = await store.get(tenant, session_id)
    assert session.head == (messages[-1].hash if messages else GENESIS_HASH)
    assert session.message_count == len(messages)
    return messages


# -- create / get / list ------------------------------------------------------------


async def test_create_and_get(store: SessionStore) -> None:
    created = await store.create(
        tenant=TENANT,
        model="llama3",
        system_prompt="You are terse.",
        title="Planning",
        metadata={"team": "infra", "ü": "✓"},
        forked_from="ses_" + "a" * 32,
        compacted_from="ses_" + "b" * 32,
    )
    assert created.id.startswith("ses_") and len(created.id) == 36
    assert created.head == "" and created.message_count == 0
    assert created.created_at == created.updated_at
    assert created.forked_from == "ses_" + "a" * 32
    assert created.compacted_from == "ses_" + "b" * 32
    assert await store.get(TENANT, created.id) == created
    assert await store.messages(TENANT, created.id) == []
    assert await store.first_user_message(TENANT, created.id) is None


async def test_create_checks_its_arguments(store: SessionStore) -> None:
    with pytest.raises(InvalidArgument, match="tenant"):
        await _session(store, tenant="")
    with pytest.raises(InvalidArgument, match="compacted_from: malformed session id"):
        await store.create(
            tenant=TENANT, model="m", system_prompt="", title="", metadata={}, compacted_from="x"
        )
    assert await store.list(TENANT, page_size=10, page_token="") == ([], "")


async def test_list_pages_newest_updated_first(store: SessionStore) -> None:
    ids = [(await _session(store)).id for _ in range(7)]
    await _session(store, tenant="other")
    # An append makes the oldest session the most recently updated one.
    await store.append(TENANT, ids[0], "", [_user("hello")])

    seen: list[session_pb2.Session] = []
    token = ""
    pages = 0
    while True:
        page, token = await store.list(TENANT, page_size=3, page_token=token)
        seen.extend(page)
        pages += 1
        if not token:
            break
    assert pages == 3
    assert seen[0].id == ids[0]
    assert sorted(s.id for s in seen) == sorted(ids)
    keys = [(s.updated_at.ToMicroseconds(), s.id) for s in seen]
    assert keys == sorted(keys, reverse=True)
    assert all(s.tenant == TENANT for s in seen)


async def test_list_page_size_rules_and_bad_tokens(store: SessionStore) -> None:
    for _ in range(51):
        await _session(store)
    page, token = await store.list(TENANT, page_size=0, page_token="")
    assert len(page) == 50 and token
    rest, last = await store.list(TENANT, page_size=0, page_token=token)
    assert len(rest) == 1 and last == ""
    assert await store.list("nobody", page_size=10, page_token="") == ([], "")
    with pytest.raises(InvalidArgument, match="page_size"):
        await store.list(TENANT, page_size=-1, page_token="")
    for bad in ("!!", "bm90IGpzb24", "WzEsMiwzXQ"):
        with pytest.raises(InvalidArgument, match="malformed page token"):
            await store.list(TENANT, page_size=10, page_token=bad)


async def test_list_pages_through_sessions_updated_at_the_same_instant(
    store: SessionStore,
) -> None:
    # Import sets updated_at, so several sessions can share one: paging must still
    # return each exactly once, ordered by id among equals.
    template = await _session(store)
    lines = await store.export(TENANT, template.id)
    await store.delete(TENANT, template.id)
    ids = sorted([(await store.import_session(TENANT, lines)).id for _ in range(5)])
    seen: list[str] = []
    token = ""
    while True:
        page, token = await store.list(TENANT, page_size=2, page_token=token)
        seen.extend(s.id for s in page)
        if not token:
            break
    assert seen == ids[::-1]


# -- append -------------------------------------------------------------------------


async def test_append_round_trip_and_chain(store: SessionStore) -> None:
    session = await _session(store)
    stamped = _user("with a nanosecond timestamp")
    stamped.created_at.seconds = 1_700_000_000
    stamped.created_at.nanos = 123_456_789
    interrupted = Message(
        role=common_pb2.ROLE_ASSISTANT, content="The answer is", interrupted=True, id="msg_mine"
    )
    head1, first = await store.append(
        TENANT, session.id, "", [stamped, _assistant("", "call_1", "call_2")]
    )
    head2, second = await store.append(
        TENANT, session.id, head1, [_tool("call_2"), _tool("call_1"), interrupted]
    )
    stored = first + second
    assert [m.seq for m in stored] == [0, 1, 2, 3, 4]
    assert stored[0].created_at.nanos == 123_456_000  # microsecond precision
    assert stored[4].id == "msg_mine" and stored[4].interrupted
    assert all(m.id.startswith("msg_") and m.token_count > 0 for m in stored)
    assert head1 == first[-1].hash and head2 == stored[-1].hash
    assert await _verified(store, session.id) == stored
    assert await store.messages(TENANT, session.id, from_seq=3) == stored[3:]
    assert await store.messages(TENANT, session.id, from_seq=9) == []
    after = await store.get(TENANT, session.id)
    assert after.updated_at.ToMicroseconds() >= session.updated_at.ToMicroseconds()


async def test_awkward_text_round_trips(store: SessionStore) -> None:
    texts = [
        "nul\x00inside",
        "emoji 🧵 and combining é",
        "line\u2028separator and \r\n newlines",
        '{"looks": "like json"}',
        "x" * MAX_CHARS,
    ]
    session = await _session(store)
    _, stored = await store.append(TENANT, session.id, "", [_user(t) for t in texts])
    assert await _verified(store, session.id) == stored
    assert await _contents(store, session.id) == texts


async def test_nul_and_other_awkward_text_round_trips_in_every_field(store: SessionStore) -> None:
    # PostgreSQL's TEXT cannot hold NUL: a backend must still keep it wherever a
    # client can put it, lookups by tool call id, request id and model included.
    odd = "a\x00b 🧵"
    session = await store.create(
        tenant=TENANT, model=odd, system_prompt=odd, title=odd, metadata={odd: odd}
    )
    assert await store.get(TENANT, session.id) == session
    call = Message(role=common_pb2.ROLE_ASSISTANT, name=odd, id=odd)
    call.tool_calls.add(id=odd, name=odd, arguments_json=odd)
    batch = [_user(odd), call, _tool(odd, odd)]
    first = await store.append(TENANT, session.id, "", batch, request_id=odd)
    assert await store.append(TENANT, session.id, "", batch, request_id=odd) == first
    assert await _verified(store, session.id) == first[1]
    with pytest.raises(InvalidArgument, match="already used"):
        await store.append(TENANT, session.id, first[0], [_assistant("", odd)])
    await store.set_calibration(odd, 2.5)
    assert await store.calibration(odd) == 2.5
    assert await store.calibration("a") is None


async def test_stale_head_is_refused_with_the_current_head(store: SessionStore) -> None:
    session = await _session(store)
    head, _ = await store.append(TENANT, session.id, "", [_user("first")])
    with pytest.raises(HeadMismatch) as info:
        await store.append(TENANT, session.id, "", [_user("lost update?")])
    assert info.value.current_head == head
    assert info.value.details["current_head"] == head
    assert await _contents(store, session.id) == ["first"]
    assert (await store.get(TENANT, session.id)).head == head


async def test_concurrent_appenders_each_land_exactly_once(store: SessionStore) -> None:
    session = await _session(store)

    async def appender(i: int) -> int:
        head = ""
        for attempt in range(200):
            try:
                await store.append(TENANT, session.id, head, [_user(f"message {i}")])
                return attempt
            except HeadMismatch as exc:
                head = exc.current_head
        raise AssertionError("appender starved")

    attempts = await asyncio.gather(*(appender(i) for i in range(20)))
    messages = await _verified(store, session.id)
    assert sorted(m.content for m in messages) == sorted(f"message {i}" for i in range(20))
    assert [m.seq for m in messages] == list(range(20))
    assert sum(attempts) > 0  # they did race


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        ([], "no messages"),
        ([_user("ok"), _tool("call_unknown")], r"messages\[1\]\.tool_call_id"),
        ([_user("ok"), Message(content="no role")], r"messages\[1\]\.role"),
        ([_user("ok"), Message(role=common_pb2.Role.ValueType(42), content="x")], r"\.role"),
        ([_user("x" * (MAX_CHARS + 1))], rf"messages\[0\]\.content: {MAX_CHARS + 1} characters"),
        ([_user("ok")] * (MAX_MESSAGES + 1), "too many messages"),
        ([_assistant("", "call_1")], r"already used"),
    ],
)
async def test_invalid_appends_store_nothing(
    store: SessionStore, batch: list[Message], match: str
) -> None:
    session = await _session(store)
    head, _ = await store.append(TENANT, session.id, "", [_user("q"), _assistant("", "call_1")])
    with pytest.raises(InvalidArgument, match=match):
        await store.append(TENANT, session.id, head, batch, request_id="bad-1")
    after = await store.get(TENANT, session.id)
    assert after.head == head and after.message_count == 2
    assert len(await store.messages(TENANT, session.id)) == 2
    # The session still takes a valid batch answering the earlier call, and the
    # refused request id was not remembered.
    await store.append(
        TENANT, session.id, head, [_tool("call_1"), _assistant("done")], request_id="bad-1"
    )


async def test_tool_results_may_answer_calls_from_earlier_appends(store: SessionStore) -> None:
    session = await _session(store)
    head, _ = await store.append(TENANT, session.id, "", [_user("q"), _assistant("", "c1", "c2")])
    head, _ = await store.append(TENANT, session.id, head, [_tool("c1")])
    head, _ = await store.append(TENANT, session.id, head, [_tool("c2"), _assistant("a")])
    await _verified(store, session.id)


# -- idempotent append ---------------------------------------------------------------


async def test_a_retry_with_the_same_request_id_returns_the_first_result(
    store: SessionStore,
) -> None:
    session = await _session(store)
    head0, _ = await store.append(TENANT, session.id, "", [_user("q")])
    batch = [_assistant("", "call_1"), _tool("call_1")]
    first = await store.append(TENANT, session.id, head0, batch, request_id="req-1")
    # The reply was lost; meanwhile another writer appended too. The retry carries
    # the old, now stale head and a tool call id that is "already used" by the
    # first attempt: neither matters, the request id is checked first.
    await store.append(TENANT, session.id, first[0], [_user("later")])
    retry = await store.append(TENANT, session.id, head0, batch, request_id="req-1")
    assert retry == first
    assert await _contents(store, session.id) == ["q", "", "result", "later"]
    await _verified(store, session.id)
    assert batch == [_assistant("", "call_1"), _tool("call_1")]  # caller's copy untouched


async def test_a_request_id_reused_for_another_batch_is_invalid(store: SessionStore) -> None:
    session = await _session(store)
    head, _ = await store.append(TENANT, session.id, "", [_user("one")], request_id="req-1")
    with pytest.raises(InvalidArgument, match=r"req-1.*different batch"):
        await store.append(TENANT, session.id, head, [_user("two")], request_id="req-1")
    assert await _contents(store, session.id) == ["one"]
    with pytest.raises(InvalidArgument, match="request_id"):
        await store.append(TENANT, session.id, head, [_user("two")], request_id="r" * 201)


async def test_request_ids_are_per_session(store: SessionStore) -> None:
    a, b = await _session(store), await _session(store)
    await store.append(TENANT, a.id, "", [_user("x")], request_id="same")
    head, _ = await store.append(TENANT, b.id, "", [_user("x")], request_id="same")
    assert await _contents(store, b.id) == ["x"] and head


async def test_the_last_thousand_request_ids_are_remembered(
    backend: Backend, store: SessionStore
) -> None:
    session = await _session(store)
    head = ""
    heads = []
    for i in range(REQUEST_ID_MEMORY + 1):
        heads.append(head)
        head, _ = await store.append(TENANT, session.id, head, [_user(f"m{i}")], request_id=f"r{i}")
    assert await backend.remembered_requests(session.id) == REQUEST_ID_MEMORY
    # r1 is the oldest one kept: its retry is recognised.
    retried, _ = await store.append(TENANT, session.id, heads[1], [_user("m1")], request_id="r1")
    assert retried == (await store.messages(TENANT, session.id, from_seq=1))[0].hash
    # r0 was forgotten: the retry is a new append, refused on its stale head.
    with pytest.raises(HeadMismatch):
        await store.append(TENANT, session.id, heads[0], [_user("m0")], request_id="r0")
    assert (await store.get(TENANT, session.id)).message_count == REQUEST_ID_MEMORY + 1


# -- tenancy and ids -------------------------------------------------------------------


async def test_another_tenants_session_is_not_found(store: SessionStore) -> None:
    theirs = await _session(store, tenant="other")
    head, stored = await store.append("other", theirs.id, "", [_user("secret")])

    async def first_recent(session_id: str) -> Message:
        async for msg in store.recent(TENANT, session_id):
            return msg
        raise AssertionError("empty")

    calls: list[Callable[[str], Awaitable[object]]] = [
        lambda sid: store.get(TENANT, sid),
        lambda sid: store.messages(TENANT, sid),
        lambda sid: store.append(TENANT, sid, head, [_user("x")]),
        lambda sid: store.first_user_message(TENANT, sid),
        lambda sid: store.fork(TENANT, sid, stored[0].hash),
        lambda sid: store.delete(TENANT, sid),
        lambda sid: store.export(TENANT, sid),
        first_recent,
    ]
    for call in calls:
        with pytest.raises(NotFound) as foreign:
            await call(theirs.id)
        with pytest.raises(NotFound) as absent:
            await call(MISSING)
        # Same wording either way: the error does not reveal that the id exists.
        assert foreign.value.message.replace(theirs.id, "ID") == absent.value.message.replace(
            MISSING, "ID"
        )
    assert await _contents(store, theirs.id, tenant="other") == ["secret"]
    assert await store.beyond_cap(TENANT, 0) == []


async def test_malformed_ids_are_invalid(store: SessionStore) -> None:
    with pytest.raises(InvalidArgument, match="malformed session id"):
        await store.get(TENANT, "ses_NOT-HEX")
    with pytest.raises(InvalidArgument, match="malformed session id"):
        await store.delete(TENANT, "nope")
    with pytest.raises(InvalidArgument, match="from_seq"):
        await store.messages(TENANT, MISSING, from_seq=-1)


# -- reading ----------------------------------------------------------------------------


async def test_recent_reads_newest_first_across_batches(store: SessionStore) -> None:
    session = await _session(store)
    await _fill(store, session.id, [f"m{i}" for i in range(150)])
    newest_first = [m.seq async for m in store.recent(TENANT, session.id)]
    assert newest_first == list(range(149, -1, -1))
    bounded = [m.seq async for m in store.recent(TENANT, session.id, before_seq=40)]
    assert bounded == list(range(39, -1, -1))
    assert [m async for m in store.recent(TENANT, session.id, before_seq=0)] == []
    beyond = [m.seq async for m in store.recent(TENANT, session.id, before_seq=10**6)]
    assert beyond == newest_first
    assert [m async for m in store.recent(TENANT, session.id)] == (
        await store.messages(TENANT, session.id)
    )[::-1]


async def test_recent_ignores_appends_made_while_iterating(store: SessionStore) -> None:
    session = await _session(store)
    head, _ = await store.append(TENANT, session.id, "", [_user("a"), _user("b")])
    seen = []
    async for msg in store.recent(TENANT, session.id):
        seen.append(msg.content)
        if len(seen) == 1:
            head, _ = await store.append(TENANT, session.id, head, [_user("c")])
    assert seen == ["b", "a"]


async def test_first_user_message(store: SessionStore) -> None:
    session = await _session(store)
    system = Message(role=common_pb2.ROLE_SYSTEM, content="note")
    head, _ = await store.append(TENANT, session.id, "", [system, _assistant("hi")])
    assert await store.first_user_message(TENANT, session.id) is None
    await store.append(TENANT, session.id, head, [_user("first"), _user("second")])
    first = await store.first_user_message(TENANT, session.id)
    assert first is not None and first.content == "first" and first.seq == 2


# -- fork ---------------------------------------------------------------------------


async def test_fork_at_a_hash_copies_the_prefix_exactly(store: SessionStore) -> None:
    original = await store.create(
        tenant=TENANT, model="m", system_prompt="sp", title="title", metadata={"k": "v"}
    )
    head, _ = await store.append(
        TENANT, original.id, "", [_user("q1"), _assistant("a1"), _user("q2"), _assistant("a2")]
    )
    before = await store.messages(TENANT, original.id)

    fork = await store.fork(TENANT, original.id, before[1].hash)
    assert fork.id != original.id
    assert fork.forked_from == original.id and fork.compacted_from == ""
    assert (fork.tenant, fork.model, fork.system_prompt, fork.title) == (
        TENANT,
        "m",
        "sp",
        "title",
    )
    assert dict(fork.metadata) == {"k": "v"}
    assert fork.head == before[1].hash and fork.message_count == 2
    assert await store.get(TENANT, fork.id) == fork
    assert await _verified(store, fork.id) == before[:2]  # ids, times, hashes: identical
    first = await store.first_user_message(TENANT, fork.id)
    assert first is not None and first.content == "q1"

    # The fork goes its own way; the original does not move.
    await store.append(TENANT, fork.id, fork.head, [_user("another way")])
    assert await _contents(store, fork.id) == ["q1", "a1", "another way"]
    assert await store.messages(TENANT, original.id) == before
    assert (await store.get(TENANT, original.id)).head == head
    listed = {
        s.id: s.forked_from for s in (await store.list(TENANT, page_size=10, page_token=""))[0]
    }
    assert listed == {original.id: "", fork.id: original.id}


async def test_fork_keeps_the_tool_calls_it_copied(store: SessionStore) -> None:
    session = await _session(store)
    _, stored = await store.append(
        TENANT,
        session.id,
        "",
        [_user("q"), _assistant("", "c1"), _tool("c1"), _assistant("", "c2")],
    )
    fork = await store.fork(TENANT, session.id, stored[1].hash)
    # c1 was made inside the prefix: the fork knows it and may answer it again.
    head, _ = await store.append(TENANT, fork.id, fork.head, [_tool("c1", "other result")])
    # c2 was made after the fork point: unknown to the fork.
    with pytest.raises(InvalidArgument, match="tool_call_id"):
        await store.append(TENANT, fork.id, head, [_tool("c2")])
    with pytest.raises(InvalidArgument, match="already used"):
        await store.append(TENANT, fork.id, head, [_assistant("", "c1")])


async def test_fork_at_the_empty_hash_is_an_empty_session(store: SessionStore) -> None:
    session = await _session(store)
    await store.append(TENANT, session.id, "", [_user("q")])
    fork = await store.fork(TENANT, session.id, "")
    assert fork.head == "" and fork.message_count == 0 and fork.forked_from == session.id
    assert await store.messages(TENANT, fork.id) == []
    assert await store.first_user_message(TENANT, fork.id) is None


async def test_fork_at_an_unknown_hash_is_not_found(store: SessionStore) -> None:
    session = await _session(store)
    await store.append(TENANT, session.id, "", [_user("q")])
    unknown = "f" * 64
    with pytest.raises(NotFound, match=unknown):
        await store.fork(TENANT, session.id, unknown)
    other = await _session(store)
    _, theirs = await store.append(TENANT, other.id, "", [_user("elsewhere")])
    with pytest.raises(NotFound, match="no message with hash"):
        await store.fork(TENANT, session.id, theirs[0].hash)
    assert len((await store.list(TENANT, page_size=10, page_token=""))[0]) == 2


# -- create with messages (compaction) --------------------------------------------------


async def test_create_with_messages_hashes_from_genesis(store: SessionStore) -> None:
    old = await _session(store)
    summary = _user("[Compacted context summary] the user asked for X")
    tail = [_assistant("", "c1"), _tool("c1"), _assistant("done")]
    new = await store.create(
        tenant=TENANT,
        model="m",
        system_prompt="sp",
        title="t",
        metadata={},
        compacted_from=old.id,
        messages=[summary, *tail],
    )
    assert new.compacted_from == old.id and new.message_count == 4
    stored = await _verified(store, new.id)
    assert stored[0].parent_hash == GENESIS_HASH and new.head == stored[-1].hash
    assert [m.content for m in stored] == [summary.content, "", "result", "done"]
    first = await store.first_user_message(TENANT, new.id)
    assert first is not None and first.seq == 0
    assert summary.id == "" and not summary.hash  # the caller's messages are untouched
    # The tool call index came with the messages.
    with pytest.raises(InvalidArgument, match="already used"):
        await store.append(TENANT, new.id, new.head, [_assistant("", "c1")])


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        ([_tool("c9")], "tool_call_id"),
        ([_user("x" * (MAX_CHARS + 1))], "characters"),
        ([_user("x")] * (MAX_MESSAGES + 1), "too many"),
    ],
)
async def test_create_with_invalid_messages_stores_nothing(
    store: SessionStore, batch: list[Message], match: str
) -> None:
    with pytest.raises(InvalidArgument, match=match):
        await store.create(
            tenant=TENANT, model="m", system_prompt="", title="", metadata={}, messages=batch
        )
    assert await store.list(TENANT, page_size=10, page_token="") == ([], "")
    assert await store.expired(2**62, 10) == []


# -- delete and orphans ---------------------------------------------------------------


async def test_delete_removes_everything_of_the_session(
    backend: Backend, store: SessionStore
) -> None:
    keep = await _session(store)
    await store.append(TENANT, keep.id, "", [_user("stays")], request_id="r")
    gone = await _session(store)
    await store.append(
        TENANT, gone.id, "", [_user("q"), _assistant("", "c1"), _tool("c1")], request_id="r"
    )
    await store.set_calibration("llama3", 3.5)

    await store.delete(TENANT, gone.id)

    with pytest.raises(NotFound):
        await store.get(TENANT, gone.id)
    with pytest.raises(NotFound):
        await store.messages(TENANT, gone.id)
    with pytest.raises(NotFound):
        await store.delete(TENANT, gone.id)
    assert await backend.remembered_requests(gone.id) == 0
    assert [s.id for s in (await store.list(TENANT, page_size=10, page_token=""))[0]] == [keep.id]
    assert [sid for _, sid in await store.expired(2**62, 10)] == [keep.id]
    assert await store.beyond_cap(TENANT, 0) == [keep.id]
    assert await store.cleanup_orphans() == 0  # nothing left behind
    assert await _contents(store, keep.id) == ["stays"]
    assert await store.calibration("llama3") == 3.5


async def test_cleanup_removes_orphans_and_nothing_else(
    backend: Backend, store: SessionStore
) -> None:
    live = await _session(store)
    batch = [_user("q"), _assistant("", "c1"), _tool("c1")]
    first = await store.append(TENANT, live.id, "", batch, request_id="r")
    planted = await backend.plant_orphans()
    assert await store.cleanup_orphans() == planted
    assert await store.cleanup_orphans() == 0
    await _verified(store, live.id)
    assert await store.expired(2**62, 10) == [(TENANT, live.id)]
    # The live session's request id and tool call index survived.
    assert await store.append(TENANT, live.id, "", batch, request_id="r") == first
    with pytest.raises(InvalidArgument, match="already used"):
        await store.append(TENANT, live.id, first[0], [_assistant("", "c1")])


# -- export / import -------------------------------------------------------------------


async def _rich_session(store: SessionStore) -> str:
    session = await store.create(
        tenant=TENANT,
        model="m",
        system_prompt="sp",
        title="Ünïcode title",
        metadata={"k": "v", "ü": "✓"},
        compacted_from="ses_" + "c" * 32,
    )
    head, _ = await store.append(TENANT, session.id, "", [_user("q1"), _assistant("", "c1")])
    await store.append(
        TENANT,
        session.id,
        head,
        [_tool("c1", "nul\x00 and 🧵"), Message(role=common_pb2.ROLE_ASSISTANT, interrupted=True)],
    )
    return session.id


async def test_export_then_import_round_trips_exactly(store: SessionStore) -> None:
    session_id = await _rich_session(store)
    original = await store.get(TENANT, session_id)
    lines = await store.export(TENANT, session_id)
    assert json.loads(lines[0])["session"]["id"] == session_id
    assert [json.loads(line)["message"].get("seq", "0") for line in lines[1:]] == [
        "0",
        "1",
        "2",
        "3",
    ]
    await store.delete(TENANT, session_id)

    imported = await store.import_session("other", lines)

    assert imported.id != session_id
    expected = session_pb2.Session()
    expected.CopyFrom(original)
    expected.id = imported.id
    expected.tenant = "other"
    assert imported == expected
    assert await store.get("other", imported.id) == expected
    again = await store.export("other", imported.id)
    assert again[1:] == lines[1:]
    assert json.loads(again[0]) == json.loads(
        lines[0].replace('"acme"', '"other"').replace(session_id, imported.id)
    )
    await _verified(store, imported.id, tenant="other")
    # The tool call index came back with it.
    with pytest.raises(InvalidArgument, match="already used"):
        await store.append("other", imported.id, imported.head, [_assistant("", "c1")])
    first = await store.first_user_message("other", imported.id)
    assert first is not None and first.content == "q1"
    with pytest.raises(NotFound):
        await store.get("other", session_id)


async def test_import_never_takes_the_exported_id(store: SessionStore) -> None:
    # Whether another tenant holds the id, the importer holds it, or nobody does,
    # an import answers the same way: a new session under a new id.
    session_id = await _rich_session(store)
    lines = await store.export(TENANT, session_id)
    ids = {(await store.import_session(tenant, lines)).id for tenant in (TENANT, "other")}
    assert len(ids) == 2 and session_id not in ids
    assert await store.export(TENANT, session_id) == lines
    [other] = (await store.list("other", page_size=10, page_token=""))[0]
    assert other.id in ids and other.message_count == 4


async def test_import_applies_the_limits_create_applies(store: SessionStore) -> None:
    session_id = await _rich_session(store)
    lines = await store.export(TENANT, session_id)
    header = json.loads(lines[0])
    cases = {
        "title": ("x" * 257, r"line 1: title is 257 characters; the limit is 256"),
        "model": ("m" * 129, r"line 1: model is 129 characters"),
        "metadata": ({f"k{i}": "v" for i in range(33)}, r"line 1: metadata has 33 entries"),
    }
    for field, (value, match) in cases.items():
        changed = {**header, "session": {**header["session"], field: value}}
        with pytest.raises(InvalidArgument, match=match):
            await store.import_session("other", [json.dumps(changed), *lines[1:]])
    assert await store.list("other", page_size=10, page_token="") == ([], "")


def _edit(line: str, **changes: object) -> str:
    value = json.loads(line)
    value["message"].update(changes)
    return json.dumps(value)


async def test_import_of_a_tampered_or_malformed_export_is_refused(store: SessionStore) -> None:
    session_id = await _rich_session(store)
    lines = await store.export(TENANT, session_id)
    await store.delete(TENANT, session_id)

    cases = [
        ([lines[0], lines[1], _edit(lines[2], content="edited"), *lines[3:]], r"line 3: .*seq 1"),
        ([lines[0], lines[1], *lines[3:]], r"line 3: .*seq 2"),  # a message dropped
        ([lines[0], *lines[1:4]], r"line 1: head"),  # the last message dropped
        ([lines[0], lines[1], "{not json", *lines[3:]], r"line 3: not valid JSON"),
        ([lines[0], lines[1], '{"session": {}}', *lines[3:]], r"line 3: expected an object"),
        ([lines[0], _edit(lines[1], role=7), *lines[2:]], r"line 2"),
        ([_edit(lines[1])], r"line 1: expected an object"),
        ([lines[0].replace(session_id, "ses_bad")], "malformed session id"),
        ([], "no lines"),
    ]
    for tampered, match in cases:
        with pytest.raises(InvalidArgument, match=match):
            await store.import_session(TENANT, tampered)
    with pytest.raises(NotFound):
        await store.get(TENANT, session_id)
    assert await store.list(TENANT, page_size=10, page_token="") == ([], "")
    # Trailing blank lines (a split on "\n") are fine.
    restored = await store.import_session(TENANT, [*lines, ""])
    assert restored.message_count == 4


async def test_an_empty_session_round_trips(store: SessionStore) -> None:
    session = await _session(store)
    lines = await store.export(TENANT, session.id)
    assert len(lines) == 1
    await store.delete(TENANT, session.id)
    restored = await store.import_session(TENANT, lines)
    session.id = restored.id
    assert restored == session
    assert await store.export(TENANT, restored.id) == [
        lines[0].replace(json.loads(lines[0])["session"]["id"], restored.id)
    ]


# -- retention --------------------------------------------------------------------------


async def test_expired_and_beyond_cap_go_oldest_first(store: SessionStore) -> None:
    ids = [(await _session(store)).id for _ in range(5)]
    theirs = await _session(store, tenant="other")
    await store.append(TENANT, ids[0], "", [_user("touch")])  # now the newest of acme
    by_age = sorted(
        [await store.get(TENANT, sid) for sid in ids],
        key=lambda s: (s.updated_at.ToMicroseconds(), s.id),
    )
    oldest_first = [s.id for s in by_age]
    assert oldest_first[-1] == ids[0]

    everything = await store.expired(2**62, 100)
    assert [sid for _, sid in everything if sid != theirs.id] == oldest_first
    assert ("other", theirs.id) in everything
    assert await store.expired(2**62, 2) == everything[:2]
    cutoff = by_age[2].updated_at.ToMicroseconds()
    idle = [s.id for s in by_age if s.updated_at.ToMicroseconds() < cutoff]
    assert [sid for _, sid in await store.expired(cutoff, 100) if sid != theirs.id] == idle
    assert await store.expired(0, 100) == []
    assert await store.expired(2**62, 0) == []

    assert await store.beyond_cap(TENANT, 2) == oldest_first[:3]
    assert await store.beyond_cap(TENANT, 5) == []
    assert await store.beyond_cap(TENANT, 0) == oldest_first
    assert await store.beyond_cap("other", 0) == [theirs.id]
    with pytest.raises(InvalidArgument, match="cap"):
        await store.beyond_cap(TENANT, -1)
    with pytest.raises(InvalidArgument, match="limit"):
        await store.expired(0, -1)


# -- calibration -----------------------------------------------------------------------


async def test_calibration_is_stored_per_model(store: SessionStore) -> None:
    assert await store.calibration("llama3") is None
    await store.set_calibration("llama3", 3.25)
    await store.set_calibration("qwen", 1 / 3)
    assert await store.calibration("llama3") == 3.25
    assert await store.calibration("qwen") == 1 / 3
    await store.set_calibration("llama3", 2.5)
    assert await store.calibration("llama3") == 2.5
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(InvalidArgument, match="chars_per_token"):
            await store.set_calibration("llama3", bad)
    with pytest.raises(InvalidArgument, match="model"):
        await store.set_calibration("", 3.0)
    assert await store.calibration("llama3") == 2.5


# -- lifecycle ---------------------------------------------------------------------------


async def test_a_closed_store_is_unavailable(store: SessionStore) -> None:
    session = await _session(store)
    await store.close()
    await store.close()
    with pytest.raises(Unavailable, match="not open"):
        await store.get(TENANT, session.id)


# -- context building is the same on every backend -----------------------------------------


def _conversation() -> list[Message]:
    log: list[Message] = []
    for turn in range(12):
        log.append(_user(f"question {turn} " + "q" * (turn * 7)))
        if turn % 3 == 0:
            log.append(_assistant("", f"c{turn}a", f"c{turn}b"))
            log.append(_tool(f"c{turn}b", "r" * 40))
            log.append(_tool(f"c{turn}a", "s" * 25))
        log.append(_assistant(f"answer {turn} " + "a" * (turn * 11)))
    return [_fixed(msg, n) for n, msg in enumerate(log)]


async def _contexts(store: SessionStore) -> list[ContextResult]:
    session = await store.create(
        tenant=TENANT, model="m", system_prompt="Be brief.", title="", metadata={}
    )
    log = _conversation()
    head = ""
    for i in range(0, len(log), MAX_MESSAGES):
        head, _ = await store.append(TENANT, session.id, head, log[i : i + MAX_MESSAGES])
    exact = TokenEstimator(chars_per_token=1.0, per_message_overhead=0)
    return [
        await build_context(
            store,
            TENANT,
            session.id,
            budget_tokens=budget,
            memory_summary="they agreed on X",
            estimator=exact,
        )
        for budget in (80, 150, 300, 600, 10_000)
    ]


async def test_build_context_gives_the_same_result_on_every_backend(
    tmp_path: Path, redis_url: str, postgres_url: str
) -> None:
    results = []
    async with sqlite_backend(tmp_path / "sessions.db") as sqlite:
        results.append(await _contexts(sqlite.store))
    client = aioredis.from_url(redis_url)
    try:
        async with redis_backend(client, "redis") as redis_store:
            results.append(await _contexts(redis_store.store))
    finally:
        await client.aclose()
    async with postgres_schema(postgres_url) as url, postgres_backend(url) as postgres:
        results.append(await _contexts(postgres.store))
    assert results[0] == results[1] == results[2]
    dropped = [r.dropped_count for r in results[0]]
    assert dropped[0] > dropped[-1] == 0  # the budgets did cut, at different places
    assert len(set(dropped)) > 2
