"""Executor replicas sharing one task store (a SQLite file, a PostgreSQL database), each
pool on connections of its own: a task runs once, on the replica that owns it; a
dead replica's tasks are failed or run elsewhere; a cancel reaches the run through
any replica."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from services.executor.tasks.pool import ReplicaTimings, TaskPool
from services.executor.tasks.postgres_store import PostgresTaskStore
from services.executor.tasks.records import TERMINAL, Runner, TaskRecord
from services.executor.tasks.store import SqliteTaskStore, TaskStore
from tests.unit.test_task_pool import ScriptedRunner, drain, make_task
from tests.waiting import eventually
from threadline.events import EventPublisher, InProcessEventBus, Subscription, attributes_of

#: Heartbeats, sweeps and cancel polls every few tens of ms; never taken for dead by
#: accident, however busy the machine.
FAST = ReplicaTimings(heartbeat_s=0.05, dead_after_s=60, sweep_s=0.05, cancel_poll_s=0.02)
#: For the replica a test lets die: dead half a second after its last heartbeat.
MORTAL = ReplicaTimings(heartbeat_s=0.05, dead_after_s=0.5, sweep_s=0.05, cancel_poll_s=0.02)
OpenStore = Callable[[], Awaitable[TaskStore]]


@pytest.fixture(params=["sqlite", "postgresql"])
async def open_store(
    request: pytest.FixtureRequest, tmp_path: Path, postgres_url: str
) -> AsyncIterator[OpenStore]:
    """Opens one more connection to the shared store, as another replica would."""
    if request.param == "postgresql":
        conn = await asyncpg.connect(postgres_url)
        try:
            await conn.execute("TRUNCATE tasks, task_logs, executor_replicas")
        except asyncpg.UndefinedTableError:
            pass  # the first test of the run: the store migrates when it opens
        finally:
            await conn.close()
    opened: list[SqliteTaskStore | PostgresTaskStore] = []

    async def open_one() -> TaskStore:
        store: SqliteTaskStore | PostgresTaskStore
        if request.param == "sqlite":
            store = SqliteTaskStore(tmp_path / "tasks.db")
        else:
            store = PostgresTaskStore(postgres_url)
        await store.open()
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        await store.close()


@pytest.fixture
def bus() -> InProcessEventBus:
    return InProcessEventBus()


@pytest.fixture
async def events(bus: InProcessEventBus) -> AsyncIterator[Subscription]:
    sub = await bus.subscribe()
    yield sub
    await sub.close()


@pytest.fixture
async def start_replica(
    open_store: OpenStore, bus: InProcessEventBus
) -> AsyncIterator[Callable[..., Awaitable[tuple[TaskPool, TaskStore]]]]:
    """Starts a pool named `replica` on its own store connection; stops them all after."""
    pools: list[TaskPool] = []

    async def start(
        replica: str, runner: Runner, timings: ReplicaTimings = FAST, **options: Any
    ) -> tuple[TaskPool, TaskStore]:
        store = await open_store()
        pool = TaskPool(
            store,
            {runner.name: runner},
            EventPublisher(bus, "executor"),
            timings=timings,
            **options,
        )
        await pool.start(replica)
        pools.append(pool)
        return pool, store

    yield start
    for pool in reversed(pools):
        await pool.stop(grace_s=0)


async def wait_terminal(store: TaskStore, task_id: str) -> TaskRecord:
    async def terminal() -> TaskRecord | None:
        task = await store.get("acme", task_id)
        return task if task.status in TERMINAL else None

    return await eventually(terminal)


async def results(store: TaskStore, task_id: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for _, line in await store.read_log(task_id)]
    return [line for line in lines if line["type"] == "result"]


def count_sweeps(store: TaskStore, monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """How many times the replica on `store` has begun looking for dead replicas."""
    calls = 0
    live_replicas = store.live_replicas

    async def counted() -> set[str]:
        nonlocal calls
        calls += 1
        return await live_replicas()

    monkeypatch.setattr(store, "live_replicas", counted)
    return lambda: calls


async def test_a_replica_restarting_fails_only_its_own_running_task(
    tmp_path: Path,
    start_replica: Callable[..., Awaitable[tuple[TaskPool, TaskStore]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a_runner, b_runner = ScriptedRunner(), ScriptedRunner()
    a, a_store = await start_replica("a", a_runner, max_concurrency=1)
    b, b_store = await start_replica("b", b_runner)
    on_a = await a.submit(make_task(tmp_path))
    queued_on_a = await a.submit(make_task(tmp_path))
    on_b = await b.submit(make_task(tmp_path))
    await eventually(lambda: a_runner.active == 1 and b_runner.active == 1)

    # a crashes (it loses the store and writes nothing more) and comes back as "a".
    await a_store.close()
    sweeps = count_sweeps(b_store, monkeypatch)
    again = ScriptedRunner(hold=False)
    await start_replica("a", again)

    failed = await b_store.get("acme", on_a.id)
    assert (failed.status, failed.reason) == ("failed", "executor restarted")
    assert (await wait_terminal(b_store, queued_on_a.id)).status == "succeeded"
    assert again.started == [queued_on_a.id]
    # b goes on looking for dead replicas, and b is not one: its task keeps running.
    await eventually(lambda: sweeps() >= 2)
    assert (await b_store.get("acme", on_b.id)).status == "running"
    b_runner.release.set()
    assert (await wait_terminal(b_store, on_b.id)).status == "succeeded"
    assert b_runner.started == [on_b.id]
    assert await results(b_store, on_b.id) == [
        {"type": "result", "status": "succeeded", "reason": ""}
    ]


async def test_a_dead_replicas_running_task_fails_and_its_queued_task_runs_once_elsewhere(
    tmp_path: Path,
    start_replica: Callable[..., Awaitable[tuple[TaskPool, TaskStore]]],
    events: Subscription,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a_runner, b_runner = ScriptedRunner(), ScriptedRunner(hold=False)
    a, a_store = await start_replica("a", a_runner, MORTAL, max_concurrency=1)
    _, b_store = await start_replica("b", b_runner)
    running = await a.submit(make_task(tmp_path))
    waiting = await a.submit(make_task(tmp_path))
    await eventually(lambda: a_runner.active == 1)

    # a's heartbeats stop reaching the store, as when its process is killed or cut
    # off; it still runs, and must not write over what b decides.
    async def lost(replica: str, ttl_s: float) -> None:
        return None

    monkeypatch.setattr(a_store, "heartbeat", lost)

    failed = await wait_terminal(b_store, running.id)
    assert (failed.status, failed.reason) == ("failed", "its executor replica a stopped")
    assert (await wait_terminal(b_store, waiting.id)).status == "succeeded"
    # a sees its run taken and stops it; the task b took from its queue it never starts.
    await eventually(lambda: a_runner.cancelled == [running.id])
    await eventually(lambda: a.running == 0 and a.queued == 0)
    assert a_runner.started == [running.id]
    assert b_runner.started == [waiting.id]
    assert (await b_store.get("acme", running.id)).reason == "its executor replica a stopped"
    assert await results(b_store, running.id) == [
        {"type": "result", "status": "failed", "reason": "its executor replica a stopped"}
    ]

    published = [(e.type, attributes_of(e)) for e in await drain(events)]
    about = {
        task_id: [(t, a.get("cause")) for t, a in published if a["task_id"] == task_id]
        for task_id in (running.id, waiting.id)
    }
    assert about[running.id] == [
        ("task.queued", None),
        ("task.started", None),
        ("task.failed", "replica_stopped"),
    ]
    assert about[waiting.id] == [
        ("task.queued", None),
        ("task.started", None),
        ("task.succeeded", None),
    ]


async def test_cancel_through_a_replica_that_does_not_own_the_task(
    tmp_path: Path,
    start_replica: Callable[..., Awaitable[tuple[TaskPool, TaskStore]]],
    events: Subscription,
) -> None:
    a_runner = ScriptedRunner()
    a, a_store = await start_replica("a", a_runner, max_concurrency=1)
    b, _ = await start_replica("b", ScriptedRunner())
    running = await a.submit(make_task(tmp_path))
    waiting = await a.submit(make_task(tmp_path))
    await eventually(lambda: a_runner.active == 1)

    # Queued on a: b takes it over and cancels it at once.
    assert (await b.cancel("acme", waiting.id)).status == "cancelled"
    # Running on a: b records the request, a cancels the run, b returns the end.
    stopped = await b.cancel("acme", running.id)
    assert (stopped.status, stopped.reason) == ("cancelled", "cancelled by request")
    assert stopped.finished_at is not None
    assert a_runner.cancelled == [running.id]
    # a's worker, now free, drops the task b cancelled from its queue.
    await eventually(lambda: a.running == 0 and a.queued == 0)
    assert a_runner.started == [running.id]
    for task in (running, waiting):
        assert await results(a_store, task.id) == [
            {"type": "result", "status": "cancelled", "reason": "cancelled by request"}
        ]
    ends = [
        (e.type, attributes_of(e)["task_id"])
        for e in await drain(events)
        if e.type in ("task.cancelled", "task.failed", "task.succeeded")
    ]
    assert sorted(ends) == sorted([("task.cancelled", running.id), ("task.cancelled", waiting.id)])


async def test_a_replica_that_stops_hands_its_queued_tasks_on_at_once(
    tmp_path: Path, start_replica: Callable[..., Awaitable[tuple[TaskPool, TaskStore]]]
) -> None:
    # a would be taken for dead only after a minute: the hand-over comes from its stop.
    a_runner, b_runner = ScriptedRunner(), ScriptedRunner(hold=False)
    a, _ = await start_replica("a", a_runner, max_concurrency=1)
    _, b_store = await start_replica("b", b_runner)
    running = await a.submit(make_task(tmp_path))
    waiting = await a.submit(make_task(tmp_path))
    await eventually(lambda: a_runner.active == 1)

    await a.stop(grace_s=0)
    stopped = await b_store.get("acme", running.id)
    assert (stopped.status, stopped.reason) == ("failed", "executor stopped")
    assert (await wait_terminal(b_store, waiting.id)).status == "succeeded"
    assert b_runner.started == [waiting.id]
