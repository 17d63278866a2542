"""Choosing the agent type for a task submitted without one.

One cheap model call in JSON mode picks among the registered types; the answer
is advisory: anything the classifier cannot use (a failed call, text that is
not the JSON asked for, a type nobody registered) sends the task to the
default type, and the reasons say why, so a misrouted task can be explained.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from threadline import errors
from threadline.logs import get_logger
from threadline.v1 import common_pb2, llm_pb2

log = get_logger(__name__)

#: The model sees at most this much of the task: enough to tell kinds of work apart,
#: and the call stays cheap whatever was submitted.
MAX_PROMPT_CHARS = 4_000


class ChatModel(Protocol):
    async def chat(self, request: llm_pb2.ChatRequest) -> llm_pb2.ChatResponse: ...


@dataclass(frozen=True)
class AgentType:
    name: str
    #: What tasks this type is for, as the classifier model reads it.
    description: str
    #: The runner that executes tasks of this type (e.g. "local", "command").
    runner: str


@dataclass(frozen=True)
class Classification:
    agent_type: str
    reasons: str
    #: True when the default was used because the model's choice was unusable.
    fell_back: bool


class Classifier:
    def __init__(
        self,
        llm: ChatModel,
        agent_types: Sequence[AgentType],
        *,
        default: str,
        model: str = "",
        max_tokens: int = 120,
    ) -> None:
        if not agent_types:
            raise errors.InvalidArgument("the classifier needs at least one agent type")
        names = [t.name for t in agent_types]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise errors.InvalidArgument(f"agent types registered twice: {', '.join(duplicates)}")
        if default not in names:
            raise errors.InvalidArgument(
                f"default agent type '{default}' is not registered; the types are: "
                + ", ".join(names)
            )
        self.llm = llm
        self.agent_types = {t.name: t for t in agent_types}
        self.default = default
        self.model = model
        self.max_tokens = max_tokens
        self.system_prompt = _system_prompt(agent_types)

    async def classify(self, prompt: str, *, tenant: str = "") -> Classification:
        if len(self.agent_types) == 1:
            return Classification(
                self.default, "only one agent type is registered", fell_back=False
            )
        request = llm_pb2.ChatRequest(
            model=self.model,
            messages=[
                common_pb2.Message(role=common_pb2.ROLE_SYSTEM, content=self.system_prompt),
                common_pb2.Message(role=common_pb2.ROLE_USER, content=_clip(prompt)),
            ],
            max_tokens=self.max_tokens,
            temperature=0.0,
            response_format=llm_pb2.RESPONSE_FORMAT_JSON_OBJECT,
            tenant=tenant,
        )
        try:
            response = await self.llm.chat(request)
        except errors.ThreadlineError as exc:
            return self._fallback(f"the classifier call failed ({exc.code})", exc.message)
        if response.done.finish_reason == common_pb2.FINISH_REASON_INTERRUPTED:
            return self._fallback("the classifier answer was cut", response.done.error)
        answer = response.message.content or response.done.content
        try:
            parsed = json.loads(answer)
        except (ValueError, RecursionError):
            return self._fallback("the classifier answer is not JSON", _quote(answer))
        if not isinstance(parsed, dict):
            return self._fallback("the classifier answer is not a JSON object", _quote(answer))
        chosen = parsed.get("agent_type")
        reasons = parsed.get("reasons")
        reasons = reasons.strip() if isinstance(reasons, str) else ""
        if not isinstance(chosen, str) or not chosen.strip():
            return self._fallback("the classifier answer names no agent_type", _quote(answer))
        name = self._match(chosen)
        if name is None:
            return self._fallback("the classifier chose an unknown agent type", _quote(chosen))
        return Classification(name, reasons or "(the classifier gave no reasons)", fell_back=False)

    def _match(self, chosen: str) -> str | None:
        # Small models restyle names ("Reviewer", " reviewer "): accept what is unambiguous.
        chosen = chosen.strip()
        if chosen in self.agent_types:
            return chosen
        folded = [name for name in self.agent_types if name.casefold() == chosen.casefold()]
        return folded[0] if len(folded) == 1 else None

    def _fallback(self, why: str, detail: str = "") -> Classification:
        # The log outlives the task (DeleteTask, retention and EraseTenant cannot reach
        # it), so it says why only; the model's or upstream's words, which can repeat the
        # prompt, go to the task's reason, erased with the task.
        log.warning("classifier.fell_back", default=self.default, reason=why)
        return Classification(
            self.default,
            f"{why}{': ' + detail if detail else ''}; used the default type '{self.default}'",
            fell_back=True,
        )


def _system_prompt(agent_types: Sequence[AgentType]) -> str:
    listing = "\n".join(f"- {t.name}: {t.description}" for t in agent_types)
    return (
        "You route tasks to agents. Choose the one agent type best suited to the "
        "user's task from this list:\n"
        f"{listing}\n"
        'Answer with only a JSON object: {"agent_type": "<name from the list>", '
        '"reasons": "<one short sentence>"}'
    )


def _clip(prompt: str) -> str:
    if len(prompt) <= MAX_PROMPT_CHARS:
        return prompt
    return prompt[:MAX_PROMPT_CHARS] + "\n[... task text truncated]"


def _quote(text: str, limit: int = 200) -> str:
    shown = text if len(text) <= limit else text[:limit] + "..."
    return json.dumps(shown)
