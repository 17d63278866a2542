"""Consolidation: fold a session's unconsolidated messages into its long-term memory.

Summarises messages [offset, boundary) through llm_proxy, the boundary at a
user-turn start (a turn still in progress stays for the next run). A span too
large for the summarising model's window goes in chunks; the offset advances
after each chunk's summary is stored, so work done is never redone. After
`max_failures` consecutive failures the span's raw text is archived instead so
the session can move on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from services.memory import transcript
from services.memory.pacing import Pacer
from services.memory.sessions import SessionReader
from services.memory.store import MemoryStore
from threadline import errors
from threadline.v1 import common_pb2, llm_pb2

SUMMARY_INSTRUCTIONS = (
    "You maintain the long-term memory of a conversation between a user and an "
    "assistant. Merge the new messages into the existing summary. Keep facts, names, "
    "decisions, open questions and what the user asked for; drop pleasantries. Answer "
    "with the updated summary only, in a few short sentences."
)

#: Tokens kept free in the summarising prompt for wording around the messages.
_PROMPT_OVERHEAD_TOKENS = 64


class Summariser(Protocol):
    async def chat(
        self, request: llm_pb2.ChatRequest, *, timeout: float | None = ...
    ) -> llm_pb2.ChatResponse: ...


@dataclass
class JobResult:
    """What a job did, for its record and its done/failed event."""

    tokens_in: int = 0
    tokens_out: int = 0
    #: consolidate: the new offset; extract: the new pointer.
    offset: int = 0
    items: int = 0
    new_session_id: str = ""
    archived: bool = False
    #: Set when there was nothing to do.
    skipped: str = ""
    extra: dict[str, object] = field(default_factory=dict)

    def add_usage(self, usage: common_pb2.Usage) -> None:
        self.tokens_in += usage.prompt_tokens
        self.tokens_out += usage.completion_tokens


def summary_prompt(previous: str, messages: Sequence[common_pb2.Message], max_chars: int) -> str:
    return (
        f"Existing summary:\n{previous or '(none yet)'}\n\nNew messages:\n"
        + transcript.render(messages, max_chars)
        + "\n\nWrite the updated summary."
    )


@dataclass
class SummaryModel:
    """Plain-text summaries through llm_proxy, sized to the summarising model's window."""

    llm: Summariser
    model: str
    max_summary_tokens: int
    window_tokens: int

    def chunk_budget(self, previous: str) -> int:
        """Tokens of messages one summarising request can carry besides `previous`."""
        fixed = (
            transcript.tokens_of_text(SUMMARY_INSTRUCTIONS)
            + transcript.tokens_of_text(previous)
            + self.max_summary_tokens
            + _PROMPT_OVERHEAD_TOKENS
        )
        return max(self.window_tokens - fixed, self.window_tokens // 4)

    def max_chars(self, previous: str) -> int:
        return self.chunk_budget(previous) * transcript.CHARS_PER_TOKEN

    async def summarise(
        self,
        tenant: str,
        session_id: str,
        previous: str,
        messages: Sequence[common_pb2.Message],
        result: JobResult,
        model: str = "",
    ) -> str:
        request = llm_pb2.ChatRequest(
            model=model or self.model,
            messages=[
                common_pb2.Message(role=common_pb2.ROLE_SYSTEM, content=SUMMARY_INSTRUCTIONS),
                common_pb2.Message(
                    role=common_pb2.ROLE_USER,
                    content=summary_prompt(previous, messages, self.max_chars(previous)),
                ),
            ],
            max_tokens=self.max_summary_tokens,
            tenant=tenant,
            session_id=session_id,
        )
        response = await self.llm.chat(request)
        result.add_usage(response.done.usage)
        if response.done.finish_reason == common_pb2.FINISH_REASON_INTERRUPTED:
            raise errors.Unavailable(f"the summary was cut: {response.done.error}")
        summary = response.message.content.strip()
        if not summary:
            raise errors.Unavailable("the model returned an empty summary")
        return summary


@dataclass
class Consolidator:
    store: MemoryStore
    sessions: SessionReader
    summaries: SummaryModel
    max_failures: int = 3
    #: Rests between chunks while turns run (see pacing).
    pacer: Pacer = field(default_factory=Pacer)

    async def pending(self, tenant: str, session_id: str) -> list[common_pb2.Message]:
        """The messages the next consolidation would summarise."""
        memory = await self.store.get(tenant, session_id)
        messages = await self.sessions.messages_from(tenant, session_id, memory.offset)
        return messages[: transcript.turn_boundary(messages)]

    async def run(self, tenant: str, session_id: str, model: str, result: JobResult) -> None:
        paced = self.pacer.begin()
        span = await self.pending(tenant, session_id)
        if not span:
            memory = await self.store.get(tenant, session_id)
            result.offset = memory.offset
            result.skipped = "nothing new to consolidate"
            return
        memory = await self.store.get(tenant, session_id)
        summary = memory.summary
        for chunk in transcript.chunks(span, self.summaries.chunk_budget(summary)):
            summary = await self.summaries.summarise(
                tenant, session_id, summary, chunk, result, model
            )
            result.offset = chunk[-1].seq + 1
            await self.store.save_summary(
                tenant,
                session_id,
                summary=summary,
                from_seq=chunk[0].seq,
                next_offset=result.offset,
            )
            result.items += len(chunk)
            await paced.rest()

    async def failed(self, tenant: str, session_id: str, result: JobResult) -> int:
        """Count a failure; at the limit, archive the pending span's raw text and move on.

        Returns the consecutive failure count (0 once archived)."""
        failures = await self.store.count_failure(tenant, session_id, "consolidate")
        if failures < self.max_failures:
            return failures
        span = await self.pending(tenant, session_id)
        if span:
            memory = await self.store.get(tenant, session_id)
            result.offset = span[-1].seq + 1
            await self.store.save_summary(
                tenant,
                session_id,
                summary=memory.summary,
                from_seq=span[0].seq,
                next_offset=result.offset,
                archived_text=transcript.render(span),
            )
            result.archived = True
            result.items = len(span)
        return failures
