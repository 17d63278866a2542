"""Deleting tasks (by id, by tenant), their retention and the workspace sweep, on a real
SQLite store, a real task pool and real directories."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.executor.tasks import pool as pool_module
from services.executor.tasks.erasure import TaskErasure
from services.executor.tasks.pool import TaskPool
from services.executor.tasks.records import LogWriter, RunOutcome, TaskRecord, new_task_id
from services.executor.tasks.store import SqliteTaskStore
from services.executor.tasks.workspaces import TaskWorkspaces
from tests.waiting import eventually
from threadline.errors import FailedPrecondition, NotFound
from threadline.events import EventPublisher, InProcessEventBus, Subscription, attributes_of
from threadline.v1.events_pb2 import LifecycleEvent

REPLICA = "executor-0:50053"
CANARY = "canary-5d2e"


class FileWriter:
    """Writes a file holding the prompt into the workspace, then waits until released
    (or ends at once when `hold` is off)."""

    name = "writer"

    def __init__(self, *, hold: bool = False) -> None:
        self.hold = hold
        self.release = asyncio.Event()
        self.started: set[str] = set()

    async def run(self, task: TaskRecord, log: LogWriter) -> RunOutcome:
        write_notes(Path(task.workspace), task.prompt)
        await log({"type": "delta", "text": task.prompt})
        self.started.add(task.id)
        if self.hold:
            await self.release.wait()
        return RunOutcome("succeeded")


def write_notes(workspace: Path, text: str) -> None:
    workspace.mkdir(parents=True, exist_ok=True)
    (workspace / "notes.txt").write_text(text)


def on_disk(path: str | Path) -> bool:
    return os.path.lexists(path)


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
    subscription = await bus.subscribe()
    yield subscription
    await subscription.close()


@pytest.fixture
def runner() -> FileWriter:
    return FileWriter()


@pytest.fixture
async def pool(
    store: SqliteTaskStore, bus: InProcessEventBus, runner: FileWriter
) -> AsyncIterator[TaskPool]:
    tasks = TaskPool(store, {runner.name: runner}, EventPublisher(bus, "executor"))
    await tasks.start(REPLICA)
    yield tasks
    runner.release.set()
    await tasks.stop(grace_s=1)


@pytest.fixture
def workspaces(tmp_path: Path) -> TaskWorkspaces:
    return TaskWorkspaces(tmp_path / "ws" / "tasks", quiet_s=0)


@pytest.fixture
def erasure(
    store: SqliteTaskStore, pool: TaskPool, workspaces: TaskWorkspaces, bus: InProcessEventBus
) -> TaskErasure:
    return TaskErasure(store, pool, workspaces, EventPublisher(bus, "executor"), retention_s=60)


async def submit(
    pool: TaskPool, workspaces: TaskWorkspaces, tenant: str = "acme", workspace: str = ""
) -> TaskRecord:
    task_id = new_task_id()
    record = TaskRecord(
        id=task_id,
        tenant=tenant,
        prompt=f"{CANARY} for {tenant}",
        agent_type="writer",
        runner="writer",
        workspace=str(workspaces.directory(tenant, workspace or task_id)),
    )
    return await pool.submit(record)


async def ended(store: SqliteTaskStore, task: TaskRecord) -> TaskRecord:
    async def terminal() -> TaskRecord | None:
        stored = await store.get(task.tenant, task.id)
        return stored if stored.terminal else None

    return await eventually(terminal)


async def drain(subscription: Subscription) -> list[LifecycleEvent]:
    """Every event published so far (the in-process bus delivers synchronously)."""
    out: list[LifecycleEvent] = []
    events = aiter(subscription)
    while True:
        try:
            out.append(await asyncio.wait_for(anext(events), 0.05))
        except TimeoutError:
            return out


def tree_holds(root: Path, text: str) -> bool:
    return any(
        text in path.read_text(errors="replace") for path in root.rglob("*") if path.is_file()
    )


async def test_a_deleted_task_leaves_no_record_log_workspace_or_text_in_events(
    store: SqliteTaskStore,
    pool: TaskPool,
    workspaces: TaskWorkspaces,
    erasure: TaskErasure,
    events: Subscription,
) -> None:
    task = await ended(store, await submit(pool, workspaces))
    kept = await ended(store, await submit(pool, workspaces))
    assert on_disk(task.workspace)

    with pytest.raises(NotFound):
        await erasure.delete("other", task.id)
    erased = await erasure.delete("acme", task.id)
    assert (erased.tasks, erased.workspaces, erased.still_running) == (1, 1, 0)
    assert erased.log_lines == 2  # the runner's line and the result line
    assert not on_disk(task.workspace)
    with pytest.raises(NotFound):
        await store.get("acme", task.id)
    assert await store.read_log(task.id) == []
    with pytest.raises(NotFound):
        await erasure.delete("acme", task.id)
    # The other task is untouched.
    assert (Path(kept.workspace) / "notes.txt").read_text() == kept.prompt
    assert len(await store.read_log(kept.id)) == 2

    published = await drain(events)
    deleted = [e for e in published if e.type == "task.deleted"]
    assert [(e.tenant, attributes_of(e)["task_id"]) for e in deleted] == [("acme", task.id)]
    assert all(CANARY not in str(e) for e in deleted)


async def test_a_running_task_is_cancelled_then_deleted(
    store: SqliteTaskStore,
    pool: TaskPool,
    runner: FileWriter,
    workspaces: TaskWorkspaces,
    erasure: TaskErasure,
) -> None:
    runner.hold = True
    task = await submit(pool, workspaces)
    await eventually(lambda: task.id in runner.started)
    erased = await erasure.delete("acme", task.id)
    assert (erased.tasks, erased.workspaces) == (1, 1)
    assert not on_disk(task.workspace)
    with pytest.raises(NotFound):
        await store.get("acme", task.id)


async def test_a_task_still_running_after_its_cancel_is_refused_and_kept(
    store: SqliteTaskStore,
    bus: InProcessEventBus,
    runner: FileWriter,
    workspaces: TaskWorkspaces,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Another replica, alive, runs it and has not acted on the cancel yet.
    monkeypatch.setattr(pool_module, "CANCEL_WAIT_S", 0.3)
    await store.heartbeat("executor-1:50053", 30)
    task = TaskRecord(
        id=new_task_id(),
        tenant="acme",
        prompt=CANARY,
        agent_type="writer",
        runner="writer",
        workspace=str(workspaces.directory("acme", "shared")),
        status="running",
        owner="executor-1:50053",
    )
    await store.create(task)
    # Started after the other replica's heartbeat, so its sweep never takes it for dead.
    pool = TaskPool(store, {runner.name: runner}, EventPublisher(bus, "executor"))
    await pool.start(REPLICA)
    erasure = TaskErasure(store, pool, workspaces, EventPublisher(bus, "executor"))
    try:
        with pytest.raises(FailedPrecondition, match="still running"):
            await erasure.delete("acme", task.id)
        stored = await store.get("acme", task.id)
        assert stored.status == "running" and stored.cancel_requested_at is not None
    finally:
        await pool.stop(grace_s=1)


async def test_tenant_deletion_counts_what_it_had_to_leave(
    store: SqliteTaskStore,
    bus: InProcessEventBus,
    runner: FileWriter,
    workspaces: TaskWorkspaces,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A task another live replica runs and has not stopped yet: it stays, counted.
    monkeypatch.setattr(pool_module, "CANCEL_WAIT_S", 0.3)
    await store.heartbeat("executor-1:50053", 30)
    stuck = TaskRecord(
        id=new_task_id(),
        tenant="acme",
        prompt=CANARY,
        agent_type="writer",
        runner="writer",
        workspace=str(workspaces.directory("acme", "stuck")),
        status="running",
        owner="executor-1:50053",
    )
    await store.create(stuck)
    pool = TaskPool(store, {runner.name: runner}, EventPublisher(bus, "executor"))
    await pool.start(REPLICA)
    erasure = TaskErasure(store, pool, workspaces, EventPublisher(bus, "executor"))
    try:
        done = await ended(store, await submit(pool, workspaces))
        erased = await erasure.delete_tenant("acme")
        assert (erased.tasks, erased.still_running) == (1, 1)
        assert [t.id for t in await store.list("acme")] == [stuck.id]
        with pytest.raises(NotFound):
            await store.get("acme", done.id)
        # Once its replica has ended it, the next call takes it.
        stuck = await store.get("acme", stuck.id)
        stuck.status, stuck.finished_at = "cancelled", time.time()
        assert await store.update_if(stuck, if_status="running", if_owner="executor-1:50053")
        again = await erasure.delete_tenant("acme")
        assert (again.tasks, again.still_running) == (1, 0)
    finally:
        await pool.stop(grace_s=1)


async def test_a_shared_workspace_goes_with_the_last_task_that_names_it(
    store: SqliteTaskStore,
    pool: TaskPool,
    workspaces: TaskWorkspaces,
    erasure: TaskErasure,
) -> None:
    first = await ended(store, await submit(pool, workspaces, workspace="shared"))
    second = await ended(store, await submit(pool, workspaces, workspace="shared"))
    assert first.workspace == second.workspace

    assert (await erasure.delete("acme", first.id)).workspaces == 0
    assert on_disk(first.workspace)
    assert (await erasure.delete("acme", second.id)).workspaces == 1
    assert not on_disk(first.workspace)
    # The tenant's directory went with its last workspace.
    assert not on_disk(Path(first.workspace).parent)


async def test_tenant_deletion_takes_every_task_of_the_tenant_and_nothing_else(
    store: SqliteTaskStore,
    pool: TaskPool,
    runner: FileWriter,
    workspaces: TaskWorkspaces,
    erasure: TaskErasure,
    tmp_path: Path,
) -> None:
    done = [await ended(store, await submit(pool, workspaces)) for _ in range(2)]
    theirs = await ended(store, await submit(pool, workspaces, tenant="other"))
    runner.hold = True
    running = [await submit(pool, workspaces) for _ in range(2)]
    await eventually(lambda: runner.started >= {task.id for task in running})
    queued = await submit(pool, workspaces)  # two workers per pool by default: it waits
    assert (await store.get("acme", queued.id)).status == "queued"

    erased = await erasure.delete_tenant("acme")
    assert (erased.tasks, erased.still_running) == (5, 0)
    assert erased.workspaces == 4  # the queued task never made one
    assert await store.list("acme") == []
    for task in (*done, *running, queued):
        assert await store.read_log(task.id) == []
    tenant_dir = Path(done[0].workspace).parent
    assert not on_disk(tenant_dir)
    assert not tree_holds(tmp_path / "ws", f"{CANARY} for acme")
    assert await store.get("other", theirs.id) == theirs
    assert on_disk(theirs.workspace)
    assert (await erasure.delete_tenant("acme")).tasks == 0


async def test_retention_removes_tasks_that_ended_long_enough_ago(
    store: SqliteTaskStore,
    pool: TaskPool,
    workspaces: TaskWorkspaces,
    erasure: TaskErasure,
    events: Subscription,
) -> None:
    old = await ended(store, await submit(pool, workspaces))
    recent = await ended(store, await submit(pool, workspaces))
    # It ended two minutes ago; retention_s is 60.
    old.finished_at = time.time() - 120
    await store.update(old)

    erased = await erasure.sweep()
    assert (erased.tasks, erased.workspaces) == (1, 1)
    with pytest.raises(NotFound):
        await store.get("acme", old.id)
    assert not on_disk(old.workspace)
    assert await store.get("acme", recent.id) == recent
    assert on_disk(recent.workspace)
    expired = [e for e in await drain(events) if e.type == "task.expired"]
    assert [attributes_of(e)["task_id"] for e in expired] == [old.id]


async def test_the_sweep_removes_workspaces_no_stored_task_names(
    store: SqliteTaskStore,
    pool: TaskPool,
    workspaces: TaskWorkspaces,
    erasure: TaskErasure,
) -> None:
    kept = await ended(store, await submit(pool, workspaces))
    # Left on this replica by a task another replica deleted.
    orphan = workspaces.directory("acme", new_task_id())
    write_notes(orphan, CANARY)
    # Still settling (a task may be starting in it): left to a later sweep.
    workspaces.quiet_s = 60
    fresh = workspaces.directory("acme", "fresh")
    fresh.mkdir()
    old = time.time() - 120
    os.utime(orphan, (old, old))
    os.utime(kept.workspace, (old, old))
    # Not a tenant key: left alone (the layout before tenant keys, or not ours).
    stranger = workspaces.root / "acme" / "notes"
    stranger.mkdir(parents=True)
    os.utime(stranger, (old, old))

    assert (await erasure.sweep()).workspaces == 1
    assert not on_disk(orphan)
    assert on_disk(fresh) and on_disk(stranger)
    assert on_disk(kept.workspace)


def test_any_tenant_string_becomes_a_directory_under_the_root(
    workspaces: TaskWorkspaces,
) -> None:
    for tenant in ("../../etc", "/abs", "a/b", "", "é" * 300, "."):
        directory = workspaces.directory(tenant, "ws")
        assert directory.parent.parent == workspaces.root
        assert len(directory.parent.name) == 16
    assert workspaces.directory("a/b", "ws") != workspaces.directory("a_b", "ws")
