"""Typed clients for calls between services; errors arrive as domain errors.

Domain code depends on these small classes (or on Protocols they satisfy),
never on stubs or grpc.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator, Sequence

import grpc.aio

from threadline.channels import ChannelSecurity, connect, streaming, unary
from threadline.v1 import (
    common_pb2,
    executor_pb2,
    executor_pb2_grpc,
    llm_pb2,
    llm_pb2_grpc,
    memory_pb2,
    memory_pb2_grpc,
    session_pb2,
    session_pb2_grpc,
)


class _Peer:
    def __init__(self, address: str, security: ChannelSecurity | None = None) -> None:
        self.address = address
        self.channel: grpc.aio.Channel = connect(address, security)

    async def close(self) -> None:
        await self.channel.close()


class SessionClient(_Peer):
    def __init__(self, address: str, security: ChannelSecurity | None = None) -> None:
        super().__init__(address, security)
        self.stub = session_pb2_grpc.SessionsStub(self.channel)

    async def create(self, request: session_pb2.SessionsCreateRequest) -> session_pb2.Session:
        return await unary(self.stub.Create(request))

    async def get(
        self,
        tenant: str,
        session_id: str,
        *,
        include_messages: bool = False,
        verify_chain: bool = False,
        from_seq: int = 0,
    ) -> session_pb2.SessionDetail:
        return await unary(
            self.stub.Get(
                session_pb2.SessionsGetRequest(
                    tenant=tenant,
                    session_id=session_id,
                    include_messages=include_messages,
                    verify_chain=verify_chain,
                    from_seq=from_seq,
                )
            )
        )

    async def messages_from(
        self, tenant: str, session_id: str, from_seq: int
    ) -> list[common_pb2.Message]:
        detail = await self.get(tenant, session_id, include_messages=True, from_seq=from_seq)
        return list(detail.messages)

    async def list(
        self, tenant: str, *, page_size: int = 0, page_token: str = ""
    ) -> session_pb2.SessionList:
        return await unary(
            self.stub.List(
                session_pb2.SessionsListRequest(
                    tenant=tenant, page_size=page_size, page_token=page_token
                )
            )
        )

    async def append(
        self,
        tenant: str,
        session_id: str,
        expected_head: str,
        messages: Sequence[common_pb2.Message],
        *,
        request_id: str = "",
        calibration: session_pb2.CalibrateRequest | None = None,
    ) -> session_pb2.AppendResponse:
        request = session_pb2.AppendRequest(
            tenant=tenant,
            session_id=session_id,
            expected_head=expected_head,
            messages=messages,
            request_id=request_id,
            calibration=calibration,
        )
        return await unary(self.stub.Append(request))

    async def build_context(
        self, request: session_pb2.BuildContextRequest
    ) -> session_pb2.BuildContextResponse:
        return await unary(self.stub.BuildContext(request))

    async def fork(self, tenant: str, session_id: str, at_hash: str) -> session_pb2.Session:
        return await unary(
            self.stub.Fork(
                session_pb2.ForkRequest(tenant=tenant, session_id=session_id, at_hash=at_hash)
            )
        )

    async def delete(
        self, tenant: str, session_id: str, *, with_descendants: bool = False
    ) -> builtins.list[str]:
        """Delete the session (and its descendants when asked); the ids deleted."""
        response = await unary(
            self.stub.Delete(
                session_pb2.DeleteRequest(
                    tenant=tenant, session_id=session_id, with_descendants=with_descendants
                )
            )
        )
        return list(response.deleted_session_ids)

    async def list_derived(self, tenant: str, session_id: str) -> session_pb2.SessionList:
        return await unary(
            self.stub.ListDerived(
                session_pb2.ListDerivedRequest(tenant=tenant, session_id=session_id)
            )
        )

    async def erase_tenant(self, tenant: str) -> session_pb2.EraseTenantResponse:
        return await unary(self.stub.EraseTenant(session_pb2.EraseTenantRequest(tenant=tenant)))

    async def pending_erasures(
        self, owner: str, limit: int = 0
    ) -> builtins.list[session_pb2.Erasure]:
        response = await unary(
            self.stub.PendingErasures(session_pb2.PendingErasuresRequest(owner=owner, limit=limit))
        )
        return list(response.erasures)

    async def erased_among(self, session_ids: builtins.list[str]) -> builtins.list[str]:
        response = await unary(
            self.stub.ErasedAmong(session_pb2.ErasedAmongRequest(session_ids=session_ids))
        )
        return list(response.session_ids)

    async def acknowledge_erasure(
        self, owner: str, session_id: str, removed: dict[str, int]
    ) -> bool:
        response = await unary(
            self.stub.AcknowledgeErasure(
                session_pb2.AcknowledgeErasureRequest(
                    owner=owner, session_id=session_id, removed=removed
                )
            )
        )
        return response.completed

    async def export(self, tenant: str, session_id: str) -> builtins.list[str]:
        response = await unary(
            self.stub.Export(session_pb2.ExportRequest(tenant=tenant, session_id=session_id))
        )
        return list(response.lines)

    async def import_session(self, tenant: str, lines: Sequence[str]) -> session_pb2.Session:
        return await unary(
            self.stub.Import(session_pb2.ImportRequest(tenant=tenant, lines=list(lines)))
        )

    async def calibrate(self, model: str, prompt_chars: int, prompt_tokens: int) -> float:
        response = await unary(
            self.stub.Calibrate(
                session_pb2.CalibrateRequest(
                    model=model, prompt_chars=prompt_chars, prompt_tokens=prompt_tokens
                )
            )
        )
        return response.chars_per_token


class LlmClient(_Peer):
    def __init__(self, address: str, security: ChannelSecurity | None = None) -> None:
        super().__init__(address, security)
        self.stub = llm_pb2_grpc.LlmProxyStub(self.channel)

    def stream_chat(
        self, request: llm_pb2.ChatRequest, *, timeout: float | None = None
    ) -> AsyncIterator[llm_pb2.ChatChunk]:
        return streaming(self.stub.StreamChat(request, timeout=timeout))

    async def chat(
        self, request: llm_pb2.ChatRequest, *, timeout: float | None = None
    ) -> llm_pb2.ChatResponse:
        return await unary(self.stub.Chat(request, timeout=timeout))

    async def list_models(self, *, timeout: float | None = None) -> llm_pb2.ListModelsResponse:
        return await unary(self.stub.ListModels(llm_pb2.ListModelsRequest(), timeout=timeout))


class MemoryClient(_Peer):
    def __init__(self, address: str, security: ChannelSecurity | None = None) -> None:
        super().__init__(address, security)
        self.stub = memory_pb2_grpc.MemoryStub(self.channel)

    async def recall(
        self,
        tenant: str,
        session_id: str,
        *,
        query: str = "",
        budget_tokens: int = 0,
        session_checked: bool = False,
    ) -> memory_pb2.RecallResponse:
        request = memory_pb2.RecallRequest(
            tenant=tenant,
            session_id=session_id,
            query=query,
            budget_tokens=budget_tokens,
            session_checked=session_checked,
        )
        return await unary(self.stub.Recall(request))

    async def record_activity(
        self, request: memory_pb2.RecordActivityRequest, *, timeout: float | None = None
    ) -> memory_pb2.RecordActivityResponse:
        return await unary(self.stub.RecordActivity(request, timeout=timeout))

    async def consolidate(
        self, tenant: str, session_id: str, model: str = ""
    ) -> memory_pb2.ConsolidateResponse:
        return await unary(
            self.stub.Consolidate(
                memory_pb2.ConsolidateRequest(tenant=tenant, session_id=session_id, model=model)
            )
        )

    async def extract(self, request: memory_pb2.JobRequest) -> memory_pb2.Job:
        return await unary(self.stub.Extract(request))

    async def compact(
        self, request: memory_pb2.JobRequest, *, timeout: float | None = None
    ) -> memory_pb2.Job:
        return await unary(self.stub.Compact(request, timeout=timeout))

    async def get_job(self, tenant: str, job_id: str) -> memory_pb2.Job:
        return await unary(self.stub.GetJob(memory_pb2.GetJobRequest(tenant=tenant, job_id=job_id)))


class ExecutorClient(_Peer):
    def __init__(self, address: str, security: ChannelSecurity | None = None) -> None:
        super().__init__(address, security)
        self.stub = executor_pb2_grpc.ExecutorStub(self.channel)

    async def submit_task(self, request: executor_pb2.TasksSubmitRequest) -> executor_pb2.Task:
        return await unary(self.stub.SubmitTask(request))

    async def get_task(self, tenant: str, task_id: str) -> executor_pb2.Task:
        return await unary(
            self.stub.GetTask(executor_pb2.TasksGetRequest(tenant=tenant, task_id=task_id))
        )

    async def list_tasks(
        self, tenant: str, status: str = "", limit: int = 0
    ) -> executor_pb2.TaskList:
        return await unary(
            self.stub.ListTasks(
                executor_pb2.TasksListRequest(tenant=tenant, status=status, limit=limit)
            )
        )

    async def cancel_task(self, tenant: str, task_id: str) -> executor_pb2.Task:
        return await unary(
            self.stub.CancelTask(executor_pb2.TasksCancelRequest(tenant=tenant, task_id=task_id))
        )

    async def delete_task(self, tenant: str, task_id: str) -> executor_pb2.TasksDeleted:
        return await unary(
            self.stub.DeleteTask(executor_pb2.TasksDeleteRequest(tenant=tenant, task_id=task_id))
        )

    async def delete_tenant_tasks(self, tenant: str) -> executor_pb2.TasksDeleted:
        """Every task of the tenant; call again while `still_running` is not 0."""
        return await unary(
            self.stub.DeleteTenantTasks(executor_pb2.DeleteTenantTasksRequest(tenant=tenant))
        )

    def watch_task(
        self, tenant: str, task_id: str, *, timeout: float | None = None
    ) -> grpc.aio.UnaryStreamCall[executor_pb2.TasksWatchRequest, executor_pb2.TaskLogEntry]:
        return self.stub.WatchTask(
            executor_pb2.TasksWatchRequest(tenant=tenant, task_id=task_id), timeout=timeout
        )

    def run_turn(
        self, request: executor_pb2.RunTurnRequest, *, timeout: float | None = None
    ) -> grpc.aio.UnaryStreamCall[executor_pb2.RunTurnRequest, executor_pb2.TurnEvent]:
        """The raw call: the gateway relays it and cancels it when its own caller goes."""
        return self.stub.RunTurn(request, timeout=timeout)
