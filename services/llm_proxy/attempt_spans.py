"""A span per model attempt, read off the chunk stream the proxy answers with.

The stream already says everything an attempt span needs: `attempt` chunks when
an attempt starts or fails (upstream, model, reason), deltas, a `rollback` when
an answer is discarded, and the `done` chunk with the tokens and finish reason.
Reading it here keeps the proxy's attempt loop free of tracing, and the spans
exactly as the caller saw the attempts.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from opentelemetry.trace import Span

from threadline.telemetry import tracing
from threadline.v1 import common_pb2, llm_pb2


class _Attempts:
    def __init__(self) -> None:
        self.span: Span | None = None
        self.started = 0.0
        self.deltas = 0

    def see(self, chunk: llm_pb2.ChatChunk) -> None:
        kind = chunk.WhichOneof("chunk")
        if kind == "attempt":
            info = chunk.attempt
            if info.status == "started":
                self._begin(info)
            elif info.status == "failed":
                self._end("failed", info.reason or "failed")
        elif kind in ("delta", "tool_call_delta"):
            self._delta()
        elif kind == "rollback":
            self._end("rolled_back", chunk.rollback.reason)
        elif kind == "done":
            self._answered(chunk.done)

    def _begin(self, info: llm_pb2.AttemptInfo) -> None:
        # An attempt that ends with no chunk of its own (rate limited before it was
        # sent, or cut and continued elsewhere) ends when the next one starts.
        self._end("cut" if self.deltas else "not_answered", "superseded by the next attempt")
        self.span = tracing.start_child(
            "llm.attempt",
            {
                "threadline.upstream": info.upstream,
                "gen_ai.request.model": info.model,
                "threadline.attempt": info.attempt,
            },
        )
        self.started, self.deltas = time.perf_counter(), 0

    def _delta(self) -> None:
        self.deltas += 1
        if self.deltas == 1 and self.span is not None:
            self.span.add_event(
                "first_delta", {"seconds": round(time.perf_counter() - self.started, 6)}
            )

    def _answered(self, done: llm_pb2.ChatDone) -> None:
        if self.span is None:
            return
        self.span.set_attributes(
            {
                "gen_ai.response.model": done.model,
                "gen_ai.response.finish_reasons": [
                    common_pb2.FinishReason.Name(done.finish_reason)
                ],
                "gen_ai.usage.input_tokens": done.usage.prompt_tokens,
                "gen_ai.usage.output_tokens": done.usage.completion_tokens,
                "threadline.usage_estimated": done.usage_estimated,
            }
        )
        if done.finish_reason == common_pb2.FINISH_REASON_INTERRUPTED:
            self._end("interrupted", done.error or "interrupted")
        else:
            self._end("ok", "")

    def _end(self, outcome: str, error: str) -> None:
        span, self.span = self.span, None
        if span is None:
            return
        span.set_attribute("threadline.attempt.outcome", outcome)
        span.set_attribute("threadline.attempt.deltas", self.deltas)
        if outcome != "ok":
            span.set_attribute("threadline.attempt.reason", error)
            tracing.fail(span, f"{outcome}: {error}")
        span.end()

    def abandon(self, error: BaseException | None) -> None:
        """The stream ended without an end of the open attempt (an error, the caller left)."""
        if error is None or isinstance(error, Exception):
            reason = type(error).__name__ if error is not None else "stream ended"
            self._end("failed", reason)
        else:
            self._end("cancelled", "the caller left")


async def traced_attempts(
    chunks: AsyncIterator[llm_pb2.ChatChunk],
) -> AsyncIterator[llm_pb2.ChatChunk]:
    """`chunks`, passed through, with a span for each attempt they report."""
    attempts = _Attempts()
    try:
        async for chunk in chunks:
            attempts.see(chunk)
            yield chunk
    except BaseException as exc:
        attempts.abandon(exc)
        raise
    attempts.abandon(None)
