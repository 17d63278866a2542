"""The SQLite stores against real files under tmp_path: what only a file shows.

The behaviour every session backend shares is tested once, for all of them, in
test_store_conformance.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from services.executor.tasks.records import TaskRecord, new_task_id
from services.executor.tasks.sqlite_schema import MIGRATIONS as TASK_MIGRATIONS
from services.executor.tasks.store import SqliteTaskStore
from services.memory.sqlite_schema import MIGRATIONS as MEMORY_MIGRATIONS
from services.memory.store import SqliteMemoryStore
from services.session.chain import GENESIS_HASH, entry_hash, verify_chain
from services.session.sqlite_schema import MIGRATIONS, SCHEMA_VERSION
from services.session.sqlite_store import SqliteSessionStore
from tests.unit.test_store_conformance import TENANT, _assistant, _session, _tool, _user
from threadline.errors import (
    FailedPrecondition,
    InvalidArgument,
    Unavailable,
)
from threadline.sqlite import open_database
from threadline.v1 import common_pb2

Message = common_pb2.Message


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "sessions.db"


def _pragma(path: Path, name: str) -> object:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute(f"PRAGMA {name}").fetchone()[0]


# -- the file -----------------------------------------------------------------------
# What every backend does is held by test_store_conformance.py; here what only a
# file can show: data across reopening, the schema, the worker thread, the rows.


async def test_appends_survive_reopening_and_verify(db_path: Path) -> None:
    interrupted = Message(
        role=common_pb2.ROLE_ASSISTANT, content="The answer is", interrupted=True, id="msg_mine"
    )
    async with SqliteSessionStore(db_path) as store:
        session = await _session(store)
        head1, first = await store.append(
            TENANT, session.id, "", [_user("q"), _assistant("", "call_1", "call_2")]
        )
        head2, second = await store.append(
            TENANT, session.id, head1, [_tool("call_2"), _tool("call_1"), interrupted]
        )

    async with SqliteSessionStore(db_path) as store:
        read = await store.messages(TENANT, session.id)
        after = await store.get(TENANT, session.id)
        # The tool call index came back too: a result for call_1 is no longer new.
        with pytest.raises(InvalidArgument, match="already used"):
            await store.append(TENANT, session.id, head2, [_assistant("", "call_1")])
    assert read == first + second
    verify_chain(read)
    assert after.head == head2 and after.message_count == 5


@pytest.mark.parametrize(
    ("open_store", "migrations"),
    [
        (lambda path: SqliteSessionStore(path), MIGRATIONS),
        (lambda path: SqliteMemoryStore(path), MEMORY_MIGRATIONS),
        (lambda path: SqliteTaskStore(path), TASK_MIGRATIONS),
    ],
    ids=["session", "memory", "task"],
)
async def test_every_store_opens_its_file_alike(
    tmp_path: Path,
    open_store: Callable[[Path], SqliteSessionStore | SqliteMemoryStore | SqliteTaskStore],
    migrations: Sequence[object],
) -> None:
    path = tmp_path / "nested" / "store.db"
    store = open_store(path)
    await store.open()
    with pytest.raises(RuntimeError, match="already open"):
        await store.open()
    await store.close()
    await store.close()
    assert _pragma(path, "journal_mode") == "wal"
    assert _pragma(path, "user_version") == len(migrations)


# -- lifecycle and schema ----------------------------------------------------------


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


# -- physical erasure ----------------------------------------------------------------


def test_every_connection_overwrites_what_it_deletes(tmp_path: Path) -> None:
    conn = open_database(tmp_path / "any.db", name="any store", migrations=[])
    try:
        assert conn.execute("PRAGMA secure_delete").fetchone()[0] == 1
    finally:
        conn.close()


def _bytes_on_disk(db: Path) -> bytes:
    return b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*") if p.is_file())


async def test_a_deleted_task_leaves_no_text_in_the_database_or_wal_files(
    tmp_path: Path,
) -> None:
    canary = "canary-3e9a0f-erasure"
    path = tmp_path / "tasks.db"
    store = SqliteTaskStore(path)
    await store.open()
    try:
        doomed = TaskRecord(
            id=new_task_id(),
            tenant="acme",
            prompt=f"{canary} in the prompt",
            agent_type="general",
            runner="local",
            workspace=f"/ws/{canary}",
            status="succeeded",
            finished_at=1000.0,
        )
        kept = TaskRecord(
            id=new_task_id(),
            tenant="acme",
            prompt="kept",
            agent_type="g",
            runner="local",
            workspace="/ws/kept",
        )
        await store.create(doomed)
        await store.create(kept)
        for n in range(50):
            await store.append_log(doomed.id, {"type": "delta", "text": f"{canary} {n}"})
        # Written through the WAL: the text is on disk now.
        assert canary.encode() in await asyncio.to_thread(_bytes_on_disk, path)

        await store.delete_ended("acme", doomed.id)
        # While the store is open, as a running service: neither file holds it.
        on_disk = await asyncio.to_thread(_bytes_on_disk, path)
        assert canary.encode() not in on_disk
        assert b"kept" in on_disk
        assert (await store.get("acme", kept.id)).prompt == "kept"
    finally:
        await store.close()


async def test_a_deleted_session_leaves_no_text_in_the_database_or_wal_files(
    db_path: Path,
) -> None:
    canary = "canary-77d1c2-session"
    async with SqliteSessionStore(db_path) as store:
        doomed = await _session(store)
        kept = await _session(store)
        head, _ = await store.append(TENANT, doomed.id, "", [_user(f"{canary} said")])
        for n in range(20):
            head, _ = await store.append(TENANT, doomed.id, head, [_assistant(f"{canary} {n}")])
        await store.append(TENANT, kept.id, "", [_user("kept words")])
        assert canary.encode() in await asyncio.to_thread(_bytes_on_disk, db_path)

        await store.delete(TENANT, doomed.id)
        on_disk = await asyncio.to_thread(_bytes_on_disk, db_path)
        assert canary.encode() not in on_disk
        assert b"kept words" in on_disk


async def test_erased_memory_leaves_no_text_in_the_database_or_wal_files(
    tmp_path: Path,
) -> None:
    canary = "canary-91ab5e-memory"
    path = tmp_path / "memory.db"
    store = SqliteMemoryStore(path)
    await store.open()
    try:
        await store.save_summary(
            TENANT, "ses_doomed", summary=f"{canary} summary", from_seq=0, next_offset=4
        )
        await store.save_summary(
            TENANT,
            "ses_doomed",
            summary="later",
            from_seq=4,
            next_offset=8,
            archived_text=f"{canary} archived",
        )
        await store.save_summary(
            TENANT, "ses_kept", summary="kept summary", from_seq=0, next_offset=2
        )
        assert canary.encode() in await asyncio.to_thread(_bytes_on_disk, path)

        await store.erase(TENANT, "ses_doomed")
        on_disk = await asyncio.to_thread(_bytes_on_disk, path)
        assert canary.encode() not in on_disk
        assert b"kept summary" in on_disk
    finally:
        await store.close()
