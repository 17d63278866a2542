"""Typed Python client for the gateway, the public API.

    async with GatewayClient("127.0.0.1:50051", api_key="...") as client:
        session = await client.create_session(system_prompt="Be brief.")
        async for event in client.converse(session.id, "Hello"):
            ...

Failures raise the matching `threadline.errors.ThreadlineError` subclass
(`NotFound`, `Aborted`, `Unauthenticated`, ...), never a raw grpc error.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType

import grpc
import grpc.aio

from threadline.channels import ChannelSecurity, connect, streaming, unary
from threadline.v1 import (
    events_pb2,
    executor_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    memory_pb2,
    session_pb2,
)


class GatewayClient:
    def __init__(
        self,
        address: str,
        *,
        api_key: str,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        """`credentials` for a gateway serving TLS, e.g. `grpc.ssl_channel_credentials(ca)`."""
        self.address = address
        self._metadata = (("authorization", f"Bearer {api_key}"),)
        self._channel: grpc.aio.Channel = connect(address, ChannelSecurity(credentials))
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)

    async def __aenter__(self) -> GatewayClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def create_session(
        self,
        *,
        model: str = "",
        system_prompt: str = "",
        title: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> session_pb2.Session:
        request = gateway_pb2.CreateSessionRequest(
            model=model, system_prompt=system_prompt, title=title, metadata=metadata or {}
        )
        return await unary(self._stub.CreateSession(request, metadata=self._metadata))

    async def get_session(
        self, session_id: str, *, include_messages: bool = True, verify_chain: bool = False
    ) -> session_pb2.SessionDetail:
        request = gateway_pb2.GetSessionRequest(
            session_id=session_id, include_messages=include_messages, verify_chain=verify_chain
        )
        return await unary(self._stub.GetSession(request, metadata=self._metadata))

    async def list_sessions(
        self, *, page_size: int = 0, page_token: str = ""
    ) -> session_pb2.SessionList:
        request = gateway_pb2.ListSessionsRequest(page_size=page_size, page_token=page_token)
        return await unary(self._stub.ListSessions(request, metadata=self._metadata))

    async def fork_session(self, session_id: str, at_hash: str) -> session_pb2.Session:
        request = gateway_pb2.ForkSessionRequest(session_id=session_id, at_hash=at_hash)
        return await unary(self._stub.ForkSession(request, metadata=self._metadata))

    async def delete_session(self, session_id: str, *, with_descendants: bool = False) -> list[str]:
        """Deletes the session (and what derives from it, when asked): the ids deleted.
        Its memory and workspace are erased after it (event session.erased)."""
        request = gateway_pb2.DeleteSessionRequest(
            session_id=session_id, with_descendants=with_descendants
        )
        response = await unary(self._stub.DeleteSession(request, metadata=self._metadata))
        return list(response.deleted_session_ids)

    async def list_derived_sessions(self, session_id: str) -> list[session_pb2.Session]:
        """The forks and compactions of the session, and theirs."""
        request = gateway_pb2.ListDerivedSessionsRequest(session_id=session_id)
        response = await unary(self._stub.ListDerivedSessions(request, metadata=self._metadata))
        return list(response.sessions)

    async def erase_tenant(self, tenant: str = "") -> session_pb2.EraseTenantResponse:
        """Deletes every session and task of the tenant ("" for the key's own; another
        tenant needs an admin key); event tenant.erased when all is gone."""
        request = session_pb2.EraseTenantRequest(tenant=tenant)
        return await unary(self._stub.EraseTenant(request, metadata=self._metadata))

    async def export_session(self, session_id: str) -> list[str]:
        request = gateway_pb2.ExportSessionRequest(session_id=session_id)
        response = await unary(self._stub.ExportSession(request, metadata=self._metadata))
        return list(response.lines)

    async def import_session(self, lines: Sequence[str]) -> session_pb2.Session:
        request = gateway_pb2.ImportSessionRequest(lines=list(lines))
        return await unary(self._stub.ImportSession(request, metadata=self._metadata))

    async def compact_session(self, session_id: str, *, wait: bool = True) -> memory_pb2.Job:
        """Move the session to a new, compacted one; the job's new_session_id names it."""
        request = gateway_pb2.CompactSessionRequest(session_id=session_id, wait=wait)
        return await unary(self._stub.CompactSession(request, metadata=self._metadata))

    async def get_memory_job(self, job_id: str) -> memory_pb2.Job:
        request = gateway_pb2.GetMemoryJobRequest(job_id=job_id)
        return await unary(self._stub.GetMemoryJob(request, metadata=self._metadata))

    async def submit_task(
        self, prompt: str, *, agent_type: str = "", workspace: str = "", budget_tokens: int = 0
    ) -> executor_pb2.Task:
        request = gateway_pb2.SubmitTaskRequest(
            prompt=prompt,
            agent_type=agent_type,
            workspace=workspace,
            budget_tokens=budget_tokens,
        )
        return await unary(self._stub.SubmitTask(request, metadata=self._metadata))

    async def get_task(self, task_id: str) -> executor_pb2.Task:
        request = gateway_pb2.GetTaskRequest(task_id=task_id)
        return await unary(self._stub.GetTask(request, metadata=self._metadata))

    async def list_tasks(self, *, status: str = "", limit: int = 0) -> executor_pb2.TaskList:
        request = gateway_pb2.ListTasksRequest(status=status, limit=limit)
        return await unary(self._stub.ListTasks(request, metadata=self._metadata))

    async def cancel_task(self, task_id: str) -> executor_pb2.Task:
        request = gateway_pb2.CancelTaskRequest(task_id=task_id)
        return await unary(self._stub.CancelTask(request, metadata=self._metadata))

    async def delete_task(self, task_id: str) -> executor_pb2.TasksDeleted:
        """Removes the task, its output log and its workspace; one that has not ended is
        cancelled first (FailedPrecondition if it is still running after that)."""
        request = gateway_pb2.DeleteTaskRequest(task_id=task_id)
        return await unary(self._stub.DeleteTask(request, metadata=self._metadata))

    def watch_task(self, task_id: str) -> AsyncIterator[executor_pb2.TaskLogEntry]:
        """The task's output log (stream-json lines) from the start, until it ends."""
        request = gateway_pb2.WatchTaskRequest(task_id=task_id)
        return streaming(self._stub.WatchTask(request, metadata=self._metadata))

    def converse(
        self,
        session_id: str,
        text: str,
        *,
        model: str = "",
        max_tokens: int = 0,
        temperature: float | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[executor_pb2.TurnEvent]:
        """Stream one turn: started, deltas, then done. Leaving the loop cancels the turn."""
        options = executor_pb2.TurnOptions(model=model, max_tokens=max_tokens)
        if temperature is not None:
            options.temperature = temperature
        request = gateway_pb2.ConverseRequest(session_id=session_id, input=text, options=options)
        return streaming(self._stub.Converse(request, metadata=self._metadata, timeout=timeout))

    def watch_events(
        self, *, types: Sequence[str] = (), session_id: str = ""
    ) -> AsyncIterator[events_pb2.LifecycleEvent]:
        request = gateway_pb2.WatchEventsRequest(types=list(types), session_id=session_id)
        return streaming(self._stub.WatchEvents(request, metadata=self._metadata))
