"""SqliteSessionStore against a real SQLite file under tmp_path."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from services.session.chain import GENESIS_HASH, entry_hash, verify_chain
from services.session.sqlite_schema import MIGRATIONS, SCHEMA_VERSION
from services.session.sqlite_store import SqliteSessionStore
from services.session.store import SessionStore
from threadline.errors import (
    FailedPrecondition,
    HeadMismatch,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from threadline.v1 import common_pb2, session_pb2

Message = common_pb2.Message
TENANT = "acme"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "sessions.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[SqliteSessionStore]:
    async with SqliteSessionStore(db_path) as s:
        yield s


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


def _pragma(path: Path, name: str) -> object:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute(f"PRAGMA {name}").fetchone()[0]


# -- create / get / list -------------------------------------------------------


async def test_create_and_get(store: SqliteSessionStore) -> None:
    created = await store.create(
        tenant=TENANT,
        model="llama3",
        system_prompt="You are terse.",
        title="Planning",
        metadata={"team": "infra", "ü": "✓"},
    )
    assert created.id.startswith("ses_") and len(created.id) == 36
    assert created.head == "" and created.message_count == 0
    assert created.created_at == created.updated_at
    assert created.created_at.ToMicroseconds() > 0
    assert await store.get(TENANT, created.id) == created


async def test_create_requires_a_tenant(store: SqliteSessionStore) -> None:
    with pytest.raises(InvalidArgument, match="tenant"):
        await _session(store, tenant="")


async def test_list_pages_newest_updated_first(store: SqliteSessionStore) -> None:
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


async def test_list_page_size_defaults_and_errors(store: SqliteSessionStore) -> None:
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


# -- append --------------------------------------------------------------------


async def test_append_round_trip_verifies_after_reopen(db_path: Path) -> None:
    stamped = _user("with a nanosecond timestamp")
    stamped.created_at.seconds = 1_700_000_000
    stamped.created_at.nanos = 123_456_789
    interrupted = Message(
        role=common_pb2.ROLE_ASSISTANT, content="The answer is", interrupted=True, id="msg_mine"
    )
    async with SqliteSessionStore(db_path) as store:
        session = await _session(store)
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

    async with SqliteSessionStore(db_path) as store:
        read = await store.messages(TENANT, session.id)
        after = await store.get(TENANT, session.id)
        tail = await store.messages(TENANT, session.id, from_seq=3)
    assert read == stored
    verify_chain(read)
    assert after.head == head2 and after.message_count == 5
    assert after.updated_at.ToMicroseconds() >= session.updated_at.ToMicroseconds()
    assert tail == stored[3:]


async def test_awkward_text_round_trips_exactly(db_path: Path) -> None:
    texts = [
        "nul\x00inside",
        "emoji 🧵 and combining é",
        "line\u2028separator and \r\n newlines",
        "right-to-left \u202e text",
        '{"looks": "like json"}',
        "x" * 32_000,
    ]
    async with SqliteSessionStore(db_path) as store:
        session = await _session(store)
        _, stored = await store.append(TENANT, session.id, "", [_user(t) for t in texts])
    async with SqliteSessionStore(db_path) as store:
        read = await store.messages(TENANT, session.id)
    assert [m.content for m in read] == texts
    assert all(entry_hash(m.parent_hash, m) == m.hash for m in read)
    assert read == stored


async def test_append_leaves_the_callers_messages_alone(store: SqliteSessionStore) -> None:
    session = await _session(store)
    msg = _user("hi")
    await store.append(TENANT, session.id, "", [msg])
    assert msg == _user("hi")


async def test_stale_head_is_refused_with_the_current_head(store: SqliteSessionStore) -> None:
    session = await _session(store)
    head, _ = await store.append(TENANT, session.id, "", [_user("first")])
    with pytest.raises(HeadMismatch) as info:
        await store.append(TENANT, session.id, "", [_user("lost update?")])
    assert info.value.current_head == head
    assert info.value.details["current_head"] == head
    assert [m.content for m in await store.messages(TENANT, session.id)] == ["first"]
    assert (await store.get(TENANT, session.id)).head == head


async def test_concurrent_appenders_each_land_exactly_once(store: SqliteSessionStore) -> None:
    session = await _session(store)

    async def appender(i: int) -> int:
        head = ""
        for attempt in range(100):
            try:
                await store.append(TENANT, session.id, head, [_user(f"message {i}")])
                return attempt
            except HeadMismatch as exc:
                head = exc.current_head
        raise AssertionError("appender starved")

    attempts = await asyncio.gather(*(appender(i) for i in range(20)))
    messages = await store.messages(TENANT, session.id)
    assert sorted(m.content for m in messages) == sorted(f"message {i}" for i in range(20))
    assert [m.seq for m in messages] == list(range(20))
    verify_chain(messages)
    assert (await store.get(TENANT, session.id)).head == messages[-1].hash
    assert sum(attempts) > 0  # they did race


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        ([], "no messages"),
        ([_user("ok"), _tool("call_unknown")], r"messages\[1\]\.tool_call_id"),
        ([_user("ok"), Message(content="no role")], r"messages\[1\]\.role"),
        ([_user("x" * 101)], r"messages\[0\]\.content: 101 characters"),
        ([_user("ok")] * 5, "too many messages"),
        ([_assistant("", "call_1")], r"already used"),
    ],
)
async def test_invalid_appends_store_nothing(
    db_path: Path, batch: list[Message], match: str
) -> None:
    async with SqliteSessionStore(db_path, max_message_chars=100, max_messages_per_append=4) as s:
        session = await _session(s)
        head, _ = await s.append(TENANT, session.id, "", [_user("q"), _assistant("", "call_1")])
        with pytest.raises(InvalidArgument, match=match):
            await s.append(TENANT, session.id, head, batch)
        after = await s.get(TENANT, session.id)
        assert after.head == head and after.message_count == 2
        assert len(await s.messages(TENANT, session.id)) == 2
        # The session still takes a valid batch, answering the earlier call.
        await s.append(TENANT, session.id, head, [_tool("call_1"), _assistant("done")])


async def test_tool_results_may_answer_calls_from_earlier_appends(
    store: SqliteSessionStore,
) -> None:
    session = await _session(store)
    head, _ = await store.append(TENANT, session.id, "", [_user("q"), _assistant("", "c1", "c2")])
    head, _ = await store.append(TENANT, session.id, head, [_tool("c1")])
    head, _ = await store.append(TENANT, session.id, head, [_tool("c2"), _assistant("a")])
    verify_chain(await store.messages(TENANT, session.id))


# -- tenancy and ids -------------------------------------------------------------


async def test_another_tenants_session_is_not_found(store: SqliteSessionStore) -> None:
    theirs = await _session(store, tenant="other")
    head, _ = await store.append("other", theirs.id, "", [_user("secret")])
    missing = "ses_" + "0" * 32

    async def first_recent(session_id: str) -> Message:
        async for msg in store.recent(TENANT, session_id):
            return msg
        raise AssertionError("empty")

    calls: list[Callable[[str], Awaitable[object]]] = [
        lambda sid: store.get(TENANT, sid),
        lambda sid: store.messages(TENANT, sid),
        lambda sid: store.append(TENANT, sid, head, [_user("x")]),
        lambda sid: store.first_user_message(TENANT, sid),
        first_recent,
    ]
    for call in calls:
        with pytest.raises(NotFound) as foreign:
            await call(theirs.id)
        with pytest.raises(NotFound) as absent:
            await call(missing)
        # Same wording either way: the error does not reveal that the id exists.
        assert foreign.value.message.replace(theirs.id, "ID") == absent.value.message.replace(
            missing, "ID"
        )
    assert [m.content for m in await store.messages("other", theirs.id)] == ["secret"]


async def test_malformed_session_id_is_invalid(store: SqliteSessionStore) -> None:
    with pytest.raises(InvalidArgument, match="malformed session id"):
        await store.get(TENANT, "ses_NOT-HEX")
    with pytest.raises(InvalidArgument, match="from_seq"):
        await store.messages(TENANT, "ses_" + "0" * 32, from_seq=-1)


# -- reading -----------------------------------------------------------------------


async def test_recent_walks_back_across_batches(store: SqliteSessionStore) -> None:
    session = await _session(store)
    head = ""
    for start in range(0, 150, 50):
        head, _ = await store.append(
            TENANT, session.id, head, [_user(f"m{i}") for i in range(start, start + 50)]
        )
    newest_first = [m.seq async for m in store.recent(TENANT, session.id)]
    assert newest_first == list(range(149, -1, -1))
    bounded = [m.seq async for m in store.recent(TENANT, session.id, before_seq=40)]
    assert bounded == list(range(39, -1, -1))
    assert [m async for m in store.recent(TENANT, session.id, before_seq=0)] == []


async def test_recent_ignores_appends_made_while_iterating(store: SqliteSessionStore) -> None:
    session = await _session(store)
    head, _ = await store.append(TENANT, session.id, "", [_user("a"), _user("b")])
    seen = []
    async for msg in store.recent(TENANT, session.id):
        seen.append(msg.content)
        if len(seen) == 1:
            head, _ = await store.append(TENANT, session.id, head, [_user("c")])
    assert seen == ["b", "a"]


async def test_first_user_message(store: SqliteSessionStore) -> None:
    session = await _session(store)
    assert await store.first_user_message(TENANT, session.id) is None
    system = Message(role=common_pb2.ROLE_SYSTEM, content="note")
    await store.append(
        TENANT, session.id, "", [system, _assistant("hi"), _user("first"), _user("second")]
    )
    first = await store.first_user_message(TENANT, session.id)
    assert first is not None and first.content == "first" and first.seq == 2


# -- lifecycle and schema ----------------------------------------------------------


async def test_pragmas_and_schema_version(store: SqliteSessionStore, db_path: Path) -> None:
    assert _pragma(db_path, "journal_mode") == "wal"
    assert _pragma(db_path, "user_version") == SCHEMA_VERSION == 2


async def test_reopening_keeps_data_and_migrates_nothing(db_path: Path) -> None:
    async with SqliteSessionStore(db_path) as store:
        session = await _session(store)
    for _ in range(2):
        async with SqliteSessionStore(db_path) as store:
            assert (await store.get(TENANT, session.id)).id == session.id
        assert _pragma(db_path, "user_version") == SCHEMA_VERSION


async def test_a_newer_schema_is_refused(db_path: Path) -> None:
    async with SqliteSessionStore(db_path):
        pass
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(FailedPrecondition, match=f"schema version {SCHEMA_VERSION + 1}"):
        await SqliteSessionStore(db_path).open()
    assert _pragma(db_path, "user_version") == SCHEMA_VERSION + 1


async def test_close_is_idempotent_and_final(db_path: Path) -> None:
    store = SqliteSessionStore(db_path)
    with pytest.raises(Unavailable, match="not open"):
        await _session(store)
    await store.open()
    with pytest.raises(RuntimeError, match="already open"):
        await store.open()
    session = await _session(store)
    await store.close()
    await store.close()
    with pytest.raises(Unavailable, match="not open"):
        await store.get(TENANT, session.id)


async def test_close_waits_for_submitted_work(db_path: Path) -> None:
    store = SqliteSessionStore(db_path)
    await store.open()
    session = await _session(store)
    pending = asyncio.ensure_future(store.append(TENANT, session.id, "", [_user("in flight")]))
    await asyncio.sleep(0)  # let the append reach the worker queue
    await store.close()
    head, _ = await pending
    async with SqliteSessionStore(db_path) as reopened:
        assert (await reopened.get(TENANT, session.id)).head == head


def _version_1_file(path: Path, session_id: str) -> list[Message]:
    """A file as the first release wrote it: schema 1, one session with two messages."""
    path.parent.mkdir(parents=True, exist_ok=True)
    messages = [_user("from the old days"), Message(role=common_pb2.ROLE_ASSISTANT, content="hi")]
    parent = GENESIS_HASH
    for seq, msg in enumerate(messages):
        msg.id = f"msg_old_{seq}"
        msg.created_at.FromMicroseconds(1_600_000_000_000_000 + seq)
        msg.seq = seq
        msg.token_count = 7
        msg.parent_hash = parent
        msg.hash = parent = entry_hash(parent, msg)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        for statement in MIGRATIONS[0]:
            conn.execute(statement)
        conn.execute(
            "INSERT INTO sessions VALUES (?, ?, 't', 'llama3', 'sp', '{}', 1, 2, ?, 2, '', '')",
            (session_id, TENANT, parent),
        )
        conn.executemany(
            "INSERT INTO messages VALUES (?, ?, ?, ?, ?, '[]', '', '', ?, 0, 7, ?, ?)",
            [
                (
                    session_id,
                    m.seq,
                    m.id,
                    m.role,
                    m.content,
                    m.created_at.ToMicroseconds(),
                    m.parent_hash,
                    m.hash,
                )
                for m in messages
            ],
        )
        conn.execute("PRAGMA user_version = 1")
        conn.commit()
    return messages


async def test_a_version_1_file_migrates_forward_on_open(db_path: Path) -> None:
    session_id = "ses_" + "1" * 32
    old = _version_1_file(db_path, session_id)
    assert _pragma(db_path, "user_version") == 1

    async with SqliteSessionStore(db_path) as store:
        assert _pragma(db_path, "user_version") == SCHEMA_VERSION
        # The old data reads and verifies as before.
        assert await store.messages(TENANT, session_id) == old
        session = await store.get(TENANT, session_id)
        assert session.head == old[-1].hash and session.forked_from == ""
        # What the new tables carry works on the migrated file.
        head, _ = await store.append(
            TENANT, session_id, session.head, [_user("new")], request_id="r1"
        )
        again, _ = await store.append(
            TENANT, session_id, session.head, [_user("new")], request_id="r1"
        )
        assert again == head
        await store.set_calibration("llama3", 3.0)
        assert await store.expired(2**62, 10) == [(TENANT, session_id)]
        fork = await store.fork(TENANT, session_id, old[0].hash)
        assert [m.hash for m in await store.messages(TENANT, fork.id)] == [old[0].hash]
        verify_chain(await store.messages(TENANT, session_id))

    # Reopening finds nothing left to migrate.
    async with SqliteSessionStore(db_path) as store:
        assert await store.calibration("llama3") == 3.0
    assert _pragma(db_path, "user_version") == SCHEMA_VERSION


async def test_a_failed_migration_leaves_the_file_as_it_was(db_path: Path) -> None:
    session_id = "ses_" + "2" * 32
    _version_1_file(db_path, session_id)
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        # Something in the way of migration 2: it must fail as a whole.
        conn.execute("CREATE TABLE calibration (x INTEGER)")
        conn.commit()
    with pytest.raises(
        FailedPrecondition, match="migration to schema version 2 failed: table calibration"
    ):
        await SqliteSessionStore(db_path).open()
    assert _pragma(db_path, "user_version") == 1
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert "append_requests" not in tables


async def test_deleting_a_long_session_removes_every_row(db_path: Path) -> None:
    async with SqliteSessionStore(db_path, max_messages_per_append=500) as store:
        session = await _session(store)
        head = ""
        for start in range(0, 2_000, 500):
            batch = [_assistant("", f"c{i}") for i in range(start, start + 500)]
            head, _ = await store.append(TENANT, session.id, head, batch, request_id=f"{start}")
        await store.delete(TENANT, session.id)
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        for table in ("sessions", "messages", "tool_calls", "append_requests"):
            assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0
