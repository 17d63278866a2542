"""The proxy's domain: attempts, retries and honest endings for one chat request.

Before the first delta a failure is retried (backoff, Retry-After, budget) or
surfaced as a typed error; after it, the stream ends with a done chunk whose
finish_reason is INTERRUPTED and which carries the partial text and usage: a
cut answer is never presented as complete.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from services.llm_proxy.openai_wire import (
    FINISH_REASONS,
    Finish,
    TextDelta,
    ToolDelta,
    UsageReport,
    request_body,
)
from services.llm_proxy.retry import RetryPolicy
from services.llm_proxy.upstream import Upstream, UpstreamFailure
from threadline import errors
from threadline.events import EventPublisher
from threadline.logs import get_logger
from threadline.v1 import common_pb2, llm_pb2

log = get_logger(__name__)


@dataclass
class _Answer:
    """What one attempt has produced so far."""

    text: list[str] = field(default_factory=list)
    tool_calls: dict[int, common_pb2.ToolCall] = field(default_factory=dict)
    finish_reason: str = ""
    usage: UsageReport | None = None
    deltas: int = 0

    @property
    def produced_output(self) -> bool:
        return self.deltas > 0

    def add_tool_delta(self, delta: ToolDelta) -> None:
        call = self.tool_calls.setdefault(delta.index, common_pb2.ToolCall())
        if delta.id:
            call.id = delta.id
        if delta.name:
            call.name += delta.name
        call.arguments_json += delta.arguments


def _estimate_prompt_tokens(request: llm_pb2.ChatRequest) -> int:
    return sum(len(m.content) // 4 + 4 for m in request.messages)


def _failure_error(failure: UpstreamFailure) -> errors.ThreadlineError:
    details = {"reason": failure.reason}
    if failure.status is not None:
        details["upstream_status"] = str(failure.status)
    if failure.reason in ("context_length_exceeded", "content_filter"):
        return errors.FailedPrecondition(f"{failure.reason}: {failure.message}", details=details)
    if failure.status in (400, 422):
        return errors.InvalidArgument(
            f"upstream rejected the request: {failure.message}", details=details
        )
    if failure.status is not None and 400 <= failure.status < 500 and not failure.retryable:
        return errors.FailedPrecondition(
            f"upstream refused the request: {failure.message}", details=details
        )
    return errors.Unavailable(f"upstream unavailable: {failure.message}", details=details)


class ChatProxy:
    def __init__(
        self,
        upstream: Upstream,
        retry: RetryPolicy,
        events: EventPublisher,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.upstream = upstream
        self.retry = retry
        self.events = events
        self._sleep = sleep

    def resolve_model(self, requested: str) -> str:
        served = self.upstream.settings.model
        if requested in ("", "default", served):
            return served
        raise errors.InvalidArgument(
            f"unknown model {requested!r}: this proxy serves {served!r}",
            details={"model": requested},
        )

    def models(self) -> list[llm_pb2.ModelInfo]:
        return [llm_pb2.ModelInfo(id=self.upstream.settings.model, upstream=self.upstream.name)]

    async def stream(self, request: llm_pb2.ChatRequest) -> AsyncIterator[llm_pb2.ChatChunk]:
        model = self.resolve_model(request.model)
        if not request.messages:
            raise errors.InvalidArgument("messages is empty: send at least one message")
        body = request_body(
            request,
            model,
            stream=True,
            system_role=self.upstream.settings.capabilities.system_role,
        )
        upstream = self.upstream.name
        loop = asyncio.get_running_loop()
        started = loop.time()
        attempt = 0
        while True:
            attempt += 1
            yield llm_pb2.ChatChunk(
                attempt=llm_pb2.AttemptInfo(
                    attempt=attempt, upstream=upstream, model=model, status="started"
                )
            )
            answer = _Answer()
            attempt_started = time.perf_counter()
            try:
                async with asyncio.timeout(self.upstream.settings.timeouts.total_s):
                    async for event in self.upstream.stream(body):
                        chunk = self._apply(answer, event)
                        if chunk is not None:
                            yield chunk
            except (UpstreamFailure, TimeoutError) as exc:
                failure = (
                    exc
                    if isinstance(exc, UpstreamFailure)
                    else UpstreamFailure(
                        "total_timeout",
                        f"answer took longer than {self.upstream.settings.timeouts.total_s:g}s",
                        retryable=False,
                    )
                )
                if answer.produced_output:
                    yield self._interrupted(request, answer, model, attempt, failure)
                    return
                self.events.emit(
                    "llm.attempt_failed",
                    upstream=upstream,
                    model=model,
                    attempt=attempt,
                    reason=failure.reason,
                    error=failure.message,
                    status=failure.status,
                )
                yield llm_pb2.ChatChunk(
                    attempt=llm_pb2.AttemptInfo(
                        attempt=attempt,
                        upstream=upstream,
                        model=model,
                        status="failed",
                        reason=failure.reason,
                    )
                )
                if not failure.retryable:
                    raise _failure_error(failure) from None
                remaining = self.retry.budget_s - (loop.time() - started)
                delay = self.retry.delay(attempt, failure.retry_after_s, remaining)
                if delay is None:
                    raise errors.Unavailable(
                        f"upstream {upstream} failed after {attempt} attempt(s): {failure.message}",
                        details={"reason": failure.reason, "attempts": str(attempt)},
                    ) from None
                self.events.emit(
                    "llm.retry",
                    upstream=upstream,
                    model=model,
                    attempt=attempt,
                    reason=failure.reason,
                    delay_s=round(delay, 3),
                )
                await self._sleep(delay)
                continue
            log.info(
                "llm.answered",
                upstream=upstream,
                model=model,
                attempt=attempt,
                seconds=round(time.perf_counter() - attempt_started, 3),
            )
            yield self._done(request, answer, model, attempt)
            return

    @staticmethod
    def _apply(answer: _Answer, event: object) -> llm_pb2.ChatChunk | None:
        if isinstance(event, TextDelta):
            answer.text.append(event.text)
            answer.deltas += 1
            return llm_pb2.ChatChunk(delta=event.text)
        if isinstance(event, ToolDelta):
            answer.add_tool_delta(event)
            answer.deltas += 1
            return llm_pb2.ChatChunk(
                tool_call_delta=llm_pb2.ToolCallDelta(
                    index=event.index,
                    id=event.id,
                    name=event.name,
                    arguments_delta=event.arguments,
                )
            )
        if isinstance(event, Finish):
            answer.finish_reason = event.reason
        elif isinstance(event, UsageReport):
            answer.usage = event
        return None

    def _usage(self, request: llm_pb2.ChatRequest, answer: _Answer) -> common_pb2.Usage:
        if answer.usage is not None:
            prompt, completion = answer.usage.prompt_tokens, answer.usage.completion_tokens
            cached = answer.usage.cached_tokens
        else:
            # No usage chunk (stream cut, or a server that ignores include_usage): count
            # what we saw so the spend is still accounted, approximately.
            prompt, completion, cached = _estimate_prompt_tokens(request), answer.deltas, 0
        return common_pb2.Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_tokens=cached,
            total_tokens=prompt + completion,
        )

    def _done(
        self, request: llm_pb2.ChatRequest, answer: _Answer, model: str, attempt: int
    ) -> llm_pb2.ChatChunk:
        reason = FINISH_REASONS.get(answer.finish_reason, common_pb2.FINISH_REASON_STOP)
        if answer.tool_calls and reason == common_pb2.FINISH_REASON_STOP:
            reason = common_pb2.FINISH_REASON_TOOL_CALLS
        return llm_pb2.ChatChunk(
            done=llm_pb2.ChatDone(
                finish_reason=reason,
                usage=self._usage(request, answer),
                model=model,
                upstream=self.upstream.name,
                content="".join(answer.text),
                tool_calls=[answer.tool_calls[i] for i in sorted(answer.tool_calls)],
                attempts=attempt,
            )
        )

    def _interrupted(
        self,
        request: llm_pb2.ChatRequest,
        answer: _Answer,
        model: str,
        attempt: int,
        failure: UpstreamFailure,
    ) -> llm_pb2.ChatChunk:
        self.events.emit(
            "llm.stream_interrupted",
            upstream=self.upstream.name,
            model=model,
            attempt=attempt,
            reason=failure.reason,
            error=failure.message,
            deltas_sent=answer.deltas,
        )
        chunk = self._done(request, answer, model, attempt)
        chunk.done.finish_reason = common_pb2.FINISH_REASON_INTERRUPTED
        chunk.done.error = f"{failure.reason}: {failure.message}"
        return chunk
