"""One round of tool calls inside a turn: the assistant's calls, then each result, all stored."""

from __future__ import annotations

import asyncio
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
        assistant = common_pb2.Message(
            role=common_pb2.ROLE_ASSISTANT, content=done.content, tool_calls=done.tool_calls
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
                    reason=result.reason,
                )
            message = common_pb2.Message(
                role=common_pb2.ROLE_TOOL,
                tool_call_id=call.id,
                name=call.name,
                content=result.content,
            )
            await self._store([message], f"tool:{index}")
            yield executor_pb2.TurnEvent(
                tool_result=executor_pb2.ToolResult(
                    tool_call_id=call.id,
                    name=call.name,
                    content=result.content,
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
