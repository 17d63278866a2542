"""One conversation turn: context, model stream, persistence, events.

The user's message is stored before any of the answer is relayed, so what the
user said is never lost; the append runs beside the context and the opening of
the model's stream (`pending_input`), off the way to the first token. The answer
is stored when it ends; a cut answer (upstream failure mid-stream, client gone,
shutdown) is stored as it stands with `interrupted = true`: what the user saw is
never lost either.

Whatever a turn can be refused for is checked before the input is stored (see
`admission`). A turn reads like the design: prepare (recall, pre-run
compaction, store the input), model calls (each with a fresh context, tool
rounds in between), finish (store the answer, cost, calibration, events).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from services.executor.model_call import ModelCall, ReadInterrupts
from services.executor.turns.admission import ModelCatalog, check_input, check_options
from services.executor.turns.detached import DetachedWrites
from services.executor.turns.drafts import Checkpoints, Drafts, LocalDrafts, store_draft
from services.executor.turns.leases import TurnLeases, lease_lost
from services.executor.turns.peers import Llm, Memory, Sessions
from services.executor.turns.pending_input import PendingInput
from services.executor.turns.tool_round import ToolRound
from services.executor.turns.tools import ToolBox
from services.executor.turns.writer import SessionWriter
from threadline import errors
from threadline.events import EventPublisher
from threadline.leases import HeldLease
from threadline.logs import get_logger
from threadline.v1 import common_pb2, executor_pb2, llm_pb2, memory_pb2, session_pb2

log = get_logger(__name__)
SHUTTING_DOWN = "the server is shutting down; retry the turn"
#: How long before the grace period ends running turns are told to finish.
_FINAL_EVENT_MARGIN_S = 2.0


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
class _Turn:
    """What one turn carries from step to step (and from one model call to the next)."""

    request: executor_pb2.RunTurnRequest
    session_id: str
    #: The lease on `session_id` (the new session's, after a compaction).
    lease: HeldLease
    #: The session's head: moves with every message the turn stores.
    head: str
    model: str
    max_tokens: int
    turn_id: str = field(default_factory=lambda: "turn_" + uuid.uuid4().hex)
    started: float = field(default_factory=time.perf_counter)
    recalled: memory_pb2.RecallResponse = field(default_factory=memory_pb2.RecallResponse)
    toolbox: ToolBox | None = None
    usage: common_pb2.Usage = field(default_factory=common_pb2.Usage)
    calls: int = 0
    #: Prompt tokens the server counted for the last call.
    last_prompt_tokens: int = 0
    compacted_in_turn: bool = False
    #: The user's message while its append is under way (see `pending_input`).
    pending_input: PendingInput | None = None
    #: Recall asked for when the turn arrived, for the first recall of the session.
    early_recall: asyncio.Future[memory_pb2.RecallResponse] | None = None
    #: The last model call's prompt and result.
    context: session_pb2.BuildContextResponse = field(
        default_factory=session_pb2.BuildContextResponse
    )
    done: llm_pb2.ChatDone = field(default_factory=llm_pb2.ChatDone)
    #: From the turn's start to its first answer delta (what a user waits for).
    first_delta_ms: int | None = None

    @property
    def tenant(self) -> str:
        return self.request.tenant

    @property
    def latency_ms(self) -> int:
        return int((time.perf_counter() - self.started) * 1000)


@dataclass(frozen=True)
class Compacted:
    compacted: executor_pb2.TurnCompacted
    #: The new session, as the turn goes on in it, and the turn's lease on it.
    session: session_pb2.Session
    lease: HeldLease

    @property
    def event(self) -> executor_pb2.TurnEvent:
        return executor_pb2.TurnEvent(compacted=self.compacted)


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
    #: Writes that must finish even though their turn was cancelled.
    detached: DetachedWrites = field(default_factory=DetachedWrites)
    #: Stops the model calls of running turns at shutdown (see `shutdown`).
    interrupts: ReadInterrupts = field(default_factory=ReadInterrupts)
    #: Answers being streamed, for the next turn to store if this process dies.
    drafts: Drafts = field(default_factory=LocalDrafts)

    def __post_init__(self) -> None:
        self.writer = SessionWriter(self.sessions, self.detached)
        self.models = ModelCatalog(self.llm)
        self._shutdown_timer: asyncio.TimerHandle | None = None

    async def shutdown(self, grace_s: float) -> None:
        """Drain hook: turns still running shortly before the grace period ends stop
        reading the model, store what they have as interrupted and send their final
        event, so no client is left with a cancelled call."""
        delay = max(0.0, grace_s - min(_FINAL_EVENT_MARGIN_S, grace_s / 2))
        loop = asyncio.get_running_loop()
        self._shutdown_timer = loop.call_later(delay, self.hurry)

    def hurry(self) -> None:
        """End running turns now (a second SIGTERM or Ctrl-C)."""
        self.interrupts.fire(SHUTTING_DOWN)

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Wait (boundedly) for partial answers still being stored (called on shutdown)."""
        if self._shutdown_timer is not None:
            self._shutdown_timer.cancel()
        await self.detached.drain(timeout_s)

    async def run(
        self, request: executor_pb2.RunTurnRequest
    ) -> AsyncIterator[executor_pb2.TurnEvent]:
        check_input(request)
        check_options(request.options, context_budget_tokens=self.limits.context_budget_tokens)
        # Asked for now, beside the checks and the lease below: it is on the way to the
        # first token and needs none of them. Its answer is only used once the session
        # proved to be the caller's.
        recall = asyncio.ensure_future(
            self._recall(request.tenant, request.session_id, request.input)
        )
        try:
            # Ownership first: another tenant must get NOT_FOUND, never "session busy".
            session = (await self.sessions.get(request.tenant, request.session_id)).session
            if request.options.model:
                await self.models.check(request.options.model, field="options.model")
            else:
                await self.models.check(session.model, field="session model")
            async with contextlib.AsyncExitStack() as leases:
                lease = await leases.enter_async_context(self.leases.hold(request.session_id))
                # The last turn's executor died mid-answer: store what its user saw first.
                early: asyncio.Future[memory_pb2.RecallResponse] | None = recall
                if await store_draft(self.drafts, self.sessions, self.events, request.session_id):
                    session = (await self.sessions.get(request.tenant, request.session_id)).session
                    early = None  # asked before that answer was stored: ask again
                try:
                    async for event in self._run(request, session, lease, leases, early):
                        yield event
                except errors.NotFound:
                    await self._drop_draft_if_deleted(request)
                    raise
        finally:
            recall.cancel()

    async def _drop_draft_if_deleted(self, request: executor_pb2.RunTurnRequest) -> None:
        # Deleted mid-turn: no next turn will store this turn's draft, which would keep
        # the answer's text in Redis for days (the erasure may have dropped it before
        # the turn's last save).
        try:
            await self.sessions.get(request.tenant, request.session_id)
        except errors.NotFound:
            with contextlib.suppress(Exception):
                await self.drafts.drop(request.session_id)

    async def _run(
        self,
        request: executor_pb2.RunTurnRequest,
        session: session_pb2.Session,
        lease: HeldLease,
        leases: contextlib.AsyncExitStack,
        early_recall: asyncio.Future[memory_pb2.RecallResponse] | None,
    ) -> AsyncIterator[executor_pb2.TurnEvent]:
        turn = _Turn(
            request=request,
            session_id=request.session_id,
            lease=lease,
            head=session.head,
            model=request.options.model or session.model,
            max_tokens=request.options.max_tokens or self.limits.max_output_tokens,
            early_recall=early_recall,
        )
        async for event in self._calls(turn, session, leases):
            yield event
        # The answer is stored. A turn that failed instead keeps its draft: if it
        # could not store its answer, the next turn will (a draft of an answer that
        # was stored is dropped then, its head having moved).
        for session_id in {request.session_id, turn.session_id}:
            with contextlib.suppress(Exception):
                await self.drafts.drop(session_id)

    async def _calls(
        self, turn: _Turn, session: session_pb2.Session, leases: contextlib.AsyncExitStack
    ) -> AsyncIterator[executor_pb2.TurnEvent]:
        """Prepare, then model calls with tool rounds between them, then finish."""
        async for event in self._prepare(turn, session, leases):
            yield event
        while True:
            async for event in self._model_call(turn, leases):
                yield event
            if not self._wants_tools(turn):
                break
            round_ = ToolRound(
                self.writer,
                self.events,
                tenant=turn.tenant,
                session_id=turn.session_id,
                turn_id=turn.turn_id,
                call_number=turn.calls,
                head=turn.head,
                lease=turn.lease,
            )
            async for event in round_.run(self._toolbox(turn), turn.done):
                yield event
            turn.head = round_.head
        yield await self._finish(turn)

    async def _prepare(
        self, turn: _Turn, session: session_pb2.Session, leases: contextlib.AsyncExitStack
    ) -> AsyncIterator[executor_pb2.TurnEvent]:
        """Recall, compact first if the last turn filled the window, store the input."""
        early, turn.early_recall = turn.early_recall, None
        turn.recalled = await (early or self._recall_for(turn))
        if turn.recalled.compact_due:
            # The last turn's prompt, as the model server counted it, passed
            # memory.compact_threshold: this turn starts in a compacted session.
            compacted = await self._compact(turn, "pre_run", leases)
            if compacted is not None:
                turn.session_id, session = compacted.compacted.to_session_id, compacted.session
                turn.head, turn.lease = session.head, compacted.lease
                turn.recalled = await self._recall_for(turn)
                yield compacted.event
        user = common_pb2.Message(role=common_pb2.ROLE_USER, content=turn.request.input)
        append = self.writer.append(
            turn.tenant, turn.session_id, turn.head, [user], f"{turn.turn_id}:input", turn.lease
        )
        # Not awaited here: the first model call waits for it before relaying anything.
        turn.pending_input = PendingInput(append, before=turn.head, message=user)
        turn.toolbox = self.tools(turn.session_id) if self.tools is not None else None

    async def _input_stored(self, turn: _Turn) -> AsyncIterator[executor_pb2.TurnEvent]:
        """Wait for the user's message to be stored (once): then the turn has started."""
        pending, turn.pending_input = turn.pending_input, None
        if pending is None:
            return
        turn.head = await pending.head()
        self.events.emit(
            "turn.started",
            tenant=turn.tenant,
            session_id=turn.session_id,
            turn_id=turn.turn_id,
            model=turn.model or None,
        )
        yield executor_pb2.TurnEvent(
            started=executor_pb2.TurnStarted(turn_id=turn.turn_id, session_id=turn.session_id)
        )

    async def _model_call(
        self, turn: _Turn, leases: contextlib.AsyncExitStack
    ) -> AsyncIterator[executor_pb2.TurnEvent]:
        """One request to the model, its deltas relayed; leaves the result in `turn.done`."""
        turn.calls += 1
        try:
            if turn.lease.lost:
                raise lease_lost(turn.session_id)
            turn.context, compacted = await self._request_context(turn, leases)
        except errors.ThreadlineError as exc:
            # The turn had started (the user's message is stored) before it failed.
            async for event in self._input_stored(turn):
                yield event
            self._failed(turn, exc)
            raise
        if compacted is not None:
            yield compacted.event
        call = ModelCall()
        async for event in self._relayed(turn, call):
            yield event
        async for event in self._input_stored(turn):  # the stream sent nothing
            yield event
        try:
            turn.done = call.result()
        except errors.ThreadlineError as exc:
            self._failed(turn, exc)
            raise
        _add_usage(turn.usage, turn.done.usage)
        turn.last_prompt_tokens = turn.done.usage.prompt_tokens

    async def _relayed(self, turn: _Turn, call: ModelCall) -> AsyncIterator[executor_pb2.TurnEvent]:
        """The model's stream as turn events, once the user's message is stored."""
        checkpoints: Checkpoints | None = None
        stream = call.stream(self.llm, self._chat_request(turn), self.interrupts)
        try:
            # Closed whatever ends the loop: a refused input append stops the model too.
            async with contextlib.aclosing(stream) as chunks:
                async for chunk in chunks:
                    if checkpoints is None:
                        async for event in self._input_stored(turn):
                            yield event
                        checkpoints = Checkpoints(
                            self.drafts, turn.tenant, turn.session_id, turn.head, turn.turn_id
                        )
                    kind = chunk.WhichOneof("chunk")
                    if kind == "delta":
                        await checkpoints.saw(call.text)
                        if turn.first_delta_ms is None:
                            turn.first_delta_ms = turn.latency_ms
                        yield executor_pb2.TurnEvent(delta=chunk.delta)
                    elif kind == "tool_call_delta":
                        yield executor_pb2.TurnEvent(tool_call_delta=chunk.tool_call_delta)
                    elif kind == "rollback":
                        # Only this call's output is discarded: tools of earlier rounds
                        # ran and stay; this call's tool calls had not run (they run
                        # after it). Its draft goes too: if this process died now, the
                        # next turn must not store the discarded text.
                        await checkpoints.settle()
                        with contextlib.suppress(Exception):
                            await self.drafts.drop(turn.session_id)
                        yield _rollback_event(chunk.rollback, turn.calls)
        except asyncio.CancelledError:
            # Client gone or shutdown past its grace: keep what the user already saw.
            self._store_partial_detached(turn, call.partial, "turn cancelled")
            raise
        finally:
            if checkpoints is not None:
                await checkpoints.settle()

    async def _request_context(
        self, turn: _Turn, leases: contextlib.AsyncExitStack
    ) -> tuple[session_pb2.BuildContextResponse, Compacted | None]:
        """The prompt for the next call; inside a tool loop, compacted first (once a turn)
        when it would pass compact_request_threshold."""
        context = await self._context(turn)
        if turn.pending_input is not None:
            turn.pending_input.include_in(context)
        if turn.calls == 1 or turn.compacted_in_turn:
            return context, None
        if not self._over_request_threshold(context, turn.last_prompt_tokens):
            return context, None
        turn.compacted_in_turn = True
        compacted = await self._compact(turn, "mid_turn", leases)
        if compacted is None:
            return context, None
        turn.session_id = compacted.compacted.to_session_id
        turn.head, turn.lease = compacted.session.head, compacted.lease
        turn.recalled = await self._recall_for(turn)
        return await self._context(turn), compacted

    def _chat_request(self, turn: _Turn) -> llm_pb2.ChatRequest:
        chat = llm_pb2.ChatRequest(
            model=turn.model,
            messages=turn.context.messages,
            max_tokens=turn.max_tokens,
            tenant=turn.tenant,
            session_id=turn.session_id,
            tools=turn.toolbox.specs() if turn.toolbox is not None else [],
        )
        if turn.request.options.HasField("temperature"):
            chat.temperature = turn.request.options.temperature
        return chat

    def _wants_tools(self, turn: _Turn) -> bool:
        """Does the model's result ask for a tool round (and may it have one)?"""
        done = turn.done
        wants_tools = (
            turn.toolbox is not None
            and bool(done.tool_calls)
            and done.finish_reason == common_pb2.FINISH_REASON_TOOL_CALLS
        )
        if not wants_tools or turn.calls < self.limits.max_iterations:
            return wants_tools
        # A model that keeps calling tools is stopped; its unexecuted calls are not
        # stored (a call without its result is illegal in a conversation).
        done.finish_reason = common_pb2.FINISH_REASON_LENGTH
        done.error = f"stopped after {turn.calls} model calls (max_iterations)"
        del done.tool_calls[:]
        return False

    def _toolbox(self, turn: _Turn) -> ToolBox:
        assert turn.toolbox is not None, "a tool round needs the session's tools"
        return turn.toolbox

    async def _finish(self, turn: _Turn) -> executor_pb2.TurnEvent:
        """Store the answer, then account for the turn: cost, calibration, activity, event."""
        done = turn.done
        interrupted = done.finish_reason == common_pb2.FINISH_REASON_INTERRUPTED
        answer = common_pb2.Message(
            role=common_pb2.ROLE_ASSISTANT, content=done.content, interrupted=interrupted
        )
        try:
            turn.head = await self.writer.append(
                turn.tenant,
                turn.session_id,
                turn.head,
                [answer],
                f"{turn.turn_id}:answer",
                turn.lease,
                calibration=self._calibration(turn),
            )
        except asyncio.CancelledError:
            self._store_partial_detached(turn, done.content, "turn cancelled")
            raise
        latency_ms = turn.latency_ms
        cost = self._cost(done.model, turn.usage)
        self._record_activity_detached(turn, 0 if done.usage_estimated else turn.last_prompt_tokens)
        self.events.emit(
            "turn.interrupted" if interrupted else "turn.completed",
            tenant=turn.tenant,
            session_id=turn.session_id,
            turn_id=turn.turn_id,
            model=done.model,
            upstream=done.upstream,
            finish_reason=common_pb2.FinishReason.Name(done.finish_reason),
            prompt_tokens=turn.usage.prompt_tokens,
            completion_tokens=turn.usage.completion_tokens,
            model_calls=turn.calls,
            cost=cost,
            latency_ms=latency_ms,
            first_delta_ms=turn.first_delta_ms,
        )
        return executor_pb2.TurnEvent(
            done=executor_pb2.TurnDone(
                turn_id=turn.turn_id,
                finish_reason=done.finish_reason,
                usage=turn.usage,
                model=done.model,
                upstream=done.upstream,
                head=turn.head,
                content=done.content,
                latency_ms=latency_ms,
                error=done.error,
                model_calls=turn.calls,
                cost=cost,
                session_id=turn.session_id,
            )
        )

    def _cost(self, model: str, usage: common_pb2.Usage) -> float:
        price_in, price_out = self.prices.get(model, (0.0, 0.0))
        return usage.prompt_tokens / 1000 * price_in + usage.completion_tokens / 1000 * price_out

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
        self, turn: _Turn, trigger: str, leases: contextlib.AsyncExitStack
    ) -> Compacted | None:
        """Compact through memory and take the new session's lease; None when it did not
        happen (refused, failed, memory down): the turn goes on where it was."""
        request = memory_pb2.JobRequest(
            tenant=turn.tenant, session_id=turn.session_id, wait=True, trigger=trigger
        )
        try:
            job = await self.memory.compact(request, timeout=self.limits.compact_timeout_s)
        except errors.ThreadlineError as exc:
            log.warning("turn.compaction_skipped", trigger=trigger, error=exc.message)
            return None
        if job.state != memory_pb2.JOB_STATE_SUCCEEDED or not job.new_session_id:
            log.warning("turn.compaction_failed", trigger=trigger, job_id=job.id, error=job.error)
            return None
        lease = await leases.enter_async_context(self.leases.hold(job.new_session_id))
        session = (await self.sessions.get(turn.tenant, job.new_session_id)).session
        compacted = executor_pb2.TurnCompacted(
            from_session_id=turn.session_id,
            to_session_id=job.new_session_id,
            job_id=job.id,
            trigger=trigger,
        )
        return Compacted(compacted, session, lease)

    async def _context(self, turn: _Turn) -> session_pb2.BuildContextResponse:
        return await self.sessions.build_context(
            session_pb2.BuildContextRequest(
                tenant=turn.tenant,
                session_id=turn.session_id,
                budget_tokens=self.limits.context_budget_tokens,
                # Room for the user's message too while its append is under way.
                reserve_output_tokens=turn.max_tokens
                + (turn.pending_input.tokens if turn.pending_input is not None else 0),
                memory_summary=turn.recalled.context,
                model=turn.model or "default",
            )
        )

    def _calibration(self, turn: _Turn) -> session_pb2.CalibrateRequest | None:
        """What the server counted for the last prompt, beside what BuildContext counted,
        so the session store's estimates for this model follow the real tokenizer. It
        rides on the answer's append: a call of its own cost every turn a round trip."""
        done = turn.done
        if done.finish_reason == common_pb2.FINISH_REASON_INTERRUPTED:
            return None
        if done.usage_estimated or not done.usage.prompt_tokens:
            return None
        chars = _prompt_chars(turn.context.messages)
        if not chars:
            return None
        return session_pb2.CalibrateRequest(
            model=turn.model or "default",
            prompt_chars=chars,
            prompt_tokens=done.usage.prompt_tokens,
        )

    async def _recall_for(self, turn: _Turn) -> memory_pb2.RecallResponse:
        return await self._recall(turn.tenant, turn.session_id, turn.request.input)

    async def _recall(self, tenant: str, session_id: str, query: str) -> memory_pb2.RecallResponse:
        # Memory is an enhancement: a turn goes on without it rather than failing.
        # The turn checks the session itself (its ownership check) and uses the
        # answer only once that holds, so memory need not ask the session service.
        try:
            return await self.memory.recall(tenant, session_id, query=query, session_checked=True)
        except errors.ThreadlineError as exc:
            log.warning("turn.recall_failed", error=exc.message)
            return memory_pb2.RecallResponse()

    def _record_activity_detached(self, turn: _Turn, prompt_tokens: int) -> None:
        """Tell memory what the turn cost, after the turn: its jobs run beside the
        next turns and never delay this one."""
        request = memory_pb2.RecordActivityRequest(
            tenant=turn.tenant,
            session_id=turn.session_id,
            model=turn.model,
            prompt_tokens=prompt_tokens,
            context_window_tokens=self.limits.context_budget_tokens,
            # The answer was just stored: the session was there, and was the tenant's.
            session_checked=True,
        )

        async def record() -> None:
            try:
                await self.memory.record_activity(request, timeout=10.0)
            except errors.ThreadlineError as exc:
                log.warning("turn.record_activity_failed", error=exc.message)

        self.detached.start(record(), name=f"record-activity-{turn.session_id}")

    def _failed(self, turn: _Turn, exc: errors.ThreadlineError) -> None:
        self.events.emit(
            "turn.failed",
            tenant=turn.tenant,
            session_id=turn.session_id,
            turn_id=turn.turn_id,
            # The code, not the message: a message may quote an upstream's error, and
            # that the user's text. The caller got the message; the log has it too.
            code=exc.code,
            latency_ms=turn.latency_ms,
        )

    def _store_partial_detached(self, turn: _Turn, content: str, reason: str) -> None:
        """Store what the user saw of a cancelled turn, then report it interrupted."""

        def interrupted() -> None:
            self.events.emit(
                "turn.interrupted",
                tenant=turn.tenant,
                session_id=turn.session_id,
                turn_id=turn.turn_id,
                error=reason,
                partial_chars=len(content),
                latency_ms=turn.latency_ms,
            )

        if not content:
            interrupted()
            return
        message = common_pb2.Message(
            role=common_pb2.ROLE_ASSISTANT, content=content, interrupted=True
        )
        self.writer.append_detached(
            turn.tenant,
            turn.session_id,
            turn.head,
            [message],
            f"{turn.turn_id}:answer",
            lost="turn.partial_lost",
            lease=turn.lease,
            then=interrupted,
        )


def _rollback_event(rollback: llm_pb2.Rollback, model_call: int) -> executor_pb2.TurnEvent:
    return executor_pb2.TurnEvent(
        rollback=executor_pb2.TurnRollback(
            reason=rollback.reason,
            error=rollback.error,
            upstream=rollback.upstream,
            model=rollback.model,
            model_call=model_call,
        )
    )


def _prompt_chars(messages: Sequence[common_pb2.Message]) -> int:
    # Over the whole context, every turn: the tool calls only of messages that have them.
    chars = sum(len(m.content) for m in messages)
    return chars + sum(
        len(c.name) + len(c.arguments_json) for m in messages if m.tool_calls for c in m.tool_calls
    )


def _add_usage(total: common_pb2.Usage, more: common_pb2.Usage) -> None:
    total.prompt_tokens += more.prompt_tokens
    total.completion_tokens += more.completion_tokens
    total.cached_tokens += more.cached_tokens
    total.total_tokens += more.total_tokens
