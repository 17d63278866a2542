"""What one attempt has produced so far, and how a batch of upstream events is relayed.

An `Answer` collects the text, tool calls, finish reason and usage of one attempt
as its events are relayed, and knows what that attempt cost: the upstream's
count where it reported one, the estimate (4 characters per token) otherwise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from services.llm_proxy.limits import RateLimited
from services.llm_proxy.openai_wire import Finish, StreamEvent, TextDelta, ToolDelta, UsageReport
from services.llm_proxy.upstream import UpstreamFailure
from threadline.v1 import common_pb2, llm_pb2


@dataclass
class Answer:
    """What one attempt has produced so far."""

    text: list[str] = field(default_factory=list)
    tool_calls: dict[int, common_pb2.ToolCall] = field(default_factory=dict)
    finish_reason: str = ""
    usage: UsageReport | None = None
    deltas: int = 0
    started: float = field(default_factory=time.perf_counter)
    #: Completion tokens produced by an earlier, cut attempt that this one continues.
    carried_completion: int = 0
    #: How the attempt failed; None while it runs and once it has answered.
    failure: UpstreamFailure | RateLimited | None = None

    def estimated_completion(self) -> int:
        """Tokens of the text so far, at 4 characters per token (deltas may be merged)."""
        chars = sum(len(t) for t in self.text) + sum(
            len(c.name) + len(c.arguments_json) for c in self.tool_calls.values()
        )
        return -(-chars // 4)

    @property
    def produced_output(self) -> bool:
        return self.deltas > 0

    def completion_spent(self) -> int:
        """Completion tokens this answer cost: the upstream's count, else the estimate."""
        spent = self.usage.completion_tokens if self.usage is not None else None
        return self.carried_completion + (
            spent if spent is not None else self.estimated_completion()
        )

    def used(self, request: llm_pb2.ChatRequest) -> int:
        """Tokens this attempt used, for its TPM bucket: the upstream's last count
        (a cut stream has one when the upstream reports usage in every chunk), else
        the estimate; nothing for a request the upstream refused with an HTTP
        status (it read no prompt)."""
        if self.usage is not None:
            return self.usage.prompt_tokens + self.usage.completion_tokens
        failure = self.failure
        if not self.produced_output and isinstance(failure, UpstreamFailure) and failure.status:
            return 0
        return estimate_prompt_tokens(request) + self.estimated_completion()

    def continued_by(self, rest: Answer) -> Answer:
        """This cut answer and the continuation that finished it, as one answer."""
        return Answer(
            text=["".join(self.text), *rest.text],
            finish_reason=rest.finish_reason,
            usage=rest.usage,
            deltas=self.deltas + rest.deltas,
            started=self.started,
            # The cut attempt's text is part of the answer: bill it as completion.
            carried_completion=self.completion_spent(),
        )

    def replaying(self, cut: Answer) -> Answer:
        """This continuation, which started over, as the whole answer (the cut part,
        rolled back, is still billed as completion)."""
        self.carried_completion = cut.completion_spent()
        self.started = cut.started
        return self

    def apply(self, event: StreamEvent) -> llm_pb2.ChatChunk | None:
        if isinstance(event, TextDelta):
            self.text.append(event.text)
            self.deltas += 1
            return llm_pb2.ChatChunk(delta=event.text)
        if isinstance(event, ToolDelta):
            call = self.tool_calls.setdefault(event.index, common_pb2.ToolCall())
            if event.id:
                call.id = event.id
            call.name += event.name
            call.arguments_json += event.arguments
            self.deltas += 1
            return llm_pb2.ChatChunk(
                tool_call_delta=llm_pb2.ToolCallDelta(
                    index=event.index,
                    id=event.id,
                    name=event.name,
                    arguments_delta=event.arguments,
                )
            )
        if isinstance(event, Finish):
            self.finish_reason = event.reason
        elif isinstance(event, UsageReport):
            self.usage = event
        return None


def relayed(answer: Answer, batch: list[StreamEvent]) -> list[llm_pb2.ChatChunk]:
    """Apply a batch of events; consecutive text deltas leave as one chunk."""
    chunks: list[llm_pb2.ChatChunk] = []
    for event in batch:
        chunk = answer.apply(event)
        if chunk is None:
            continue
        if chunks and chunk.HasField("delta") and chunks[-1].HasField("delta"):
            chunks[-1].delta += chunk.delta
        else:
            chunks.append(chunk)
    return chunks


def estimate_prompt_tokens(request: llm_pb2.ChatRequest) -> int:
    return sum(len(m.content) // 4 + 4 for m in request.messages)
