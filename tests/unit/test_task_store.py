"""Every task store, one set of behaviours: real SQLite in tmp_path, real Redis, and
the run's own PostgreSQL database (tables emptied for each test)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from services.executor.tasks import store as store_module
from services.executor.tasks.postgres_store import PostgresTaskStore
from services.executor.tasks.records import TaskRecord, new_task_id
from services.executor.tasks.sqlite_schema import MIGRATIONS
from services.executor.tasks.store import TASK_COLUMNS, RedisTaskStore, SqliteTaskStore, TaskStore
from tests.waiting import eventually
from threadline.errors import AlreadyExists, InvalidArgument, NotFound


@pytest.fixture(params=["sqlite", "redis", "redis-bytes", "postgresql"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, redis_url: str, postgres_url: str
) -> AsyncIterator[TaskStore]:
    if request.param == "sqlite":
        sqlite = SqliteTaskStore(tmp_path / "tasks.db")
        await sqlite.open()
        yield sqlite
        await sqlite.close()
    elif request.param == "postgresql":
        postgres = await _clean_postgres_store(postgres_url)
        yield postgres
        await postgres.close()
    else:
        client = aioredis.from_url(redis_url, decode_responses=request.param == "redis")
        prefix = f"test:{uuid.uuid4().hex}:"
        yield RedisTaskStore(client, prefix=prefix)
        keys = [key async for key in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def _clean_postgres_store(url: str) -> PostgresTaskStore:
    """An open store on the run's database, its tables emptied of earlier tests' rows."""
    store = PostgresTaskStore(url)
    await store.open()
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("TRUNCATE tasks, task_logs, executor_replicas")
    finally:
        await conn.close()
    return store


def make_task(tenant: str = "acme", created_at: float = 1000.0, **fields: object) -> TaskRecord:
    task = TaskRecord(
        id=new_task_id(),
        tenant=tenant,
        prompt="review the repo",
        agent_type="reviewer",
        runner="command",
        workspace="/tmp/ws",
        created_at=created_at,
    )
    for name, value in fields.items():
        setattr(task, name, value)
    return task


async def test_round_trip_keeps_every_field(store: TaskStore) -> None:
    task = make_task(budget_tokens=500, reason="looks like a review")
    await store.create(task)
    assert await store.get("acme", task.id) == task

    task.status = "succeeded"
    task.model = "gpt-x"
    task.tokens_in, task.tokens_out, task.cost = 120, 30, 0.0123
    task.exit_code = 0
    task.started_at, task.finished_at = 1001.5, 1004.0
    task.owner, task.cancel_requested_at = "executor-0:50053", 1003.25
    await store.update(task)
    got = await store.get("acme", task.id)
    assert got == task
    assert got.duration_s == 2.5


async def test_other_tenants_and_unknown_ids_are_not_found(store: TaskStore) -> None:
    task = make_task()
    await store.create(task)
    with pytest.raises(NotFound):
        await store.get("other", task.id)
    with pytest.raises(NotFound):
        await store.get("acme", new_task_id())
    with pytest.raises(AlreadyExists):
        await store.create(task)
    with pytest.raises(NotFound):
        await store.update(make_task())


async def test_list_is_newest_first_per_tenant_with_status_filter(store: TaskStore) -> None:
    tasks = [make_task(created_at=1000.0 + i) for i in range(5)]
    for task in tasks:
        await store.create(task)
    await store.create(make_task(tenant="other", created_at=2000.0))
    tasks[1].status = "running"
    tasks[3].status = "running"
    await store.update(tasks[1])
    await store.update(tasks[3])

    assert [t.id for t in await store.list("acme")] == [t.id for t in reversed(tasks)]
    assert [t.id for t in await store.list("acme", limit=2)] == [tasks[4].id, tasks[3].id]
    running = await store.list("acme", status="running")
    assert [t.id for t in running] == [tasks[3].id, tasks[1].id]
    assert [t.id for t in await store.list("acme", status="queued", limit=1)] == [tasks[4].id]
    with pytest.raises(InvalidArgument):
        await store.list("acme", status="sleeping")


async def test_by_status_spans_tenants_oldest_first(store: TaskStore) -> None:
    late = make_task(tenant="acme", created_at=3000.0)
    early = make_task(tenant="other", created_at=1000.0)
    done = make_task(tenant="acme", created_at=500.0, status="failed")
    for task in (late, early, done):
        await store.create(task)
    assert [t.id for t in await store.by_status("queued")] == [early.id, late.id]
    late.status = "running"
    await store.update(late)
    assert [t.id for t in await store.by_status("queued")] == [early.id]
    assert [t.id for t in await store.by_status("running")] == [late.id]
    assert [t.id for t in await store.by_status("failed")] == [done.id]


async def test_log_lines_are_numbered_json_and_read_after_a_seq(store: TaskStore) -> None:
    task = make_task()
    other = make_task()
    entries = [{"type": "stdout", "line": f"line {i} ✓"} for i in range(3)]
    assert [await store.append_log(task.id, e) for e in entries] == [0, 1, 2]
    assert await store.append_log(other.id, {"type": "result"}) == 0

    lines = await store.read_log(task.id)
    assert [seq for seq, _ in lines] == [0, 1, 2]
    assert [json.loads(line) for _, line in lines] == entries
    assert all("\n" not in line for _, line in lines)
    assert [seq for seq, _ in await store.read_log(task.id, after=1)] == [2]
    assert await store.read_log(task.id, after=2) == []
    assert await store.read_log(new_task_id()) == []


async def test_concurrent_appends_to_one_log_get_distinct_seqs(store: TaskStore) -> None:
    task_id = new_task_id()
    seqs = await asyncio.gather(*(store.append_log(task_id, {"n": n}) for n in range(20)))
    assert sorted(seqs) == list(range(20))
    lines = await store.read_log(task_id)
    assert [seq for seq, _ in lines] == list(range(20))
    assert sorted(json.loads(line)["n"] for _, line in lines) == list(range(20))


async def test_update_if_writes_only_over_the_expected_status_and_owner(
    store: TaskStore,
) -> None:
    task = make_task(owner="a")
    await store.create(task)
    claimed = make_task(id=task.id, owner="a", status="running", started_at=1001.0)

    # Another status, another owner, an unknown task: nothing is written.
    assert not await store.update_if(claimed, if_status="running", if_owner="a")
    assert not await store.update_if(claimed, if_status="queued", if_owner="b")
    assert not await store.update_if(make_task(), if_status="queued", if_owner="")
    assert await store.get("acme", task.id) == task
    assert [t.id for t in await store.by_status("queued")] == [task.id]

    assert await store.update_if(claimed, if_status="queued", if_owner="a")
    assert await store.get("acme", task.id) == claimed
    assert await store.by_status("queued") == []
    assert [t.id for t in await store.by_status("running")] == [task.id]
    # The same claim again finds it running: it loses.
    assert not await store.update_if(claimed, if_status="queued", if_owner="a")


async def test_of_concurrent_takeovers_exactly_one_wins(store: TaskStore) -> None:
    task = make_task(owner="dead", status="running")
    await store.create(task)
    contenders = [make_task(id=task.id, owner=f"replica-{n}", status="running") for n in range(8)]
    won = await asyncio.gather(
        *(store.update_if(c, if_status="running", if_owner="dead") for c in contenders)
    )
    assert won.count(True) == 1
    winner = contenders[won.index(True)]
    assert (await store.get("acme", task.id)).owner == winner.owner


async def test_heartbeats_expire_or_sign_off(store: TaskStore) -> None:
    assert await store.live_replicas() == set()
    await store.heartbeat("steady", 30)
    await store.heartbeat("leaving", 30)
    await store.heartbeat("fading", 0.3)
    assert await store.live_replicas() == {"steady", "leaving", "fading"}

    await store.heartbeat("leaving", 0)
    assert await store.live_replicas() == {"steady", "fading"}

    async def faded() -> bool:
        return await store.live_replicas() == {"steady"}

    await eventually(faded)
    # A heartbeat brings a replica back; a later one moves its expiry.
    await store.heartbeat("fading", 0.3)
    await store.heartbeat("fading", 30)
    assert await store.live_replicas() == {"steady", "fading"}


async def test_sqlite_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    first = SqliteTaskStore(path)
    await first.open()
    task = make_task()
    await first.create(task)
    await first.append_log(task.id, {"type": "stdout", "line": "x"})
    await first.close()
    second = SqliteTaskStore(path)
    await second.open()
    try:
        assert await second.get("acme", task.id) == task
        assert await second.append_log(task.id, {"type": "result"}) == 1
    finally:
        await second.close()


async def test_sqlite_records_from_before_replicas_have_no_owner(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    old = sqlite3.connect(path)
    for statement in MIGRATIONS[0]:
        old.execute(statement)
    task = make_task()
    columns = TASK_COLUMNS[: -len(("owner", "cancel_requested_at"))]
    values = [task.to_dict()[column] for column in columns]
    old.execute(
        f"INSERT INTO tasks ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})",
        values,
    )
    old.execute("PRAGMA user_version = 1")
    old.commit()
    old.close()

    store = SqliteTaskStore(path)
    await store.open()
    try:
        upgraded = await store.get("acme", task.id)
        assert (upgraded.owner, upgraded.cancel_requested_at) == ("", None)
        assert upgraded == task
    finally:
        await store.close()


async def test_postgresql_replicas_share_records_and_logs(postgres_url: str) -> None:
    first = await _clean_postgres_store(postgres_url)
    second = PostgresTaskStore(postgres_url)
    await second.open()
    try:
        task = make_task()
        await first.create(task)
        await first.append_log(task.id, {"type": "stdout", "line": "x"})
        assert await second.get("acme", task.id) == task
        assert await second.append_log(task.id, {"type": "result"}) == 1
        with pytest.raises(AlreadyExists):
            await second.create(task)
        # Two replicas claiming one queued task, each through its own connections.
        mine = make_task(id=task.id, owner="first", status="running")
        theirs = make_task(id=task.id, owner="second", status="running")
        won = await asyncio.gather(
            first.update_if(mine, if_status="queued", if_owner=""),
            second.update_if(theirs, if_status="queued", if_owner=""),
        )
        assert sorted(won) == [False, True]
        await first.heartbeat("first", 30)
        assert await second.live_replicas() == {"first"}
    finally:
        await first.close()
        await second.close()


# -- erasure ----------------------------------------------------------------------


async def _with_log(store: TaskStore, task: TaskRecord, lines: int = 2) -> TaskRecord:
    await store.create(task)
    for n in range(lines):
        await store.append_log(task.id, {"type": "stdout", "line": f"secret {n}"})
    return task


async def test_delete_ended_removes_the_record_and_its_log_and_nothing_else(
    store: TaskStore,
) -> None:
    done = await _with_log(store, make_task(status="succeeded", finished_at=1010.0), lines=3)
    running = await _with_log(store, make_task(status="running"))
    theirs = await _with_log(store, make_task(tenant="other", status="failed"))

    removed = await store.delete_ended("acme", done.id)
    assert ([t.id for t in removed.tasks], removed.log_lines) == ([done.id], 3)
    assert removed.tasks[0] == done
    with pytest.raises(NotFound):
        await store.get("acme", done.id)
    assert await store.read_log(done.id) == []
    assert await store.list("acme", status="succeeded") == []
    assert await store.by_status("succeeded") == []

    # Not ended, another tenant's, unknown, already gone: nothing is removed.
    for tenant, task_id in [
        ("acme", running.id),
        ("acme", theirs.id),
        ("acme", new_task_id()),
        ("acme", done.id),
    ]:
        nothing = await store.delete_ended(tenant, task_id)
        assert (nothing.tasks, nothing.log_lines) == ([], 0)
    assert await store.get("acme", running.id) == running
    assert await store.get("other", theirs.id) == theirs
    assert len(await store.read_log(running.id)) == 2
    assert len(await store.read_log(theirs.id)) == 2


async def test_delete_tenant_ended_leaves_unfinished_tasks_and_other_tenants(
    store: TaskStore,
) -> None:
    ended = [
        await _with_log(store, make_task(status=status, finished_at=1010.0))
        for status in ("succeeded", "failed", "cancelled")
    ]
    queued = await _with_log(store, make_task())
    theirs = await _with_log(store, make_task(tenant="other", status="succeeded"))

    removed = await store.delete_tenant_ended("acme")
    assert sorted(t.id for t in removed.tasks) == sorted(t.id for t in ended)
    assert removed.log_lines == 6
    assert [t.id for t in await store.list("acme")] == [queued.id]
    assert [t.id for t in await store.list("other")] == [theirs.id]
    assert [await store.read_log(t.id) for t in ended] == [[], [], []]
    again = await store.delete_tenant_ended("acme")
    assert (again.tasks, again.log_lines) == ([], 0)


async def test_delete_ended_before_takes_the_oldest_ends_first_across_tenants(
    store: TaskStore,
) -> None:
    old = [
        await _with_log(store, make_task(tenant=t, status="succeeded", finished_at=f))
        for t, f in [("acme", 1003.0), ("other", 1001.0), ("acme", 1002.0)]
    ]
    recent = await _with_log(store, make_task(status="failed", finished_at=2000.0))
    # Created long ago but still running: never expired, whatever its age.
    running = await _with_log(store, make_task(status="running", created_at=1.0))

    first = await store.delete_ended_before(1500.0, 2)
    assert [t.id for t in first.tasks] == [old[1].id, old[2].id]
    assert first.log_lines == 4
    rest = await store.delete_ended_before(1500.0, 10)
    assert [t.id for t in rest.tasks] == [old[0].id]
    assert (await store.delete_ended_before(1500.0, 10)).tasks == []
    assert {t.id for t in await store.list("acme")} == {recent.id, running.id}
    assert await store.list("other") == []


async def test_replicas_expiring_at_once_each_remove_a_task_once(store: TaskStore) -> None:
    tasks = [
        await _with_log(store, make_task(status="succeeded", finished_at=1000.0 + n), lines=1)
        for n in range(12)
    ]
    sweeps = await asyncio.gather(*(store.delete_ended_before(5000.0, 5) for _ in range(4)))
    reported = [t.id for sweep in sweeps for t in sweep.tasks]
    # Each removed task is reported by exactly one sweep, with its log line.
    assert len(reported) == len(set(reported))
    assert sum(sweep.log_lines for sweep in sweeps) == len(reported)
    while more := (await store.delete_ended_before(5000.0, 5)).tasks:
        reported += [t.id for t in more]
    assert sorted(reported) == sorted(t.id for t in tasks)


async def test_workspaces_in_use_are_those_stored_tasks_name(store: TaskStore) -> None:
    await store.create(make_task(workspace="/ws/a"))
    await store.create(make_task(workspace="/ws/a"))
    await store.create(make_task(tenant="other", workspace="/ws/b", status="failed"))
    assert await store.workspaces_in_use(["/ws/a", "/ws/b", "/ws/c"]) == {"/ws/a", "/ws/b"}
    assert await store.workspaces_in_use([]) == set()
    assert await store.workspaces_in_use([f"/ws/{n}" for n in range(1200)]) == set()


async def test_expiry_finds_old_ends_behind_recent_ones_created_earlier(
    store: TaskStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Redis reads its candidates a page at a time, oldest created first: small pages
    # make the ones that ended long ago sit behind pages of ones that ended recently.
    monkeypatch.setattr(store_module, "_EXPIRY_PAGE", 5)
    recent = [
        await _with_log(store, make_task(status="failed", created_at=100.0 + n, finished_at=5000.0))
        for n in range(12)
    ]
    old = [
        await _with_log(store, make_task(status="succeeded", created_at=200.0, finished_at=f))
        for f in (1002.0, 1001.0, 1003.0)
    ]
    removed = await store.delete_ended_before(2000.0, 10)
    assert [t.id for t in removed.tasks] == [old[1].id, old[0].id, old[2].id]
    assert {t.id for t in await store.list("acme", limit=50)} == {t.id for t in recent}
