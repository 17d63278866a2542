"""One round of tool calls inside a turn: the assistant's calls, then each result, all stored.

The session log refuses a message whose content, or a call's arguments, is longer
than `session.max_message_chars`, and a refused append would end the turn. So
what a round stores is fitted to that limit first: a call's arguments that do
not fit are stored shortened (the tool still runs with all of them, and its
result says what was shortened), and a result that does not fit is cut with a
marker. The model sees, and the log keeps, what the session accepts.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from services.executor.turns.tools import ToolBox
from services.executor.turns.writer import SessionWriter
from threadline.events import EventPublisher
from threadline.leases import HeldLease
from threadline.v1 import common_pb2, executor_pb2, llm_pb2


@dataclass
class ToolRound:
    """Every message is appended as it completes, so a crash loses at most the one in
    flight; if the turn is cancelled mid-round, the calls not yet run get a
    "cancelled" result, so the log never holds a call without its answer.
    """

    writer: SessionWriter
    events: EventPublisher
    tenant: str
    session_id: str
    turn_id: str
    call_number: int
    #: The session's head; moves with every message stored.
    head: str
    lease: HeldLease | None = None

    @property
    def _prefix(self) -> str:
        return f"{self.turn_id}:{self.call_number}"

    async def run(
        self, toolbox: ToolBox, done: llm_pb2.ChatDone
    ) -> AsyncIterator[executor_pb2.TurnEvent]:
        # A session's tools are offered before the turn names its tenant; they run in
        # that tenant's workspace, never in another tenant's under the same session id.
        toolbox = toolbox.for_tenant(self.tenant)
        limit = toolbox.max_message_chars
        stored = [_fitted_call(call, limit) for call in done.tool_calls]
        assistant = common_pb2.Message(
            role=common_pb2.ROLE_ASSISTANT,
            content=fit_text(done.content, limit),
            tool_calls=[call for call, _ in stored],
        )
        await self._store([assistant], "assistant")
        for index, call in enumerate(done.tool_calls):
            try:
                result = await toolbox.call(call.name, call.arguments_json)
            except asyncio.CancelledError:
                self._answer_the_rest_detached(done.tool_calls[index:], index)
                raise
            if result.status == "denied":
                self.events.emit(
                    "tool.denied",
                    tenant=self.tenant,
                    session_id=self.session_id,
                    turn_id=self.turn_id,
                    tool=call.name,
                    tool_call_id=call.id,
                    rule=result.rule,
                )
            content = fit_text(stored[index][1] + result.content, limit)
            message = common_pb2.Message(
                role=common_pb2.ROLE_TOOL,
                tool_call_id=call.id,
                name=call.name,
                content=content,
            )
            await self._store([message], f"tool:{index}")
            yield executor_pb2.TurnEvent(
                tool_result=executor_pb2.ToolResult(
                    tool_call_id=call.id,
                    name=call.name,
                    content=content,
                    status=result.status,
                )
            )

    async def _store(self, messages: list[common_pb2.Message], what: str) -> None:
        self.head = await self.writer.append(
            self.tenant, self.session_id, self.head, messages, f"{self._prefix}:{what}", self.lease
        )

    def _answer_the_rest_detached(self, calls: Sequence[common_pb2.ToolCall], first: int) -> None:
        messages = [
            common_pb2.Message(
                role=common_pb2.ROLE_TOOL,
                tool_call_id=call.id,
                name=call.name,
                content="cancelled: the turn ended before this tool ran",
            )
            for call in calls
        ]
        self.writer.append_detached(
            self.tenant,
            self.session_id,
            self.head,
            messages,
            f"{self._prefix}:cancelled:{first}",
            lost="turn.tool_results_lost",
            lease=self.lease,
        )


def fit_text(text: str, limit: int) -> str:
    """`text`, cut with a marker if it is longer than `limit` characters."""
    if len(text) <= limit:
        return text
    marker = "\n[... cut: {} characters left out; the conversation keeps {} per message]"
    # Room for the marker with the largest number it can hold: the result never passes
    # the limit.
    keep = limit - len(marker.format(len(text), limit))
    if keep <= 0:
        return text[:limit]
    return text[:keep] + marker.format(len(text) - keep, limit)


def _fitted_call(call: common_pb2.ToolCall, limit: int) -> tuple[common_pb2.ToolCall, str]:
    """The call as it can be stored, and a note for its result if it was shortened."""
    arguments = fit_arguments(call.arguments_json, limit)
    if arguments == call.arguments_json:
        return call, ""
    note = (
        f"[note: this call's arguments ({len(call.arguments_json)} characters) are longer "
        f"than the conversation keeps ({limit}); the tool ran with all of them, but the "
        "call is stored shortened]\n"
    )
    return common_pb2.ToolCall(id=call.id, name=call.name, arguments_json=arguments), note


def fit_arguments(arguments_json: str, limit: int) -> str:
    """The arguments within `limit` characters: the longest values of a JSON object are
    replaced by a placeholder until it fits, so the stored call still names its
    other arguments (a file's path, say); anything else becomes a stub object."""
    if len(arguments_json) <= limit:
        return arguments_json
    try:
        args = json.loads(arguments_json)
    except (ValueError, RecursionError):
        args = None
    if isinstance(args, dict):
        sizes = {key: _size(value) for key, value in args.items()}
        for key in sorted(sizes, key=sizes.__getitem__, reverse=True):
            args[key] = f"[{sizes[key]} characters, not stored]"
            fitted = json.dumps(args, ensure_ascii=False)
            if len(fitted) <= limit:
                return fitted
    stub = json.dumps({"not_stored": f"arguments of {len(arguments_json)} characters"})
    return stub if len(stub) <= limit else "{}"


def _size(value: object) -> int:
    """Characters a value takes: a string's own length, anything else's JSON."""
    return len(value) if isinstance(value, str) else len(json.dumps(value, ensure_ascii=False))
