"""Consolidation: fold a session's unconsolidated messages into its summary.

Summarises messages [offset, boundary) through llm_proxy, where the boundary
is a turn start: a trailing user message whose answer is not stored yet stays
for the next run. The offset advances only after the new summary is stored.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from services.memory.store import SessionMemory, SqliteMemoryStore
from threadline import errors
from threadline.events import EventPublisher
from threadline.v1 import common_pb2, llm_pb2, memory_pb2

SUMMARY_INSTRUCTIONS = (
    "You maintain the long-term memory of a conversation between a user and an "
    "assistant. Merge the new messages into the existing summary. Keep facts, names, "
    "decisions, open questions and what the user asked for; drop pleasantries. Answer "
    "with the updated summary only, in a few short sentences."
)

_ROLE_LABELS = {
    common_pb2.ROLE_SYSTEM: "System",
    common_pb2.ROLE_USER: "User",
    common_pb2.ROLE_ASSISTANT: "Assistant",
    common_pb2.ROLE_TOOL: "Tool",
}


class SessionReader(Protocol):
    async def messages_from(
        self, tenant: str, session_id: str, from_seq: int
    ) -> list[common_pb2.Message]: ...


class Summariser(Protocol):
    async def chat(self, request: llm_pb2.ChatRequest) -> llm_pb2.ChatResponse: ...


def consolidation_span(messages: Sequence[common_pb2.Message]) -> int:
    """How many of `messages` to consolidate: all but a trailing, unanswered user turn."""
    end = len(messages)
    while end > 0 and messages[end - 1].role == common_pb2.ROLE_USER:
        end -= 1
    return end


def summary_prompt(previous: str, messages: Sequence[common_pb2.Message]) -> str:
    lines = [f"{_ROLE_LABELS.get(m.role, 'User')}: {m.content}" for m in messages if m.content]
    return (
        f"Existing summary:\n{previous or '(none yet)'}\n\nNew messages:\n"
        + "\n".join(lines)
        + "\n\nWrite the updated summary."
    )


@dataclass
class Consolidator:
    store: SqliteMemoryStore
    sessions: SessionReader
    summariser: Summariser
    events: EventPublisher
    model: str
    max_summary_tokens: int

    def __post_init__(self) -> None:
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    async def recall(self, tenant: str, session_id: str) -> SessionMemory:
        return await self.store.get(tenant, session_id)

    async def consolidate(
        self, tenant: str, session_id: str, model: str = ""
    ) -> memory_pb2.ConsolidateResponse:
        # Two consolidations of one session at once would summarise the same span twice.
        lock = self._locks.setdefault((tenant, session_id), asyncio.Lock())
        async with lock:
            return await self._consolidate(tenant, session_id, model or self.model)

    async def _consolidate(
        self, tenant: str, session_id: str, model: str
    ) -> memory_pb2.ConsolidateResponse:
        memory = await self.store.get(tenant, session_id)
        pending = await self.sessions.messages_from(tenant, session_id, memory.offset)
        span = pending[: consolidation_span(pending)]
        if not span:
            return memory_pb2.ConsolidateResponse(
                consolidated=False, offset=memory.offset, summary=memory.summary
            )
        started = time.perf_counter()
        self.events.emit(
            "memory.consolidation.started",
            tenant=tenant,
            session_id=session_id,
            messages=len(span),
            from_seq=memory.offset,
        )
        request = llm_pb2.ChatRequest(
            model=model,
            messages=[
                common_pb2.Message(role=common_pb2.ROLE_SYSTEM, content=SUMMARY_INSTRUCTIONS),
                common_pb2.Message(
                    role=common_pb2.ROLE_USER, content=summary_prompt(memory.summary, span)
                ),
            ],
            max_tokens=self.max_summary_tokens,
            tenant=tenant,
            session_id=session_id,
        )
        try:
            response = await self.summariser.chat(request)
            if response.done.finish_reason == common_pb2.FINISH_REASON_INTERRUPTED:
                raise errors.Unavailable(f"summary was cut: {response.done.error}")
            summary = response.message.content.strip()
            if not summary:
                raise errors.Unavailable("the model returned an empty summary")
            next_offset = span[-1].seq + 1
            await self.store.save(
                tenant,
                session_id,
                summary=summary,
                from_seq=memory.offset,
                next_offset=next_offset,
            )
        except errors.ThreadlineError as exc:
            self.events.emit(
                "memory.consolidation.failed",
                tenant=tenant,
                session_id=session_id,
                error=exc.message,
                duration_ms=int((time.perf_counter() - started) * 1000),
            )
            raise
        usage = response.done.usage
        self.events.emit(
            "memory.consolidation.done",
            tenant=tenant,
            session_id=session_id,
            messages=len(span),
            offset=next_offset,
            tokens_in=usage.prompt_tokens,
            tokens_out=usage.completion_tokens,
            duration_ms=int((time.perf_counter() - started) * 1000),
        )
        return memory_pb2.ConsolidateResponse(
            consolidated=True,
            offset=next_offset,
            summary=summary,
            messages_consolidated=len(span),
            usage=usage,
        )
