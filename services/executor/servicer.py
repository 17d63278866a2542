"""gRPC adapter for the executor: proto in, domain call, proto out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc.aio
from google.protobuf import timestamp_pb2

from services.executor.tasks.erasure import Erased
from services.executor.tasks.pool import TaskPool
from services.executor.tasks.records import (
    LIST_LIMIT_DEFAULT,
    LIST_LIMIT_MAX,
    TASK_STATUSES,
    TaskRecord,
    is_task_id,
)
from services.executor.tasks.service import TaskService
from services.executor.tasks.store import TaskStore
from services.executor.turns.admission import TurnQueue
from services.executor.turns.turn import TurnRunner
from threadline import errors
from threadline.v1 import executor_pb2, executor_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]


def _timestamp(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    if seconds is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def task_proto(task: TaskRecord) -> executor_pb2.Task:
    message = executor_pb2.Task(
        id=task.id,
        tenant=task.tenant,
        prompt=task.prompt,
        agent_type=task.agent_type,
        runner=task.runner,
        workspace=task.workspace,
        status=task.status,
        reason=task.reason,
        model=task.model,
        tokens_in=task.tokens_in,
        tokens_out=task.tokens_out,
        cost=task.cost,
        budget_tokens=task.budget_tokens,
        created_at=_timestamp(task.created_at),
        started_at=_timestamp(task.started_at),
        finished_at=_timestamp(task.finished_at),
        duration_ms=int((task.duration_s or 0) * 1000),
    )
    if task.exit_code is not None:
        message.exit_code = task.exit_code
    return message


def _task_id(task_id: str) -> str:
    if not is_task_id(task_id):
        raise errors.InvalidArgument(f"malformed task id {task_id[:80]!r}")
    return task_id


class ExecutorServicer(executor_pb2_grpc.ExecutorServicer):
    def __init__(
        self,
        turns: TurnRunner,
        tasks: TaskService,
        pool: TaskPool,
        store: TaskStore,
        queue: TurnQueue,
    ) -> None:
        self.turns = turns
        self.queue = queue
        self.tasks = tasks
        self.pool = pool
        self.store = store

    async def RunTurn(
        self, request: executor_pb2.RunTurnRequest, context: Context
    ) -> AsyncIterator[executor_pb2.TurnEvent]:
        async with self.queue.place(request.tenant, request.session_id):
            async for event in self.turns.run(request):
                yield event

    async def SubmitTask(
        self, request: executor_pb2.TasksSubmitRequest, context: Context
    ) -> executor_pb2.Task:
        task = await self.tasks.submit(
            request.tenant,
            request.prompt,
            agent_type=request.agent_type,
            workspace=request.workspace,
            budget_tokens=request.budget_tokens,
        )
        return task_proto(task)

    async def GetTask(
        self, request: executor_pb2.TasksGetRequest, context: Context
    ) -> executor_pb2.Task:
        return task_proto(await self.store.get(request.tenant, _task_id(request.task_id)))

    async def ListTasks(
        self, request: executor_pb2.TasksListRequest, context: Context
    ) -> executor_pb2.TaskList:
        if request.status and request.status not in TASK_STATUSES:
            raise errors.InvalidArgument(
                f"unknown status {request.status[:40]!r}: expected one of "
                f"{', '.join(sorted(TASK_STATUSES))}"
            )
        if not 0 <= request.limit <= LIST_LIMIT_MAX:
            raise errors.InvalidArgument(
                f"limit must be in [0, {LIST_LIMIT_MAX}], got {request.limit}"
            )
        tasks = await self.store.list(
            request.tenant, status=request.status, limit=request.limit or LIST_LIMIT_DEFAULT
        )
        return executor_pb2.TaskList(tasks=[task_proto(t) for t in tasks])

    async def CancelTask(
        self, request: executor_pb2.TasksCancelRequest, context: Context
    ) -> executor_pb2.Task:
        return task_proto(await self.pool.cancel(request.tenant, _task_id(request.task_id)))

    async def WatchTask(
        self, request: executor_pb2.TasksWatchRequest, context: Context
    ) -> AsyncIterator[executor_pb2.TaskLogEntry]:
        async for seq, line in self.pool.watch(request.tenant, _task_id(request.task_id)):
            yield executor_pb2.TaskLogEntry(seq=seq, json=line)

    async def DeleteTask(
        self, request: executor_pb2.TasksDeleteRequest, context: Context
    ) -> executor_pb2.TasksDeleted:
        erased = await self.tasks.erasure.delete(request.tenant, _task_id(request.task_id))
        return _deleted_proto(erased)

    async def DeleteTenantTasks(
        self, request: executor_pb2.DeleteTenantTasksRequest, context: Context
    ) -> executor_pb2.TasksDeleted:
        if not request.tenant:
            raise errors.InvalidArgument("tenant is required")
        return _deleted_proto(await self.tasks.erasure.delete_tenant(request.tenant))


def _deleted_proto(erased: Erased) -> executor_pb2.TasksDeleted:
    return executor_pb2.TasksDeleted(
        tasks=erased.tasks,
        log_lines=erased.log_lines,
        workspaces=erased.workspaces,
        still_running=erased.still_running,
    )
