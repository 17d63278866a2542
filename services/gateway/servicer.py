"""The public gRPC API: authenticate, validate, forward, relay."""

from __future__ import annotations

import asyncio
import fnmatch
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import structlog

from services.gateway import validation
from services.gateway.auth import ApiKeyAuthenticator, Caller
from threadline import errors
from threadline.cancellation import cancel_and_wait
from threadline.channels import streaming
from threadline.events import EventBus, Subscription
from threadline.ids import validate_memory_job_id, validate_session_id, validate_task_id
from threadline.peers import ExecutorClient, MemoryClient, SessionClient
from threadline.v1 import (
    events_pb2,
    executor_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    memory_pb2,
    session_pb2,
)

Context = grpc.aio.ServicerContext[Any, Any]


async def _until(
    subscription: Subscription, stop: asyncio.Event
) -> AsyncIterator[events_pb2.LifecycleEvent]:
    """The subscription's events until `stop` is set (or the consumer goes away)."""
    events = aiter(subscription)
    stopped = asyncio.ensure_future(stop.wait())
    following: asyncio.Future[events_pb2.LifecycleEvent] | None = None
    try:
        while True:
            following = asyncio.ensure_future(anext(events))
            await asyncio.wait({following, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not following.done():
                return
            yield following.result()
    finally:
        # Never leave a read in flight: closing the subscription under it would fail it
        # with nobody to collect the error.
        for task in (following, stopped):
            if task is not None:
                await cancel_and_wait(task)


@dataclass(frozen=True)
class InputLimits:
    max_input_chars: int


def _caller(auth: ApiKeyAuthenticator, context: Context) -> Caller:
    metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
    caller = auth.authenticate(metadata.get("authorization"))
    structlog.contextvars.bind_contextvars(tenant=caller.tenant)
    return caller


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(
        self,
        auth: ApiKeyAuthenticator,
        sessions: SessionClient,
        executor: ExecutorClient,
        memory: MemoryClient,
        bus: EventBus,
        limits: InputLimits,
    ) -> None:
        self.auth = auth
        self.sessions = sessions
        self.executor = executor
        self.memory = memory
        self.bus = bus
        self.limits = limits
        self._draining = asyncio.Event()

    async def end_watches(self) -> None:
        """End every WatchEvents stream: they never finish on their own."""
        self._draining.set()

    async def CreateSession(
        self, request: gateway_pb2.CreateSessionRequest, context: Context
    ) -> session_pb2.Session:
        caller = _caller(self.auth, context)
        if len(request.system_prompt) > self.limits.max_input_chars:
            raise errors.InvalidArgument(
                f"system_prompt is {len(request.system_prompt)} characters; the limit is "
                f"{self.limits.max_input_chars}"
            )
        return await self.sessions.create(
            session_pb2.SessionsCreateRequest(
                tenant=caller.tenant,
                model=request.model,
                system_prompt=request.system_prompt,
                title=request.title,
                metadata=request.metadata,
            )
        )

    async def GetSession(
        self, request: gateway_pb2.GetSessionRequest, context: Context
    ) -> session_pb2.SessionDetail:
        caller = _caller(self.auth, context)
        validate_session_id(request.session_id)
        return await self.sessions.get(
            caller.tenant,
            request.session_id,
            include_messages=request.include_messages,
            verify_chain=request.verify_chain,
        )

    async def ListSessions(
        self, request: gateway_pb2.ListSessionsRequest, context: Context
    ) -> session_pb2.SessionList:
        caller = _caller(self.auth, context)
        validation.check_length("page_token", request.page_token, validation.MAX_PAGE_TOKEN_CHARS)
        return await self.sessions.list(
            caller.tenant, page_size=request.page_size, page_token=request.page_token
        )

    async def ForkSession(
        self, request: gateway_pb2.ForkSessionRequest, context: Context
    ) -> session_pb2.Session:
        caller = _caller(self.auth, context)
        validate_session_id(request.session_id)
        validation.check_at_hash(request.at_hash)
        return await self.sessions.fork(caller.tenant, request.session_id, request.at_hash)

    async def DeleteSession(
        self, request: gateway_pb2.DeleteSessionRequest, context: Context
    ) -> session_pb2.DeleteResponse:
        caller = _caller(self.auth, context)
        validate_session_id(request.session_id)
        deleted = await self.sessions.delete(
            caller.tenant, request.session_id, with_descendants=request.with_descendants
        )
        return session_pb2.DeleteResponse(deleted_session_ids=deleted)

    async def ListDerivedSessions(
        self, request: gateway_pb2.ListDerivedSessionsRequest, context: Context
    ) -> session_pb2.SessionList:
        caller = _caller(self.auth, context)
        validate_session_id(request.session_id)
        return await self.sessions.list_derived(caller.tenant, request.session_id)

    async def EraseTenant(
        self, request: session_pb2.EraseTenantRequest, context: Context
    ) -> session_pb2.EraseTenantResponse:
        caller = _caller(self.auth, context)
        validation.check_length("tenant", request.tenant, validation.MAX_TENANT_CHARS)
        tenant = request.tenant or caller.tenant
        if tenant != caller.tenant and not caller.admin:
            # The same answer whether or not the named tenant exists.
            raise errors.PermissionDenied("only an admin key may erase another tenant")
        # Tasks first: a task still running for the tenant must not outlive its sessions'
        # erasure by writing into a workspace afterwards.
        tasks = await self.executor.delete_tenant_tasks(tenant)
        response = await self.sessions.erase_tenant(tenant)
        response.tasks = tasks.tasks
        response.tasks_still_running = tasks.still_running
        return response

    async def ExportSession(
        self, request: gateway_pb2.ExportSessionRequest, context: Context
    ) -> session_pb2.ExportResponse:
        caller = _caller(self.auth, context)
        validate_session_id(request.session_id)
        lines = await self.sessions.export(caller.tenant, request.session_id)
        return session_pb2.ExportResponse(lines=lines)

    async def ImportSession(
        self, request: gateway_pb2.ImportSessionRequest, context: Context
    ) -> session_pb2.Session:
        caller = _caller(self.auth, context)
        return await self.sessions.import_session(caller.tenant, request.lines)

    async def CompactSession(
        self, request: gateway_pb2.CompactSessionRequest, context: Context
    ) -> memory_pb2.Job:
        caller = _caller(self.auth, context)
        validate_session_id(request.session_id)
        return await self.memory.compact(
            memory_pb2.JobRequest(
                tenant=caller.tenant, session_id=request.session_id, wait=request.wait
            ),
            timeout=context.time_remaining(),
        )

    async def GetMemoryJob(
        self, request: gateway_pb2.GetMemoryJobRequest, context: Context
    ) -> memory_pb2.Job:
        caller = _caller(self.auth, context)
        validate_memory_job_id(request.job_id)
        return await self.memory.get_job(caller.tenant, request.job_id)

    async def SubmitTask(
        self, request: gateway_pb2.SubmitTaskRequest, context: Context
    ) -> executor_pb2.Task:
        caller = _caller(self.auth, context)
        validation.check_length("agent_type", request.agent_type, validation.MAX_AGENT_TYPE_CHARS)
        validation.check_length("workspace", request.workspace, validation.MAX_WORKSPACE_CHARS)
        return await self.executor.submit_task(
            executor_pb2.TasksSubmitRequest(
                tenant=caller.tenant,
                prompt=request.prompt,
                agent_type=request.agent_type,
                workspace=request.workspace,
                budget_tokens=request.budget_tokens,
            )
        )

    async def GetTask(
        self, request: gateway_pb2.GetTaskRequest, context: Context
    ) -> executor_pb2.Task:
        caller = _caller(self.auth, context)
        validate_task_id(request.task_id)
        return await self.executor.get_task(caller.tenant, request.task_id)

    async def ListTasks(
        self, request: gateway_pb2.ListTasksRequest, context: Context
    ) -> executor_pb2.TaskList:
        caller = _caller(self.auth, context)
        validation.check_length("status", request.status, validation.MAX_STATUS_CHARS)
        return await self.executor.list_tasks(caller.tenant, request.status, request.limit)

    async def CancelTask(
        self, request: gateway_pb2.CancelTaskRequest, context: Context
    ) -> executor_pb2.Task:
        caller = _caller(self.auth, context)
        validate_task_id(request.task_id)
        return await self.executor.cancel_task(caller.tenant, request.task_id)

    async def DeleteTask(
        self, request: gateway_pb2.DeleteTaskRequest, context: Context
    ) -> executor_pb2.TasksDeleted:
        caller = _caller(self.auth, context)
        validate_task_id(request.task_id)
        return await self.executor.delete_task(caller.tenant, request.task_id)

    async def WatchTask(
        self, request: gateway_pb2.WatchTaskRequest, context: Context
    ) -> AsyncIterator[executor_pb2.TaskLogEntry]:
        caller = _caller(self.auth, context)
        validate_task_id(request.task_id)
        async for entry in streaming(self.executor.watch_task(caller.tenant, request.task_id)):
            yield entry

    async def Converse(
        self, request: gateway_pb2.ConverseRequest, context: Context
    ) -> AsyncIterator[executor_pb2.TurnEvent]:
        caller = _caller(self.auth, context)
        validate_session_id(request.session_id)
        structlog.contextvars.bind_contextvars(session_id=request.session_id)
        if not request.input.strip():
            raise errors.InvalidArgument("input is empty: send the user's message")
        if len(request.input) > self.limits.max_input_chars:
            raise errors.InvalidArgument(
                f"input is {len(request.input)} characters; the limit is "
                f"{self.limits.max_input_chars}"
            )
        # The options' values are the executor's to judge (it knows the models and the
        # context budget); their size is checked here.
        validation.check_length("options.model", request.options.model, validation.MAX_MODEL_CHARS)
        # Unknown and other tenants' sessions are the executor's NOT_FOUND, its first
        # check: asking the session service here too cost every turn a call.
        call = self.executor.run_turn(
            executor_pb2.RunTurnRequest(
                tenant=caller.tenant,
                session_id=request.session_id,
                input=request.input,
                options=request.options,
            ),
            timeout=context.time_remaining(),
        )
        # Leaving early (our caller left, or we failed) cancels the turn: never orphaned.
        async for event in streaming(call):
            yield event

    async def WatchEvents(
        self, request: gateway_pb2.WatchEventsRequest, context: Context
    ) -> AsyncIterator[events_pb2.LifecycleEvent]:
        caller = _caller(self.auth, context)
        if request.session_id:
            validate_session_id(request.session_id)
        validation.check_event_patterns(request.types)
        patterns = list(request.types)
        subscription = await self.bus.subscribe()
        try:
            async for event in _until(subscription, self._draining):
                if not caller.admin and event.tenant != caller.tenant:
                    continue
                if request.session_id and event.session_id != request.session_id:
                    continue
                if patterns and not any(fnmatch.fnmatchcase(event.type, p) for p in patterns):
                    continue
                yield event
        finally:
            await subscription.close()
