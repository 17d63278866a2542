"""Compaction: move an over-full session to a new one that holds a summary and its tail.

The messages before the retained tail are summarised by a model that writes the
summary through a `write_summary` tool call (nudged once if it answers in text).
The new session, created through the session service with `compacted_from`,
starts with a `[Compacted context summary]` message and the retained tail: the
newest messages within `compact_retained_tokens`, never fewer than from the
last user message on (the question just asked survives) and never splitting an
assistant's tool calls from their results.

Refused up front (FAILED_PRECONDITION, no job): a session compaction just made
and that has not changed since (thrash guard), a session whose compaction failed
`max_failures` times at its current head, a session with nothing before its tail.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from services.memory import transcript
from services.memory.consolidation import JobResult, Summariser, SummaryModel
from services.memory.sessions import SessionWriter
from services.memory.store import MemoryStore, SessionMemory
from threadline import errors
from threadline.v1 import common_pb2, llm_pb2, session_pb2

SUMMARY_HEADER = "[Compacted context summary]"

COMPACTION_INSTRUCTIONS = (
    "The conversation below is being moved to a fresh context. Write a summary that "
    "lets the assistant carry on without the original messages: the user's goals and "
    "requests, facts and names, decisions and their reasons, what was tried and what "
    "came of it, and open questions. Call the write_summary tool with the summary; "
    "do not answer in text."
)
NUDGE = "Call the write_summary tool now with the summary. Do not answer in text."

WRITE_SUMMARY = common_pb2.ToolSpec(
    name="write_summary",
    description="Store the summary that replaces the earlier conversation.",
    parameters_json=json.dumps(
        {
            "type": "object",
            "properties": {"summary": {"type": "string", "description": "The summary."}},
            "required": ["summary"],
        }
    ),
)


#: ErrorInfo reason of a refusal: the session may not be compacted now (which is
#: not a failure of the compaction, and does not count towards disabling it).
REFUSED = "compaction_refused"


def is_refusal(exc: BaseException) -> bool:
    return isinstance(exc, errors.FailedPrecondition) and exc.details.get("reason") == REFUSED


def tail_start(messages: Sequence[common_pb2.Message], retained_tokens: int) -> int:
    """Index of the first retained message."""
    last_user = next(
        (i for i in range(len(messages) - 1, -1, -1) if messages[i].role == common_pb2.ROLE_USER),
        len(messages),
    )
    start = len(messages)
    used = 0
    for index in range(len(messages) - 1, -1, -1):
        used += transcript.tokens_of(messages[index])
        if used > retained_tokens:
            break
        # A tool result cannot open the tail: it would be cut from its call.
        if messages[index].role != common_pb2.ROLE_TOOL:
            start = index
    start = min(start, last_user)
    while 0 < start < len(messages) and messages[start].role == common_pb2.ROLE_TOOL:
        start -= 1
    return start


def refusal(
    session: session_pb2.Session,
    messages: Sequence[common_pb2.Message],
    memory_state: tuple[int, int, str],
    *,
    retained_tokens: int,
    max_failures: int,
) -> str:
    """Why this session may not be compacted now, or "" when it may."""
    compacted_size, failures, failed_head = memory_state
    if compacted_size >= 0 and session.message_count <= compacted_size:
        return (
            f"session {session.id} was just made by compaction and has not changed since: "
            "compacting it again would only summarise the summary"
        )
    if failures >= max_failures and failed_head == session.head:
        return (
            f"compaction of session {session.id} failed {failures} times in a row; "
            "it is disabled until the session changes"
        )
    if tail_start(messages, retained_tokens) == 0:
        return (
            f"nothing to compact: session {session.id} fits in the retained tail "
            f"({retained_tokens} tokens from the last user message)"
        )
    return ""


def _copy(message: common_pb2.Message) -> common_pb2.Message:
    copied = common_pb2.Message(
        role=message.role,
        content=message.content,
        tool_calls=message.tool_calls,
        tool_call_id=message.tool_call_id,
        name=message.name,
        interrupted=message.interrupted,
    )
    copied.created_at.CopyFrom(message.created_at)
    return copied


@dataclass
class Compactor:
    store: MemoryStore
    sessions: SessionWriter
    llm: Summariser
    summaries: SummaryModel
    retained_tokens: int
    max_failures: int = 3

    async def check(
        self, tenant: str, session_id: str
    ) -> tuple[session_pb2.SessionDetail, SessionMemory]:
        """The session and its memory state; FAILED_PRECONDITION (ErrorInfo reason
        compaction_refused) if it may not be compacted now."""
        detail = await self.sessions.get(tenant, session_id, include_messages=True)
        memory = await self.store.get(tenant, session_id)
        reason = refusal(
            detail.session,
            detail.messages,
            (memory.compacted_size, memory.compact_failures, memory.compact_failed_head),
            retained_tokens=self.retained_tokens,
            max_failures=self.max_failures,
        )
        if reason:
            raise errors.FailedPrecondition(
                reason, details={"session_id": session_id, "reason": REFUSED}
            )
        return detail, memory

    async def run(self, tenant: str, session_id: str, model: str, result: JobResult) -> None:
        detail, memory = await self.check(tenant, session_id)
        messages = list(detail.messages)
        start = tail_start(messages, self.retained_tokens)
        earlier, tail = messages[:start], messages[start:]
        # What is too large for one request is folded into a plain summary first,
        # oldest first, so the final request always fits.
        chunks = transcript.chunks(earlier, self.summaries.chunk_budget(memory.summary))
        running = memory.summary
        for chunk in chunks[:-1]:
            running = await self.summaries.summarise(
                tenant, session_id, running, chunk, result, model
            )
        summary = await self._write_summary(tenant, session_id, running, chunks[-1], model, result)
        session = detail.session
        created = await self.sessions.create(
            session_pb2.SessionsCreateRequest(
                tenant=tenant,
                model=session.model,
                system_prompt=session.system_prompt,
                title=session.title,
                metadata=session.metadata,
                messages=[
                    common_pb2.Message(
                        role=common_pb2.ROLE_USER, content=f"{SUMMARY_HEADER}\n{summary}"
                    ),
                    *(_copy(m) for m in tail),
                ],
                compacted_from=session_id,
            )
        )
        await self.store.start_compacted(tenant, created.id, size=1 + len(tail), summary_messages=1)
        await self.store.reset_failures(tenant, session_id, "compact")
        result.new_session_id = created.id
        result.items = len(earlier)
        result.extra = {"retained_messages": len(tail), "summarised_messages": len(earlier)}

    async def _write_summary(
        self,
        tenant: str,
        session_id: str,
        previous: str,
        chunk: Sequence[common_pb2.Message],
        model: str,
        result: JobResult,
    ) -> str:
        prompt = (
            (f"Summary of the earlier part:\n{previous}\n\n" if previous else "")
            + "Conversation:\n"
            + transcript.render(chunk, self.summaries.max_chars(previous))
        )
        messages = [
            common_pb2.Message(role=common_pb2.ROLE_SYSTEM, content=COMPACTION_INSTRUCTIONS),
            common_pb2.Message(role=common_pb2.ROLE_USER, content=prompt),
        ]
        for attempt in range(2):
            response = await self.llm.chat(
                llm_pb2.ChatRequest(
                    model=model or self.summaries.model,
                    messages=messages,
                    tools=[WRITE_SUMMARY],
                    max_tokens=self.summaries.max_summary_tokens,
                    tenant=tenant,
                    session_id=session_id,
                )
            )
            result.add_usage(response.done.usage)
            if response.done.finish_reason == common_pb2.FINISH_REASON_INTERRUPTED:
                raise errors.Unavailable(f"the summariser's answer was cut: {response.done.error}")
            for call in response.message.tool_calls:
                if call.name == WRITE_SUMMARY.name:
                    return _summary_argument(call.arguments_json)
            if attempt == 0:
                messages.append(
                    common_pb2.Message(
                        role=common_pb2.ROLE_ASSISTANT, content=response.message.content
                    )
                )
                messages.append(common_pb2.Message(role=common_pb2.ROLE_USER, content=NUDGE))
        raise errors.Unavailable("the summariser did not call write_summary, even when nudged")


def _summary_argument(arguments_json: str) -> str:
    try:
        arguments = json.loads(arguments_json)
    except json.JSONDecodeError as exc:
        raise errors.Unavailable(f"write_summary's arguments are not JSON: {exc}") from None
    summary = arguments.get("summary") if isinstance(arguments, dict) else None
    if not isinstance(summary, str) or not summary.strip():
        raise errors.Unavailable("write_summary was called without a summary")
    return summary.strip()
