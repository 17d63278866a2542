"""Removing tasks: one on request (DeleteTask), every one of a tenant (tenant erasure),
and the ended ones older than the retention (the sweep).

A task goes whole: its record and output log in one store transaction, then its
workspace. Only an ended task is removed, so nothing writes to a task after it is
gone; one that has not ended is cancelled first, as CancelTask does. The record
goes before the workspace: if the replica dies in between, the workspace sweep
(`TaskWorkspaces.collect`, on every replica) removes the directory no task names.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

from services.executor.tasks.pool import TaskPool
from services.executor.tasks.records import LIST_LIMIT_MAX, TaskRecord
from services.executor.tasks.store import TasksRemoved, TaskStore, task_not_found
from services.executor.tasks.workspaces import TaskWorkspaces
from threadline.cancellation import cancel_and_wait
from threadline.errors import FailedPrecondition, NotFound
from threadline.events import EventPublisher
from threadline.logs import get_logger

log = get_logger(__name__)

#: Tasks one retention step removes; the sweep repeats steps until none is left.
RETENTION_BATCH = 100


@dataclass(frozen=True)
class Erased:
    """What a removal took, by count."""

    tasks: int = 0
    log_lines: int = 0
    #: Workspace directories removed on this replica.
    workspaces: int = 0
    #: Tasks of the tenant still stored after a tenant deletion: not ended after their
    #: cancel, or submitted meanwhile (counted up to LIST_LIMIT_MAX).
    still_running: int = 0


@dataclass
class TaskErasure:
    store: TaskStore
    pool: TaskPool
    workspaces: TaskWorkspaces
    events: EventPublisher
    #: Ended tasks older than this go (seconds since they ended); 0 keeps them.
    retention_s: float = 0.0
    #: How often the sweep (retention, then unused workspaces) runs.
    sweep_s: float = 60.0
    _loop: asyncio.Task[None] | None = field(default=None, repr=False)
    _stopping: bool = field(default=False, repr=False)

    async def delete(self, tenant: str, task_id: str) -> Erased:
        """Remove the tenant's task; NotFound for an unknown id or another tenant's
        task, FailedPrecondition for one that is still running after its cancel."""
        task = await self.store.get(tenant, task_id)
        if not task.terminal:
            task = await self.pool.cancel(tenant, task_id)
            if not task.terminal:
                raise FailedPrecondition(
                    f"task {task_id} is still {task.status}: its cancel is requested; "
                    "delete it once it has ended",
                    details={"task_id": task_id},
                )
        removed = await self.store.delete_ended(tenant, task_id)
        if not removed.tasks:
            # Another call removed it in the meantime.
            raise task_not_found(task_id)
        return await self._finish(removed, "task.deleted")

    async def delete_tenant(self, tenant: str) -> Erased:
        """Remove every task of the tenant: the unfinished ones are cancelled first
        (concurrently), those still running after that are left and counted."""
        unfinished = [
            task
            for status in ("queued", "running")
            for task in await self.store.by_status(status)
            if task.tenant == tenant
        ]
        await asyncio.gather(*(self._cancel(task) for task in unfinished))
        removed = await self.store.delete_tenant_ended(tenant)
        erased = await self._finish(removed, "")
        # Whatever of the tenant is still stored: a task that outlived its cancel wait,
        # or one submitted meanwhile. The caller calls again until it is 0.
        left = len(await self.store.list(tenant, limit=LIST_LIMIT_MAX))
        log.info("tasks.tenant_deleted", tasks=erased.tasks, still_running=left)
        return Erased(erased.tasks, erased.log_lines, erased.workspaces, left)

    async def sweep(self) -> Erased:
        """Remove the tasks that ended more than retention_s ago, then the workspaces
        on this replica that no stored task names. Replicas sweep independently: each
        expired task is removed, and announced, by one of them."""
        removed = TasksRemoved()
        if self.retention_s > 0:
            cutoff = time.time() - self.retention_s
            while not self._stopping:
                step = await self.store.delete_ended_before(cutoff, RETENTION_BATCH)
                removed += step
                if len(step.tasks) < RETENTION_BATCH:
                    break
        erased = await self._finish(removed, "task.expired")
        collected = await self.workspaces.collect(self.store)
        return Erased(erased.tasks, erased.log_lines, erased.workspaces + collected)

    async def _cancel(self, task: TaskRecord) -> None:
        with contextlib.suppress(NotFound):
            await self.pool.cancel(task.tenant, task.id)

    async def _finish(self, removed: TasksRemoved, event: str) -> Erased:
        """Remove the removed tasks' workspaces and announce each task's end."""
        paths = {task.workspace for task in removed.tasks}
        workspaces = await self.workspaces.remove_unused(self.store, paths)
        # Ids only: the prompt, the workspace's name and the reason are the tenant's
        # text, and events outlive the task.
        for task in removed.tasks if event else []:
            self.events.emit(event, tenant=task.tenant, task_id=task.id, status=task.status)
        return Erased(len(removed.tasks), removed.log_lines, workspaces)

    # -- the sweep's loop -----------------------------------------------------------

    def start(self) -> None:
        if self._loop is None:
            self._loop = asyncio.create_task(self._sweeps(), name="task-retention")

    async def stop(self) -> None:
        """Stop sweeping; safe to call twice."""
        # The flag as well as the cancel: the Redis client can swallow a cancellation
        # that lands mid-command (threadline/cancellation.py).
        self._stopping = True
        if self._loop is not None:
            await cancel_and_wait(self._loop)
            self._loop = None

    async def _sweeps(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.sweep_s)
            try:
                erased = await self.sweep()
            except Exception:
                log.warning("tasks.sweep_failed", exc_info=True)
                continue
            if erased.tasks or erased.workspaces:
                log.info("tasks.swept", tasks=erased.tasks, workspaces=erased.workspaces)
