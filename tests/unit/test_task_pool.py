"""The task pool on a real SQLite store and a real event bus, with in-test runners."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.executor.tasks.command_runner import CommandRunner
from services.executor.tasks.pool import TaskPool
from services.executor.tasks.records import (
    TERMINAL,
    LogWriter,
    Runner,
    RunOutcome,
    TaskRecord,
    new_task_id,
)
from services.executor.tasks.store import SqliteTaskStore
from tests.waiting import eventually
from threadline.errors import NotFound, ResourceExhausted
from threadline.events import EventPublisher, InProcessEventBus, Subscription, attributes_of
from threadline.v1.events_pb2 import LifecycleEvent


class ScriptedRunner:
    """A Runner test double: each run logs, then waits for the test to release it."""

    name = "scripted"

    def __init__(self, *, hold: bool = True) -> None:
        self.hold = hold
        self.active = 0
        self.peak = 0
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.release = asyncio.Event()
        self.outcome = RunOutcome("succeeded", model="m-1", tokens_in=2000, tokens_out=500)

    async def run(self, task: TaskRecord, log: LogWriter) -> RunOutcome:
        self.active += 1
        self.peak = max(self.peak, self.active)
        self.started.append(task.id)
        try:
            await log({"type": "delta", "text": f"working on {task.prompt}"})
            if self.hold:
                await self.release.wait()
            else:
                await asyncio.sleep(0.02)
            await log({"type": "delta", "text": "done"})
            return self.outcome
        except asyncio.CancelledError:
            self.cancelled.append(task.id)
            raise
        finally:
            self.active -= 1


class ExplodingRunner:
    name = "exploding"

    async def run(self, task: TaskRecord, log: LogWriter) -> RunOutcome:
        raise RuntimeError("model server on fire")


#: The pool's name among replicas: a restart of the same replica keeps it.
REPLICA = "executor-0:50053"


def make_task(tmp_path: Path, runner: str = "scripted", prompt: str = "p") -> TaskRecord:
    task_id = new_task_id()
    return TaskRecord(
        id=task_id,
        tenant="acme",
        prompt=prompt,
        agent_type="reviewer",
        runner=runner,
        workspace=str(tmp_path / task_id),
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteTaskStore]:
    sqlite = SqliteTaskStore(tmp_path / "tasks.db")
    await sqlite.open()
    yield sqlite
    await sqlite.close()


@pytest.fixture
def bus() -> InProcessEventBus:
    return InProcessEventBus()


@pytest.fixture
async def events(bus: InProcessEventBus) -> AsyncIterator[Subscription]:
    sub = await bus.subscribe()
    yield sub
    await sub.close()


async def drain(sub: Subscription) -> list[LifecycleEvent]:
    """Every event published so far (the in-process bus delivers synchronously)."""
    out: list[LifecycleEvent] = []
    events = aiter(sub)
    while True:
        try:
            out.append(await asyncio.wait_for(anext(events), 0.05))
        except TimeoutError:
            return out


def new_pool(
    store: SqliteTaskStore, bus: InProcessEventBus, *runners: Runner, **options: Any
) -> TaskPool:
    return TaskPool(store, {r.name: r for r in runners}, EventPublisher(bus, "executor"), **options)


async def wait_terminal(store: SqliteTaskStore, task_id: str) -> TaskRecord:
    async def terminal() -> TaskRecord | None:
        task = await store.get("acme", task_id)
        return task if task.status in TERMINAL else None

    return await eventually(terminal)


async def test_never_runs_more_than_max_concurrency_and_records_the_outcome(
    tmp_path: Path, store: SqliteTaskStore, bus: InProcessEventBus, events: Subscription
) -> None:
    runner = ScriptedRunner()
    pool = new_pool(store, bus, runner, max_concurrency=2, prices={"m-1": (0.5, 2.0)})
    await pool.start(REPLICA)
    try:
        tasks = [await pool.submit(make_task(tmp_path)) for _ in range(5)]
        await eventually(lambda: runner.active == 2)
        await asyncio.sleep(0.1)
        assert (pool.running, pool.queued) == (2, 3)
        assert runner.started == [tasks[0].id, tasks[1].id]
        statuses = [(await store.get("acme", t.id)).status for t in tasks]
        assert statuses == ["running", "running", "queued", "queued", "queued"]
        runner.release.set()
        done = [await wait_terminal(store, t.id) for t in tasks]
    finally:
        await pool.stop()
    assert runner.peak == 2
    assert runner.started == [t.id for t in tasks]
    first = done[0]
    assert first.status == "succeeded"
    assert (first.model, first.tokens_in, first.tokens_out) == ("m-1", 2000, 500)
    assert first.cost == pytest.approx(2.0 * 0.5 + 0.5 * 2.0)
    assert first.started_at is not None and first.duration_s is not None
    assert first.duration_s >= 0

    published = await drain(events)
    mine = [e for e in published if attributes_of(e).get("task_id") == first.id]
    assert [e.type for e in mine] == ["task.queued", "task.started", "task.succeeded"]
    end = attributes_of(mine[-1])
    assert mine[-1].tenant == "acme"
    assert end["agent_type"] == "reviewer" and end["runner"] == "scripted"
    assert end["status"] == "succeeded" and end["cost"] == pytest.approx(2.0)
    assert (end["tokens_in"], end["tokens_out"]) == (2000, 500)
    assert end["duration_s"] == pytest.approx(first.duration_s)

    lines = [json.loads(line) for _, line in await store.read_log(first.id)]
    assert lines[-1] == {"type": "result", "status": "succeeded", "reason": ""}


async def test_full_queue_is_refused_and_nothing_is_stored(
    tmp_path: Path, store: SqliteTaskStore, bus: InProcessEventBus
) -> None:
    runner = ScriptedRunner()
    pool = new_pool(store, bus, runner, max_concurrency=1, max_queue=2)
    await pool.start(REPLICA)
    try:
        await pool.submit(make_task(tmp_path))
        await eventually(lambda: pool.running == 1)
        await pool.submit(make_task(tmp_path))
        await pool.submit(make_task(tmp_path))
        refused = make_task(tmp_path)
        with pytest.raises(ResourceExhausted):
            await pool.submit(refused)
        with pytest.raises(NotFound):
            await store.get("acme", refused.id)
        runner.release.set()
    finally:
        await pool.stop()


async def test_cancel_queued_and_running_tasks(
    tmp_path: Path, store: SqliteTaskStore, bus: InProcessEventBus, events: Subscription
) -> None:
    runner = ScriptedRunner()
    pool = new_pool(store, bus, runner, max_concurrency=1)
    await pool.start(REPLICA)
    try:
        running = await pool.submit(make_task(tmp_path))
        waiting = await pool.submit(make_task(tmp_path))
        await eventually(lambda: runner.active == 1)

        cancelled = await pool.cancel("acme", waiting.id)
        assert cancelled.status == "cancelled"
        assert (await store.get("acme", waiting.id)).status == "cancelled"

        stopped = await pool.cancel("acme", running.id)
        assert stopped.status == "cancelled"
        assert runner.cancelled == [running.id]
        stored = await store.get("acme", running.id)
        assert stored.status == "cancelled" and stored.finished_at is not None

        # Terminal: returned unchanged; another tenant's task: not found.
        assert (await pool.cancel("acme", running.id)).status == "cancelled"
        with pytest.raises(NotFound):
            await pool.cancel("other", running.id)
        # The queue is first in, first out: had the cancelled task stayed queued, it
        # would start before one submitted now.
        after = await pool.submit(make_task(tmp_path))
        await eventually(lambda: after.id in runner.started)
        assert runner.started == [running.id, after.id]
        runner.release.set()
    finally:
        await pool.stop()
    types = [(e.type, attributes_of(e)["task_id"]) for e in await drain(events)]
    assert ("task.cancelled", waiting.id) in types
    assert ("task.cancelled", running.id) in types


async def test_cancel_stops_a_command_runner(
    tmp_path: Path, store: SqliteTaskStore, bus: InProcessEventBus
) -> None:
    pool = new_pool(store, bus, CommandRunner(["sh", "-c", "echo up; sleep 30"]))
    await pool.start(REPLICA)
    try:
        task = await pool.submit(make_task(tmp_path, runner="command"))
        await eventually(lambda: pool.running == 1)
        await eventually(lambda: store.read_log(task.id))
        assert (await pool.cancel("acme", task.id)).status == "cancelled"
    finally:
        await pool.stop()


async def test_a_runner_that_raises_fails_the_task_and_the_pool_carries_on(
    tmp_path: Path, store: SqliteTaskStore, bus: InProcessEventBus
) -> None:
    ok = ScriptedRunner(hold=False)
    pool = new_pool(store, bus, ok, ExplodingRunner(), max_concurrency=1)
    await pool.start(REPLICA)
    try:
        bad = await pool.submit(make_task(tmp_path, runner="exploding"))
        unknown = await pool.submit(make_task(tmp_path, runner="nope"))
        good = await pool.submit(make_task(tmp_path))
        failed = await wait_terminal(store, bad.id)
        assert (failed.status, failed.reason) == ("failed", "model server on fire")
        missing = await wait_terminal(store, unknown.id)
        assert (missing.status, missing.reason) == ("failed", "unknown runner 'nope'")
        assert (await wait_terminal(store, good.id)).status == "succeeded"
    finally:
        await pool.stop()


async def test_restart_fails_running_tasks_and_runs_queued_ones_in_order(
    tmp_path: Path, store: SqliteTaskStore, bus: InProcessEventBus, events: Subscription
) -> None:
    # What a crashed executor leaves behind.
    crashed = make_task(tmp_path)
    crashed.status = "running"
    crashed.started_at = crashed.created_at
    crashed.owner = REPLICA
    await store.create(crashed)
    queued = [make_task(tmp_path) for _ in range(3)]
    for i, task in enumerate(queued):
        task.created_at += i
        task.owner = REPLICA
        await store.create(task)

    runner = ScriptedRunner(hold=False)
    pool = new_pool(store, bus, runner, max_concurrency=1)
    await pool.start(REPLICA)
    try:
        failed = await store.get("acme", crashed.id)
        assert (failed.status, failed.reason) == ("failed", "executor restarted")
        for task in queued:
            assert (await wait_terminal(store, task.id)).status == "succeeded"
    finally:
        await pool.stop()
    assert runner.started == [t.id for t in queued]
    published = [(e.type, attributes_of(e)) for e in await drain(events)]
    assert ("task.failed", crashed.id, "executor_restarted") in [
        (t, a["task_id"], a.get("cause")) for t, a in published
    ]


async def test_stop_gives_grace_then_fails_running_tasks(
    tmp_path: Path, store: SqliteTaskStore, bus: InProcessEventBus
) -> None:
    runner = ScriptedRunner()
    pool = new_pool(store, bus, runner, max_concurrency=1)
    await pool.start(REPLICA)
    running = await pool.submit(make_task(tmp_path))
    waiting = await pool.submit(make_task(tmp_path))
    await eventually(lambda: runner.active == 1)
    await pool.stop(grace_s=0.1)
    await pool.stop()  # safe twice
    stopped = await store.get("acme", running.id)
    assert (stopped.status, stopped.reason) == ("failed", "executor stopped")
    # Not started: left queued for the next executor.
    assert (await store.get("acme", waiting.id)).status == "queued"


async def test_watch_streams_the_log_then_ends_when_terminal(
    tmp_path: Path, store: SqliteTaskStore, bus: InProcessEventBus
) -> None:
    runner = ScriptedRunner()
    pool = new_pool(store, bus, runner)
    await pool.start(REPLICA)
    try:
        task = await pool.submit(make_task(tmp_path, prompt="the logs"))
        with pytest.raises(NotFound):
            async for _ in pool.watch("other", task.id):
                pass
        seen: list[dict[str, Any]] = []

        async def follow() -> None:
            async for seq, line in pool.watch("acme", task.id):
                assert seq == len(seen)
                seen.append(json.loads(line))
                if len(seen) == 1:
                    runner.release.set()

        await asyncio.wait_for(follow(), 5)
    finally:
        await pool.stop()
    assert seen == [
        {"type": "delta", "text": "working on the logs"},
        {"type": "delta", "text": "done"},
        {"type": "result", "status": "succeeded", "reason": ""},
    ]
    # A finished task's log replays whole, and the watch ends at once.
    assert [seq async for seq, _ in pool.watch("acme", task.id)] == [0, 1, 2]


async def test_a_new_pool_on_the_same_file_recovers_after_a_crash(
    tmp_path: Path, bus: InProcessEventBus
) -> None:
    path = tmp_path / "tasks.db"
    first_store = SqliteTaskStore(path)
    await first_store.open()
    held = ScriptedRunner()
    first = new_pool(first_store, bus, held, max_concurrency=1)
    await first.start(REPLICA)
    running = await first.submit(make_task(tmp_path))
    queued = [await first.submit(make_task(tmp_path)) for _ in range(2)]
    await eventually(lambda: held.active == 1)
    # The crash: the first executor loses its store mid-task and writes nothing more.
    await first_store.close()

    second_store = SqliteTaskStore(path)
    await second_store.open()
    runner = ScriptedRunner(hold=False)
    second = new_pool(second_store, bus, runner, max_concurrency=1)
    try:
        await second.start(REPLICA)
        failed = await second_store.get("acme", running.id)
        assert (failed.status, failed.reason) == ("failed", "executor restarted")
        for task in queued:
            assert (await wait_terminal(second_store, task.id)).status == "succeeded"
        assert runner.started == [t.id for t in queued]
    finally:
        await second.stop()
        await first.stop(grace_s=0)
        await second_store.close()
