"""One conversation turn: context, model stream, persistence, events.

The user's message is stored before the model is asked, so what the user said
is never lost. The answer is stored when it ends; a cut answer (upstream
failure mid-stream, client gone, shutdown) is stored as it stands with
`interrupted = true`: what the user saw is never lost either.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from services.executor.turns.leases import TurnLeases
from services.executor.turns.tools import ToolBox
from threadline import errors
from threadline.events import EventPublisher
from threadline.logs import get_logger
from threadline.v1 import (
    common_pb2,
    executor_pb2,
    llm_pb2,
    memory_pb2,
    session_pb2,
)

log = get_logger(__name__)


class Sessions(Protocol):
    async def get(
        self,
        tenant: str,
        session_id: str,
        *,
        include_messages: bool = ...,
        verify_chain: bool = ...,
        from_seq: int = ...,
    ) -> session_pb2.SessionDetail: ...

    async def append(
        self,
        tenant: str,
        session_id: str,
        expected_head: str,
        messages: Sequence[common_pb2.Message],
        *,
        request_id: str = ...,
    ) -> session_pb2.AppendResponse: ...

    async def build_context(
        self, request: session_pb2.BuildContextRequest
    ) -> session_pb2.BuildContextResponse: ...

    async def calibrate(self, model: str, prompt_chars: int, prompt_tokens: int) -> float: ...


class Memory(Protocol):
    async def recall(
        self, tenant: str, session_id: str, *, query: str = ..., budget_tokens: int = ...
    ) -> memory_pb2.RecallResponse: ...

    async def compact(
        self, request: memory_pb2.JobRequest, *, timeout: float | None = ...
    ) -> memory_pb2.Job: ...

    async def record_activity(
        self, request: memory_pb2.RecordActivityRequest, *, timeout: float | None = ...
    ) -> memory_pb2.RecordActivityResponse: ...


class Llm(Protocol):
    def stream_chat(
        self, request: llm_pb2.ChatRequest, *, timeout: float | None = ...
    ) -> AsyncIterator[llm_pb2.ChatChunk]: ...


@dataclass(frozen=True)
class TurnLimits:
    context_budget_tokens: int
    max_output_tokens: int
    max_iterations: int = 8
    #: Fraction of context_budget_tokens past which a request inside a tool loop is
    #: preceded by a compaction of the session; 0 = never.
    compact_request_threshold: float = 0.0
    #: How long a turn waits for a compaction before going on without it.
    compact_timeout_s: float = 180.0


@dataclass
class TurnRunner:
    sessions: Sessions
    memory: Memory
    llm: Llm
    leases: TurnLeases
    events: EventPublisher
    limits: TurnLimits
    #: The tools for a session, or None when tools are not offered to the model.
    tools: Callable[[str], ToolBox] | None = None
    #: Model → (price per 1k prompt tokens, per 1k completion tokens).
    prices: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    #: Writes of partial answers that must finish even though their turn was cancelled.
    pending_writes: set[asyncio.Task[None]] = field(default_factory=set)

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Wait (boundedly) for partial answers still being stored (called on shutdown)."""
        if self.pending_writes:
            log.info("turn.draining_writes", count=len(self.pending_writes))
            _, pending = await asyncio.wait(self.pending_writes, timeout=timeout_s)
            if pending:
                log.error("turn.partial_writes_abandoned", count=len(pending))

    async def run(
        self, request: executor_pb2.RunTurnRequest
    ) -> AsyncIterator[executor_pb2.TurnEvent]:
        if not request.tenant:
            raise errors.InvalidArgument("tenant is required")
        if not request.input.strip():
            raise errors.InvalidArgument("input is empty: send the user's message")
        # Ownership first: another tenant must get NOT_FOUND, never "session busy".
        session = (await self.sessions.get(request.tenant, request.session_id)).session
        async with contextlib.AsyncExitStack() as leases:
            await leases.enter_async_context(self.leases.hold(request.session_id))
            async for event in self._run(request, session, leases):
                yield event

    async def _append(
        self,
        tenant: str,
        session_id: str,
        head: str,
        messages: Sequence[common_pb2.Message],
        request_id: str,
    ) -> str:
        """Append after `head`; if someone else appended meanwhile, append after theirs.

        The turn holds the session's lease, so a moved head means a direct Append
        by another client: our messages still belong at the end. The request id
        makes a retry after a lost reply safe: the store appends it at most once.
        """
        for attempt in range(5):
            try:
                response = await self.sessions.append(
                    tenant, session_id, head, messages, request_id=request_id
                )
                return response.head
            except errors.HeadMismatch as exc:
                head = exc.current_head
            except (errors.Unavailable, errors.DeadlineExceeded):
                if attempt == 4:
                    raise
                await asyncio.sleep(0.1 * 2**attempt)
        raise errors.Aborted(f"session {session_id} keeps changing under the turn; retry")

    async def _run(
        self,
        request: executor_pb2.RunTurnRequest,
        session: session_pb2.Session,
        leases: contextlib.AsyncExitStack,
    ) -> AsyncIterator[executor_pb2.TurnEvent]:
        tenant, session_id = request.tenant, request.session_id
        turn_id = "turn_" + uuid.uuid4().hex
        started = time.perf_counter()
        model = request.options.model or session.model
        recalled = await self._recall(tenant, session_id, request.input)
        if recalled.compact_due:
            # The last turn's prompt, as the model server counted it, passed
            # memory.compact_threshold: this turn starts in a compacted session.
            compacted = await self._compact(tenant, session_id, "pre_run", leases)
            if compacted is not None:
                session_id, session = compacted.compacted.to_session_id, compacted.session
                recalled = await self._recall(tenant, session_id, request.input)
                yield compacted.event
        head = await self._append(
            tenant,
            session_id,
            session.head,
            [common_pb2.Message(role=common_pb2.ROLE_USER, content=request.input)],
            f"{turn_id}:input",
        )
        self.events.emit(
            "turn.started",
            tenant=tenant,
            session_id=session_id,
            turn_id=turn_id,
            model=model or None,
        )
        yield executor_pb2.TurnEvent(
            started=executor_pb2.TurnStarted(turn_id=turn_id, session_id=session_id)
        )
        max_tokens = request.options.max_tokens or self.limits.max_output_tokens
        toolbox = self.tools(session_id) if self.tools is not None else None
        usage = common_pb2.Usage()
        calls = 0
        last_prompt_tokens = 0
        compacted_in_turn = False
        while True:
            calls += 1
            try:
                context = await self._context(
                    tenant, session_id, model, max_tokens, recalled.context
                )
                if (
                    calls > 1
                    and not compacted_in_turn
                    and self._over_request_threshold(context, last_prompt_tokens)
                ):
                    compacted_in_turn = True
                    compacted = await self._compact(tenant, session_id, "mid_turn", leases)
                    if compacted is not None:
                        session_id = compacted.compacted.to_session_id
                        head = compacted.session.head
                        recalled = await self._recall(tenant, session_id, request.input)
                        yield compacted.event
                        context = await self._context(
                            tenant, session_id, model, max_tokens, recalled.context
                        )
            except errors.ThreadlineError as exc:
                self._failed(tenant, session_id, turn_id, started, exc)
                raise
            chat = llm_pb2.ChatRequest(
                model=model,
                messages=context.messages,
                max_tokens=max_tokens,
                tenant=tenant,
                session_id=session_id,
                tools=toolbox.specs() if toolbox is not None else [],
            )
            if request.options.HasField("temperature"):
                chat.temperature = request.options.temperature
            text: list[str] = []
            done: llm_pb2.ChatDone | None = None
            try:
                async for chunk in self.llm.stream_chat(chat):
                    kind = chunk.WhichOneof("chunk")
                    if kind == "delta":
                        text.append(chunk.delta)
                        yield executor_pb2.TurnEvent(delta=chunk.delta)
                    elif kind == "tool_call_delta":
                        yield executor_pb2.TurnEvent(tool_call_delta=chunk.tool_call_delta)
                    elif kind == "done":
                        done = chunk.done
            except asyncio.CancelledError:
                # Client gone or shutdown past its grace: keep what the user already saw.
                self._store_partial_detached(
                    tenant, session_id, head, turn_id, started, "".join(text), "turn cancelled"
                )
                raise
            except errors.ThreadlineError as exc:
                if not text:
                    self._failed(tenant, session_id, turn_id, started, exc)
                    raise
                done = llm_pb2.ChatDone(
                    finish_reason=common_pb2.FINISH_REASON_INTERRUPTED,
                    content="".join(text),
                    error=exc.message,
                )
            if done is None:
                done = llm_pb2.ChatDone(
                    finish_reason=common_pb2.FINISH_REASON_INTERRUPTED,
                    content="".join(text),
                    error="the model stream ended without a result",
                )
            _add_usage(usage, done.usage)
            last_prompt_tokens = done.usage.prompt_tokens
            wants_tools = (
                toolbox is not None
                and bool(done.tool_calls)
                and done.finish_reason == common_pb2.FINISH_REASON_TOOL_CALLS
            )
            if wants_tools and toolbox is not None and calls < self.limits.max_iterations:
                round_ = ToolRound(self, tenant, session_id, turn_id, calls, head)
                async for event in round_.run(toolbox, done):
                    yield event
                head = round_.head
                continue
            if wants_tools:
                # A model that keeps calling tools is stopped; its unexecuted calls are not
                # stored (a call without its result is illegal in a conversation).
                done.finish_reason = common_pb2.FINISH_REASON_LENGTH
                done.error = f"stopped after {calls} model calls (max_iterations)"
                del done.tool_calls[:]
            break
        interrupted = done.finish_reason == common_pb2.FINISH_REASON_INTERRUPTED
        answer = common_pb2.Message(
            role=common_pb2.ROLE_ASSISTANT, content=done.content, interrupted=interrupted
        )
        try:
            head = await self._append(tenant, session_id, head, [answer], f"{turn_id}:answer")
        except asyncio.CancelledError:
            self._store_partial_detached(
                tenant, session_id, head, turn_id, started, done.content, "turn cancelled"
            )
            raise
        latency_ms = int((time.perf_counter() - started) * 1000)
        price_in, price_out = self.prices.get(done.model, (0.0, 0.0))
        cost = usage.prompt_tokens / 1000 * price_in + usage.completion_tokens / 1000 * price_out
        if not interrupted and not done.usage_estimated and done.usage.prompt_tokens:
            await self._calibrate(model or "default", context.messages, done.usage.prompt_tokens)
        self._record_activity_detached(
            tenant,
            session_id,
            model,
            0 if done.usage_estimated else last_prompt_tokens,
        )
        self.events.emit(
            "turn.interrupted" if interrupted else "turn.completed",
            tenant=tenant,
            session_id=session_id,
            turn_id=turn_id,
            model=done.model,
            upstream=done.upstream,
            finish_reason=common_pb2.FinishReason.Name(done.finish_reason),
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            model_calls=calls,
            cost=cost,
            latency_ms=latency_ms,
            error=done.error or None,
        )
        yield executor_pb2.TurnEvent(
            done=executor_pb2.TurnDone(
                turn_id=turn_id,
                finish_reason=done.finish_reason,
                usage=usage,
                model=done.model,
                upstream=done.upstream,
                head=head,
                content=done.content,
                latency_ms=latency_ms,
                error=done.error,
                model_calls=calls,
                cost=cost,
                session_id=session_id,
            )
        )

    def _over_request_threshold(
        self, context: session_pb2.BuildContextResponse, last_prompt_tokens: int
    ) -> bool:
        """Would the next request pass compact_request_threshold? Judged by the larger of
        the prompt the server counted last time (it only grows inside a tool loop) and
        the calibrated estimate of the prompt about to be sent."""
        threshold = self.limits.compact_request_threshold
        if not threshold:
            return False
        prompt = max(context.token_estimate, last_prompt_tokens)
        return prompt > threshold * self.limits.context_budget_tokens

    async def _compact(
        self, tenant: str, session_id: str, trigger: str, leases: contextlib.AsyncExitStack
    ) -> Compacted | None:
        """Compact through memory and take the new session's lease; None when it did not
        happen (refused, failed, memory down): the turn goes on where it was."""
        try:
            job = await self.memory.compact(
                memory_pb2.JobRequest(
                    tenant=tenant, session_id=session_id, wait=True, trigger=trigger
                ),
                timeout=self.limits.compact_timeout_s,
            )
        except errors.ThreadlineError as exc:
            log.warning("turn.compaction_skipped", trigger=trigger, error=exc.message)
            return None
        if job.state != memory_pb2.JOB_STATE_SUCCEEDED or not job.new_session_id:
            log.warning("turn.compaction_failed", trigger=trigger, job_id=job.id, error=job.error)
            return None
        await leases.enter_async_context(self.leases.hold(job.new_session_id))
        session = (await self.sessions.get(tenant, job.new_session_id)).session
        compacted = executor_pb2.TurnCompacted(
            from_session_id=session_id,
            to_session_id=job.new_session_id,
            job_id=job.id,
            trigger=trigger,
        )
        return Compacted(compacted, session)

    async def _context(
        self, tenant: str, session_id: str, model: str, max_tokens: int, memory: str
    ) -> session_pb2.BuildContextResponse:
        return await self.sessions.build_context(
            session_pb2.BuildContextRequest(
                tenant=tenant,
                session_id=session_id,
                budget_tokens=self.limits.context_budget_tokens,
                reserve_output_tokens=max_tokens,
                memory_summary=memory,
                model=model or "default",
            )
        )

    async def _calibrate(
        self, model: str, messages: Sequence[common_pb2.Message], prompt_tokens: int
    ) -> None:
        """Tell the session store what the server counted for this prompt, so its
        estimates for this model follow the real tokenizer (best effort)."""
        chars = sum(
            len(m.content) + sum(len(c.name) + len(c.arguments_json) for c in m.tool_calls)
            for m in messages
        )
        if not chars:
            return
        try:
            await self.sessions.calibrate(model, chars, prompt_tokens)
        except errors.ThreadlineError as exc:
            log.warning("turn.calibration_failed", error=exc.message)

    async def _recall(self, tenant: str, session_id: str, query: str) -> memory_pb2.RecallResponse:
        # Memory is an enhancement: a turn goes on without it rather than failing.
        try:
            return await self.memory.recall(tenant, session_id, query=query)
        except errors.ThreadlineError as exc:
            log.warning("turn.recall_failed", error=exc.message)
            return memory_pb2.RecallResponse()

    def _record_activity_detached(
        self, tenant: str, session_id: str, model: str, prompt_tokens: int
    ) -> None:
        """Tell memory what the turn cost, after the turn: its jobs run beside the
        next turns and never delay this one."""

        async def record() -> None:
            try:
                await self.memory.record_activity(
                    memory_pb2.RecordActivityRequest(
                        tenant=tenant,
                        session_id=session_id,
                        model=model,
                        prompt_tokens=prompt_tokens,
                        context_window_tokens=self.limits.context_budget_tokens,
                    ),
                    timeout=10.0,
                )
            except errors.ThreadlineError as exc:
                log.warning("turn.record_activity_failed", error=exc.message)

        task = asyncio.create_task(record(), name=f"record-activity-{session_id}")
        self.pending_writes.add(task)
        task.add_done_callback(self.pending_writes.discard)

    def _failed(
        self,
        tenant: str,
        session_id: str,
        turn_id: str,
        started: float,
        exc: errors.ThreadlineError,
    ) -> None:
        self.events.emit(
            "turn.failed",
            tenant=tenant,
            session_id=session_id,
            turn_id=turn_id,
            code=exc.code,
            error=exc.message,
            latency_ms=int((time.perf_counter() - started) * 1000),
        )

    def _store_partial_detached(
        self,
        tenant: str,
        session_id: str,
        head: str,
        turn_id: str,
        started: float,
        content: str,
        reason: str,
    ) -> None:
        async def store() -> None:
            if content:
                message = common_pb2.Message(
                    role=common_pb2.ROLE_ASSISTANT, content=content, interrupted=True
                )
                try:
                    await self._append(tenant, session_id, head, [message], f"{turn_id}:answer")
                except errors.ThreadlineError as exc:
                    log.error("turn.partial_lost", session_id=session_id, error=exc.message)
            self.events.emit(
                "turn.interrupted",
                tenant=tenant,
                session_id=session_id,
                turn_id=turn_id,
                error=reason,
                partial_chars=len(content),
                latency_ms=int((time.perf_counter() - started) * 1000),
            )

        task = asyncio.create_task(store(), name=f"store-partial-{turn_id}")
        self.pending_writes.add(task)
        task.add_done_callback(self.pending_writes.discard)


@dataclass(frozen=True)
class Compacted:
    compacted: executor_pb2.TurnCompacted
    #: The new session, as the turn goes on in it.
    session: session_pb2.Session

    @property
    def event(self) -> executor_pb2.TurnEvent:
        return executor_pb2.TurnEvent(compacted=self.compacted)


def _add_usage(total: common_pb2.Usage, more: common_pb2.Usage) -> None:
    total.prompt_tokens += more.prompt_tokens
    total.completion_tokens += more.completion_tokens
    total.cached_tokens += more.cached_tokens
    total.total_tokens += more.total_tokens


@dataclass
class ToolRound:
    """One round of tool calls: the assistant's calls, then each result, all stored.

    Every message is appended as it completes, so a crash loses at most the one in
    flight; if the turn is cancelled mid-round, the calls not yet run get a
    "cancelled" result, so the log never holds a call without its answer.
    """

    runner: TurnRunner
    tenant: str
    session_id: str
    turn_id: str
    call_number: int
    head: str

    async def run(
        self, toolbox: ToolBox, done: llm_pb2.ChatDone
    ) -> AsyncIterator[executor_pb2.TurnEvent]:
        prefix = f"{self.turn_id}:{self.call_number}"
        assistant = common_pb2.Message(
            role=common_pb2.ROLE_ASSISTANT, content=done.content, tool_calls=done.tool_calls
        )
        self.head = await self.runner._append(
            self.tenant, self.session_id, self.head, [assistant], f"{prefix}:assistant"
        )
        for index, call in enumerate(done.tool_calls):
            try:
                result = await toolbox.call(call.name, call.arguments_json)
            except asyncio.CancelledError:
                self._answer_the_rest_detached(done.tool_calls[index:], prefix, index)
                raise
            if result.status == "denied":
                self.runner.events.emit(
                    "tool.denied",
                    tenant=self.tenant,
                    session_id=self.session_id,
                    turn_id=self.turn_id,
                    tool=call.name,
                    tool_call_id=call.id,
                    reason=result.reason,
                )
            message = common_pb2.Message(
                role=common_pb2.ROLE_TOOL,
                tool_call_id=call.id,
                name=call.name,
                content=result.content,
            )
            self.head = await self.runner._append(
                self.tenant, self.session_id, self.head, [message], f"{prefix}:tool:{index}"
            )
            yield executor_pb2.TurnEvent(
                tool_result=executor_pb2.ToolResult(
                    tool_call_id=call.id,
                    name=call.name,
                    content=result.content,
                    status=result.status,
                )
            )

    def _answer_the_rest_detached(
        self, calls: Sequence[common_pb2.ToolCall], prefix: str, first: int
    ) -> None:
        async def store() -> None:
            messages = [
                common_pb2.Message(
                    role=common_pb2.ROLE_TOOL,
                    tool_call_id=call.id,
                    name=call.name,
                    content="cancelled: the turn ended before this tool ran",
                )
                for call in calls
            ]
            try:
                await self.runner._append(
                    self.tenant, self.session_id, self.head, messages, f"{prefix}:cancelled:{first}"
                )
            except errors.ThreadlineError as exc:
                log.error("turn.tool_results_lost", session_id=self.session_id, error=exc.message)

        task = asyncio.create_task(store(), name=f"cancel-tools-{self.turn_id}")
        self.runner.pending_writes.add(task)
        task.add_done_callback(self.runner.pending_writes.discard)
