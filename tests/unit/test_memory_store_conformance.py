"""One suite, every MemoryStore backend: SQLite on a tmp file, PostgreSQL on the run's database.

Each test gets clean state: a new file, or emptied tables. Two "replicas" are two
store objects on the same file or database, as two memory processes would be.
What only the backends differ in (reading the history, which the domain never
reads) sits behind the small `Backend` object.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from services.memory.compaction import Compactor
from services.memory.consolidation import Consolidator, SummaryModel
from services.memory.extraction import Extractor
from services.memory.jobs import JobSettings, MemoryJobs
from services.memory.postgres_store import PostgresMemoryStore
from services.memory.queue import LocalJobQueue
from services.memory.store import Activity, Item, MemoryStore, SessionMemory, SqliteMemoryStore
from services.memory.triggers import Thresholds
from threadline.errors import NotFound
from threadline.events import EventPublisher, InProcessEventBus
from threadline.leases import LocalLeases
from threadline.v1 import common_pb2, llm_pb2, memory_pb2, session_pb2

TENANT = "acme"
QUEUED, RUNNING = memory_pb2.JOB_STATE_QUEUED, memory_pb2.JOB_STATE_RUNNING
SUCCEEDED, FAILED = memory_pb2.JOB_STATE_SUCCEEDED, memory_pb2.JOB_STATE_FAILED
#: (from_seq, to_seq, text, archived) of each history entry, oldest first.
History = list[tuple[int, int, str, bool]]
_TABLES = (
    "memories, memory_history, memory_activity, memory_items, memory_jobs, memory_erased_sessions"
)


@dataclass
class Backend:
    name: str
    #: A new store on the same file or database: another replica.
    replica: Callable[[], Awaitable[Any]]
    history: Callable[[str], Awaitable[History]]
    #: What the backend raises when its unique index refuses a row.
    duplicate: type[Exception]


@contextlib.asynccontextmanager
async def _replicas(backend: Backend, count: int) -> AsyncIterator[list[Any]]:
    stores = [await backend.replica() for _ in range(count)]
    try:
        yield stores
    finally:
        for store in stores:
            await store.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """The file, or the database's URL (a sync fixture: postgres_url runs its own loop)."""
    if request.param == "sqlite":
        return tmp_path / "memory.db"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
async def backend(location: Path | str) -> AsyncIterator[Backend]:
    if isinstance(location, Path):
        path = location

        async def sqlite_replica() -> SqliteMemoryStore:
            store = SqliteMemoryStore(path)
            await store.open()
            return store

        async def sqlite_history(session_id: str) -> History:
            with contextlib.closing(sqlite3.connect(path)) as conn:
                rows = conn.execute(
                    "SELECT from_seq, to_seq, summary, archived FROM memory_history "
                    "WHERE tenant = ? AND session_id = ? ORDER BY rowid",
                    (TENANT, session_id),
                ).fetchall()
            return [(f, t, s, bool(a)) for f, t, s, a in rows]

        yield Backend("sqlite", sqlite_replica, sqlite_history, sqlite3.IntegrityError)
        return

    url = location

    async def postgres_replica() -> PostgresMemoryStore:
        store = PostgresMemoryStore(url, max_connections=4)
        await store.open()
        return store

    async def postgres_history(session_id: str) -> History:
        conn = await asyncpg.connect(url)
        try:
            rows = await conn.fetch(
                "SELECT from_seq, to_seq, summary, archived FROM memory_history "
                "WHERE tenant = $1 AND session_id = $2 ORDER BY created_at, from_seq",
                TENANT,
                session_id,
            )
        finally:
            await conn.close()
        return [(r["from_seq"], r["to_seq"], r["summary"], r["archived"]) for r in rows]

    # The first store migrates the run's database. Each test starts from empty tables
    # and leaves them empty: a memory server started on this database later in the
    # run would queue again the jobs left active here.
    first = await postgres_replica()
    await first.close()
    await _truncate(url)
    yield Backend("postgresql", postgres_replica, postgres_history, asyncpg.UniqueViolationError)
    await _truncate(url)


async def _truncate(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"TRUNCATE {_TABLES}")
    finally:
        await conn.close()


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[MemoryStore]:
    async with _replicas(backend, 1) as (only,):
        yield only


def _session() -> str:
    return "ses_" + uuid.uuid4().hex


def _job(
    session_id: str, kind: str = "consolidate", state: memory_pb2.JobState.ValueType = QUEUED
) -> memory_pb2.Job:
    return memory_pb2.Job(
        id="job_" + uuid.uuid4().hex,
        kind=kind,
        tenant=TENANT,
        session_id=session_id,
        state=state,
        trigger="test",
    )


# -- summaries and history -----------------------------------------------------------


async def test_summaries_move_the_offset_and_write_history(
    store: MemoryStore, backend: Backend
) -> None:
    session_id = _session()
    assert await store.get(TENANT, session_id) == SessionMemory("", 0)

    await store.count_failure(TENANT, session_id, "consolidate")
    await store.save_summary(TENANT, session_id, summary="first", from_seq=0, next_offset=4)
    # An archived span: the caller keeps the summary, the history gets the raw text.
    await store.save_summary(
        TENANT, session_id, summary="first", from_seq=4, next_offset=9, archived_text="raw"
    )

    memory = await store.get(TENANT, session_id)
    assert (memory.summary, memory.offset, memory.consolidate_failures) == ("first", 9, 0)
    assert await backend.history(session_id) == [(0, 3, "first", False), (4, 8, "raw", True)]
    assert await store.get(TENANT, _session()) == SessionMemory("", 0)


async def test_failures_count_per_kind_and_compaction_per_head(store: MemoryStore) -> None:
    session_id = _session()
    counts = [await store.count_failure(TENANT, session_id, "consolidate") for _ in range(2)]
    compact = [
        await store.count_failure(TENANT, session_id, "compact", head)
        for head in ("h1", "h1", "h2")
    ]
    memory = await store.get(TENANT, session_id)
    await store.reset_failures(TENANT, session_id, "consolidate")
    await store.reset_failures(TENANT, session_id, "compact")

    assert counts == [1, 2] and compact == [1, 2, 1]
    assert (memory.consolidate_failures, memory.compact_failures) == (2, 1)
    assert memory.compact_failed_head == "h2"
    reset = await store.get(TENANT, session_id)
    assert (reset.consolidate_failures, reset.compact_failures) == (0, 0)


async def test_concurrent_failures_from_two_replicas_all_count(backend: Backend) -> None:
    session_id = _session()
    async with _replicas(backend, 2) as (one, two):
        counts = await asyncio.gather(
            *(r.count_failure(TENANT, session_id, "consolidate") for r in (one, two) * 5)
        )
    assert sorted(counts) == list(range(1, 11))


async def test_a_compacted_session_starts_after_its_summary(store: MemoryStore) -> None:
    fresh, existing = _session(), _session()
    await store.save_items(TENANT, existing, [], next_pointer=7)

    for session_id in (fresh, existing):
        await store.start_compacted(TENANT, session_id, size=12, summary_messages=1)

    for session_id in (fresh, existing):
        memory = await store.get(TENANT, session_id)
        assert (memory.offset, memory.extract_offset, memory.compacted_size) == (1, 0, 12)


# -- extracted items -----------------------------------------------------------------


async def test_items_upsert_by_kind_and_key_and_move_the_pointer(store: MemoryStore) -> None:
    session_id = _session()
    first = [Item("fact", "a", '{"a": 1}', 0, 3), Item("decision", "b", "{}", 2, 5)]
    await store.save_items(TENANT, session_id, first, next_pointer=6)
    again = Item("fact", "a", '{"a": 2}', 0, 9, mentions=2)
    await store.save_items(TENANT, session_id, [again], next_pointer=10)

    assert await store.items(TENANT, session_id) == [again, first[1]]
    assert (await store.get(TENANT, session_id)).extract_offset == 10
    assert await store.items(TENANT, _session()) == []


# -- activity ------------------------------------------------------------------------


async def test_idle_sessions_are_listed_oldest_first_until_checked(store: MemoryStore) -> None:
    old, older, recent = (Activity(TENANT, _session(), "m", 10, 100, t) for t in (20, 10, 90))
    for activity in (old, older, recent):
        await store.record_activity(activity)

    assert await store.activity(TENANT, old.session_id) == old
    assert await store.activity(TENANT, _session()) is None
    assert await store.idle_since(50) == [older, old]
    assert await store.idle_since(50, limit=1) == [older]

    await store.mark_idle_checked(TENANT, older.session_id, 10)
    await store.mark_idle_checked(TENANT, old.session_id, 19)  # stale: not what is stored
    assert await store.idle_since(50) == [old]
    # New activity makes a checked session eligible again.
    again = Activity(TENANT, older.session_id, "m2", 30, 200, 40)
    await store.record_activity(again)
    assert await store.idle_since(50) == [old, again]


# -- jobs ----------------------------------------------------------------------------


async def test_jobs_are_stored_updated_and_found_by_state(store: MemoryStore) -> None:
    session_id = _session()
    first, second = _job(session_id), _job(session_id, "extract")
    await store.put_job(first)
    await store.put_job(second)
    assert await store.job(first.id) == first
    assert await store.job("job_missing") is None
    assert await store.active_job(TENANT, session_id, "consolidate") == first
    assert await store.unfinished_jobs() == [(first.id, "consolidate"), (second.id, "extract")]

    first.state, first.head, first.offset = SUCCEEDED, "h1", 4
    await store.put_job(first)

    assert await store.job(first.id) == first
    assert await store.active_job(TENANT, session_id, "consolidate") is None
    assert await store.unfinished_jobs() == [(second.id, "extract")]
    assert await store.succeeded_job(TENANT, session_id, "consolidate", "h1") == first
    assert await store.succeeded_job(TENANT, session_id, "consolidate", "h2") is None
    assert await store.succeeded_job(TENANT, session_id, "extract", "h1") is None


async def test_the_latest_job_of_a_kind_is_the_last_submitted_in_any_state(
    store: MemoryStore,
) -> None:
    session_id = _session()
    assert await store.latest_job(TENANT, session_id, "extract") is None
    first = _job(session_id, "extract")
    await store.put_job(first)
    first.state = FAILED
    await store.put_job(first)  # an update keeps its place
    second = _job(session_id, "extract")
    await store.put_job(second)
    await store.put_job(_job(session_id))  # another kind
    await store.put_job(_job(_session(), "extract"))  # another session
    assert await store.latest_job(TENANT, session_id, "extract") == second
    second.state = FAILED
    await store.put_job(second)
    assert await store.latest_job(TENANT, session_id, "extract") == second
    assert await store.latest_job("other-tenant", session_id, "extract") is None


async def test_one_active_job_of_a_kind_per_session(store: MemoryStore, backend: Backend) -> None:
    session_id = _session()
    first = _job(session_id)
    assert await store.put_job_if_none_active(first) == first
    # Another kind, or another session, is not a duplicate.
    other_kind, other_session = _job(session_id, "extract"), _job(_session())
    assert await store.put_job_if_none_active(other_kind) == other_kind
    assert await store.put_job_if_none_active(other_session) == other_session

    first.state = RUNNING
    await store.put_job(first)
    duplicate = _job(session_id)
    assert await store.put_job_if_none_active(duplicate) == first
    assert await store.job(duplicate.id) is None
    # The store refuses a second active job however it is written.
    with pytest.raises(backend.duplicate):
        await store.put_job(duplicate)

    first.state = FAILED
    await store.put_job(first)
    assert await store.put_job_if_none_active(duplicate) == duplicate


async def test_replicas_submitting_at_once_store_one_job(backend: Backend) -> None:
    session_id = _session()
    async with _replicas(backend, 2) as (one, two):
        jobs = [_job(session_id) for _ in range(8)]
        kept = await asyncio.gather(
            *(r.put_job_if_none_active(j) for r, j in zip((one, two) * 4, jobs, strict=True))
        )
        unfinished = await one.unfinished_jobs()

    assert len({job.id for job in kept}) == 1
    assert unfinished == [(kept[0].id, "consolidate")]


# -- submit, through MemoryJobs ---------------------------------------------------------


class _Peers:
    """A session service with one slow Get (so two submits overlap) and no model."""

    async def get(
        self,
        tenant: str,
        session_id: str,
        *,
        include_messages: bool = False,
        verify_chain: bool = False,
        from_seq: int = 0,
    ) -> session_pb2.SessionDetail:
        await asyncio.sleep(0.05)
        return session_pb2.SessionDetail(session=session_pb2.Session(id=session_id, head="h"))

    async def messages_from(
        self, tenant: str, session_id: str, from_seq: int
    ) -> list[common_pb2.Message]:
        return []

    async def create(self, request: session_pb2.SessionsCreateRequest) -> session_pb2.Session:
        raise AssertionError("submitting creates no session")

    async def chat(
        self, request: llm_pb2.ChatRequest, *, timeout: float | None = None
    ) -> llm_pb2.ChatResponse:
        raise AssertionError("submitting calls no model")


def _memory_jobs(store: MemoryStore, queue: LocalJobQueue) -> MemoryJobs:
    peers = _Peers()
    summaries = SummaryModel(peers, "m", max_summary_tokens=50, window_tokens=1000)
    return MemoryJobs(
        store=store,
        sessions=peers,
        queue=queue,
        compactions=queue,
        leases=LocalLeases(),
        events=EventPublisher(InProcessEventBus(), "memory"),
        consolidator=Consolidator(store, peers, summaries),
        extractor=Extractor(store, peers, peers, "m", max_output_tokens=50, window_tokens=1000),
        compactor=Compactor(store, peers, peers, summaries, retained_tokens=10),
        settings=JobSettings(Thresholds(0, 0, 0), 0, 5, 1, 1, 1, 1, 1),
        worker="test",
    )


async def test_two_replicas_submitting_the_same_job_at_once_make_one(backend: Backend) -> None:
    session_id = _session()
    queue = LocalJobQueue()
    async with _replicas(backend, 2) as stores:
        replicas = [_memory_jobs(store, queue) for store in stores]
        submitted = await asyncio.gather(
            *(r.submit(TENANT, session_id, "consolidate", "tokens") for r in replicas)
        )
        unfinished = await stores[0].unfinished_jobs()

    assert submitted[0].id == submitted[1].id
    assert unfinished == [(submitted[0].id, "consolidate")]
    # Queued once: a second job id on the queue would be a second run.
    assert (await queue.get()).job_id == submitted[0].id
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(queue.get(), 0.05)


# -- erasure -------------------------------------------------------------------------


async def _fill(store: MemoryStore, session_id: str) -> None:
    """A summary with its history, an item, activity and a job: all a session leaves."""
    await store.save_summary(TENANT, session_id, summary="canary", from_seq=0, next_offset=2)
    await store.save_items(
        TENANT, session_id, [Item("decision", "k", '"canary"', 0, 1, 1)], next_pointer=2
    )
    await store.record_activity(Activity(TENANT, session_id, "m", 10, 100, 1))
    await store.put_job(_job(session_id, state=SUCCEEDED))


async def test_erase_removes_everything_of_the_session_and_nothing_else(
    store: MemoryStore, backend: Backend
) -> None:
    gone, kept = _session(), _session()
    await _fill(store, gone)
    await _fill(store, kept)

    removed = await store.erase(TENANT, gone)

    assert removed == {"summaries": 1, "history": 1, "items": 1, "activity": 1, "jobs": 1}
    assert await store.get(TENANT, gone) == SessionMemory("", 0)
    assert await store.items(TENANT, gone) == []
    assert await store.activity(TENANT, gone) is None
    assert await backend.history(gone) == []
    assert (await store.get(TENANT, kept)).summary == "canary"
    assert len(await store.items(TENANT, kept)) == 1
    # Idempotent: a second erasure (another replica, a retry after a crash) finds nothing.
    assert set((await store.erase(TENANT, gone)).values()) == {0}


async def test_nothing_is_written_for_an_erased_session(store: MemoryStore) -> None:
    gone = _session()
    job = _job(gone, state=RUNNING)
    await store.put_job(job)
    await store.erase(TENANT, gone)

    # What a job still running when its session went would write on its way out.
    await _fill(store, gone)
    assert await store.count_failure(TENANT, gone, "consolidate") == 0
    await store.start_compacted(TENANT, gone, size=10, summary_messages=1)
    job.state = FAILED
    await store.put_job(job)

    assert await store.get(TENANT, gone) == SessionMemory("", 0)
    assert await store.items(TENANT, gone) == []
    assert await store.activity(TENANT, gone) is None
    assert await store.job(job.id) is None
    with pytest.raises(NotFound, match=f"session {gone} not found"):
        await store.put_job_if_none_active(_job(gone))
    # Another tenant's session of the same id is another session.
    other = _job(gone)
    other.tenant = "other"
    assert (await store.put_job_if_none_active(other)).id == other.id
