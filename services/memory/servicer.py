"""gRPC adapter for memory: proto in, domain call, proto out."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc.aio

from services.memory.jobs import JobKind, MemoryJobs
from services.memory.pacing import TurnActivity
from services.memory.recall import recall
from services.memory.store import MemoryStore
from threadline import errors
from threadline.ids import validate_memory_job_id, validate_session_id
from threadline.peer_protocols import SessionGetter
from threadline.v1 import common_pb2, memory_pb2, memory_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]

_TRIGGERS = ("request", "pre_run", "mid_turn")


def _check(tenant: str, session_id: str) -> None:
    if not tenant:
        raise errors.InvalidArgument("tenant is required")
    validate_session_id(session_id)


class MemoryServicer(memory_pb2_grpc.MemoryServicer):
    def __init__(
        self,
        jobs: MemoryJobs,
        store: MemoryStore,
        sessions: SessionGetter,
        *,
        wait_timeout_s: float,
        recall_budget_tokens: int,
        turns: TurnActivity | None = None,
    ) -> None:
        self.jobs = jobs
        self.store = store
        #: Every call about a session asks the session service first: a deleted
        #: session is NOT_FOUND here at once, not only after memory erased it.
        self.sessions = sessions
        self.wait_timeout_s = wait_timeout_s
        self.recall_budget_tokens = recall_budget_tokens
        #: Every turn recalls first: background jobs give way while turns run.
        self.turns = turns or TurnActivity()

    async def RecordActivity(
        self, request: memory_pb2.RecordActivityRequest, context: Context
    ) -> memory_pb2.RecordActivityResponse:
        _check(request.tenant, request.session_id)
        if request.prompt_tokens < 0 or request.context_window_tokens < 0:
            raise errors.InvalidArgument("prompt_tokens and context_window_tokens must be >= 0")
        if not request.session_checked:
            await self.sessions.get(request.tenant, request.session_id)
        # Checked by the caller (a turn that just stored its answer) or just now: a
        # session erased since finds memory's tombstone, and nothing is written.
        return await self.jobs.record_activity(request)

    async def Consolidate(
        self, request: memory_pb2.ConsolidateRequest, context: Context
    ) -> memory_pb2.ConsolidateResponse:
        _check(request.tenant, request.session_id)
        await self.sessions.get(request.tenant, request.session_id)
        job = await self._run(
            request.tenant, request.session_id, "consolidate", "request", request.model, True
        )
        if job.state == memory_pb2.JOB_STATE_FAILED:
            # A job fails when its session is deleted under it: the caller then hears
            # NOT_FOUND, as for any deleted session, whichever came first.
            await self.sessions.get(request.tenant, request.session_id)
            raise errors.Unavailable(
                f"consolidation of session {request.session_id} failed: {job.error}",
                details={"job_id": job.id},
            )
        memory = await self.store.get(request.tenant, request.session_id)
        return memory_pb2.ConsolidateResponse(
            consolidated=job.items > 0,
            offset=memory.offset,
            summary=memory.summary,
            messages_consolidated=job.items,
            usage=_usage(job),
            job=job,
        )

    async def Extract(self, request: memory_pb2.JobRequest, context: Context) -> memory_pb2.Job:
        return await self._job_request(request, "extract")

    async def Compact(self, request: memory_pb2.JobRequest, context: Context) -> memory_pb2.Job:
        return await self._job_request(request, "compact")

    async def GetJob(self, request: memory_pb2.GetJobRequest, context: Context) -> memory_pb2.Job:
        validate_memory_job_id(request.job_id)
        job = await self.jobs.job(request.job_id)
        missing = errors.NotFound(f"memory job {request.job_id!r} not found")
        # Another tenant's job does not exist, as far as this caller can tell; nor
        # does the job of a deleted session, even before memory has erased it.
        if job is None or job.tenant != request.tenant:
            raise missing
        try:
            await self.sessions.get(job.tenant, job.session_id)
        except errors.NotFound:
            raise missing from None
        return job

    async def Recall(
        self, request: memory_pb2.RecallRequest, context: Context
    ) -> memory_pb2.RecallResponse:
        _check(request.tenant, request.session_id)
        self.turns.seen()
        if request.budget_tokens < 0:
            raise errors.InvalidArgument("budget_tokens must be >= 0")
        session = request.tenant, request.session_id
        # The session check beside the reads, not before them: the caller waits for
        # the slower of the two. Nothing read is answered unless the session exists.
        # A turn checks the session itself (first thing, beside this call) and uses
        # this answer only once it holds: asking again would cost every turn a call.
        check = () if request.session_checked else (self.sessions.get(*session),)
        memory, items, *_ = await asyncio.gather(
            self.store.get(*session), self.store.items(*session), *check
        )
        recalled = recall(
            memory.summary,
            items,
            request.query,
            request.budget_tokens or self.recall_budget_tokens,
        )
        return memory_pb2.RecallResponse(
            summary=recalled.summary,
            offset=memory.offset,
            items=[
                memory_pb2.ExtractedItem(
                    kind=i.kind,
                    json=i.json,
                    from_seq=i.from_seq,
                    to_seq=i.to_seq,
                    mentions=i.mentions,
                )
                for i in recalled.items
            ],
            context=recalled.context,
            compact_due=await self.jobs.compact_due(request.tenant, request.session_id),
        )

    async def _job_request(self, request: memory_pb2.JobRequest, kind: JobKind) -> memory_pb2.Job:
        _check(request.tenant, request.session_id)
        trigger = request.trigger or "request"
        if trigger not in _TRIGGERS:
            raise errors.InvalidArgument(
                f"unknown trigger {trigger[:40]!r}; expected one of {', '.join(_TRIGGERS)}"
            )
        await self.sessions.get(request.tenant, request.session_id)
        return await self._run(
            request.tenant, request.session_id, kind, trigger, request.model, request.wait
        )

    async def _run(
        self, tenant: str, session_id: str, kind: JobKind, trigger: str, model: str, wait: bool
    ) -> memory_pb2.Job:
        job = await self.jobs.submit(tenant, session_id, kind, trigger, model)
        if not wait:
            return job
        return await self.jobs.wait(job.id, self.wait_timeout_s)


def _usage(job: memory_pb2.Job) -> common_pb2.Usage:
    return common_pb2.Usage(
        prompt_tokens=int(job.tokens_in),
        completion_tokens=int(job.tokens_out),
        total_tokens=int(job.tokens_in + job.tokens_out),
    )
