"""The `local` runner: a background task done by the agent loop through llm_proxy.

Unlike an interactive turn, a task has no session: its conversation (system
prompt, the task as the user message, then the model's calls and the tools'
results) lives in memory for the run, and what a user can read back is the
task's output log, one stream-json object per event:

    {"type": "delta", "text": ...}                 the text of one model call
    {"type": "assistant", "content": ...}          one per model call
    {"type": "tool_call", "id", "name", "arguments"}
    {"type": "tool_result", "id", "name", "status", "content"}
    {"type": "answer", "content": ...}             the final report

Deltas are coalesced per model call: the log is for reading back, not for
watching characters arrive, and one line per token would swamp it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from services.executor.model_call import NO_RESULT, ModelCall, StreamingModel
from services.executor.tasks.records import LogWriter, RunOutcome, TaskRecord
from services.executor.turns.tools import ToolBox
from threadline import errors
from threadline.events import EventPublisher
from threadline.logs import get_logger
from threadline.v1 import common_pb2, llm_pb2

_logger = get_logger(__name__)

DEFAULT_SYSTEM_PROMPT = (
    "You are an autonomous agent. Use the tools to do the task in the workspace, "
    "then answer with a short report."
)

#: Finish reasons after which the content is an answer to report (LENGTH: cut short
#: by max_tokens, still the model's answer).
_ANSWERED = frozenset(
    {
        common_pb2.FINISH_REASON_STOP,
        common_pb2.FINISH_REASON_LENGTH,
        common_pb2.FINISH_REASON_UNSPECIFIED,
    }
)


@dataclass
class _Usage:
    tokens_in: int = 0
    tokens_out: int = 0
    model: str = ""

    @property
    def total(self) -> int:
        return self.tokens_in + self.tokens_out


class _Failed(Exception):
    def __init__(self, reason: str, cause: str) -> None:
        super().__init__(reason)
        self.reason = reason
        #: The rule's name, for events (RunOutcome.cause).
        self.cause = cause


class LocalRunner:
    def __init__(
        self,
        llm: StreamingModel,
        tools: Callable[[str], ToolBox],
        *,
        model: str = "",
        max_iterations: int = 8,
        max_tokens: int = 1024,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        name: str = "local",
        events: EventPublisher | None = None,
    ) -> None:
        if max_iterations < 1:
            raise errors.InvalidArgument(f"max_iterations must be at least 1, got {max_iterations}")
        if max_tokens < 1:
            raise errors.InvalidArgument(f"max_tokens must be at least 1, got {max_tokens}")
        self.llm = llm
        self.tools = tools
        self.model = model
        self.max_iterations = max_iterations
        self.max_tokens = max_tokens
        self.system_prompt = system_prompt
        self.name = name
        self.events = events

    async def run(self, task: TaskRecord, log: LogWriter) -> RunOutcome:
        usage = _Usage()
        try:
            answer, note = await self._loop(task, log, usage)
        except _Failed as exc:
            return _outcome("failed", exc.reason, usage, exc.cause)
        await log({"type": "answer", "content": answer})
        return _outcome("succeeded", note, usage)

    async def _loop(self, task: TaskRecord, log: LogWriter, usage: _Usage) -> tuple[str, str]:
        """The final answer and a note about it, or _Failed with the reason."""
        try:
            toolbox = self.tools(task.workspace)
        except errors.ThreadlineError as exc:
            raise _Failed(f"workspace unusable: {exc.message}", "workspace") from None
        specs = toolbox.specs()
        messages = [
            common_pb2.Message(role=common_pb2.ROLE_SYSTEM, content=self.system_prompt),
            common_pb2.Message(role=common_pb2.ROLE_USER, content=task.prompt),
        ]
        for call_number in range(1, self.max_iterations + 1):
            request = llm_pb2.ChatRequest(
                model=self.model,
                messages=messages,
                tools=specs,
                max_tokens=self._max_tokens(task, usage),
                tenant=task.tenant,
            )
            done = await self._call(request, log, usage)
            if done.finish_reason == common_pb2.FINISH_REASON_INTERRUPTED:
                error = done.error or "no reason given"
                raise _Failed(f"the model's answer was cut: {error}", "answer_cut")
            if task.budget_tokens > 0 and usage.total > task.budget_tokens:
                raise _Failed(_over_budget(task, usage), "budget")
            if not done.tool_calls:
                return _answer(done)
            if call_number == self.max_iterations:
                # Its last calls are not run: nothing would read their results.
                break
            messages.append(
                common_pb2.Message(
                    role=common_pb2.ROLE_ASSISTANT, content=done.content, tool_calls=done.tool_calls
                )
            )
            for call in done.tool_calls:
                messages.append(await self._run_tool(task, toolbox, call, log))
        raise _Failed(
            f"stopped after {self.max_iterations} model calls (max_iterations)", "max_iterations"
        )

    def _max_tokens(self, task: TaskRecord, usage: _Usage) -> int:
        if task.budget_tokens <= 0:
            return self.max_tokens
        left = task.budget_tokens - usage.total
        if left <= 0:
            raise _Failed(_over_budget(task, usage), "budget")
        # The answer alone must not be able to overshoot what is left.
        return min(self.max_tokens, left)

    async def _run_tool(
        self, task: TaskRecord, toolbox: ToolBox, call: common_pb2.ToolCall, log: LogWriter
    ) -> common_pb2.Message:
        """Run one tool call, logged; the tool message that answers it."""
        arguments = call.arguments_json
        await log({"type": "tool_call", "id": call.id, "name": call.name, "arguments": arguments})
        result = await toolbox.call(call.name, call.arguments_json)
        if result.status == "denied" and self.events is not None:
            self.events.emit(
                "tool.denied",
                tenant=task.tenant,
                task_id=task.id,
                tool=call.name,
                tool_call_id=call.id,
                rule=result.rule,
            )
        await log(
            {
                "type": "tool_result",
                "id": call.id,
                "name": call.name,
                "status": result.status,
                "content": result.content,
            }
        )
        return common_pb2.Message(
            role=common_pb2.ROLE_TOOL, tool_call_id=call.id, name=call.name, content=result.content
        )

    async def _call(
        self, request: llm_pb2.ChatRequest, log: LogWriter, usage: _Usage
    ) -> llm_pb2.ChatDone:
        """One streamed model call, logged and counted; _Failed if there is no answer."""
        call = ModelCall()
        async for _ in call.stream(self.llm, request):
            pass  # a task's deltas are logged once, as one entry, below
        if call.partial:
            await log({"type": "delta", "text": call.partial})
        done = call.done
        if done is None:
            raise _Failed(call.failure.message if call.failure else NO_RESULT, "model_call")
        usage.tokens_in += done.usage.prompt_tokens
        usage.tokens_out += done.usage.completion_tokens
        usage.model = done.model or usage.model
        await log({"type": "assistant", "content": done.content})
        return done


def _answer(done: llm_pb2.ChatDone) -> tuple[str, str]:
    """The model's final answer and a note about it; _Failed when it is no answer."""
    if done.finish_reason not in _ANSWERED:
        name = common_pb2.FinishReason.Name(done.finish_reason)
        raise _Failed(f"the model stopped with {name}: {done.error or done.content}", "no_answer")
    note = ""
    if done.finish_reason == common_pb2.FINISH_REASON_LENGTH:
        note = "the answer reached max_tokens and may be cut short"
    return done.content, note


def _over_budget(task: TaskRecord, usage: _Usage) -> str:
    return f"token budget exceeded: used {usage.total} of {task.budget_tokens} tokens"


def _outcome(
    status: Literal["succeeded", "failed"], reason: str, usage: _Usage, cause: str = ""
) -> RunOutcome:
    if status == "failed":
        _logger.info("local_runner.failed", cause=cause, model_tokens=usage.total)
    return RunOutcome(
        status=status,
        reason=reason,
        model=usage.model,
        tokens_in=usage.tokens_in,
        tokens_out=usage.tokens_out,
        cause=cause,
    )
