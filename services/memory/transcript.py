"""Messages as the summarising model reads them, and what they cost in tokens."""

from __future__ import annotations

from collections.abc import Sequence

from threadline.v1 import common_pb2

#: The estimate when the session store did not count a message (4 characters a token).
CHARS_PER_TOKEN = 4

_ROLE_LABELS = {
    common_pb2.ROLE_SYSTEM: "System",
    common_pb2.ROLE_USER: "User",
    common_pb2.ROLE_ASSISTANT: "Assistant",
    common_pb2.ROLE_TOOL: "Tool",
}


def tokens_of_text(text: str) -> int:
    return (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


def tokens_of(message: common_pb2.Message) -> int:
    """The session store's count (calibrated per model) or the default estimate."""
    if message.token_count:
        return message.token_count
    calls = sum(len(c.name) + len(c.arguments_json) for c in message.tool_calls)
    return max(1, (len(message.content) + calls) // CHARS_PER_TOKEN)


def total_tokens(messages: Sequence[common_pb2.Message]) -> int:
    return sum(tokens_of(m) for m in messages)


def line(message: common_pb2.Message, max_chars: int = 0) -> str:
    label = _ROLE_LABELS.get(message.role, "User")
    text = message.content
    if message.tool_calls:
        calls = ", ".join(f"{c.name}({c.arguments_json})" for c in message.tool_calls)
        text = f"{text} [calls {calls}]".strip()
    if message.role == common_pb2.ROLE_TOOL and message.name:
        label = f"Tool {message.name}"
    if max_chars and len(text) > max_chars:
        text = text[:max_chars] + f" [... {len(text) - max_chars} characters cut]"
    return f"{label}: {text}"


def render(messages: Sequence[common_pb2.Message], max_chars_each: int = 0) -> str:
    return "\n".join(line(m, max_chars_each) for m in messages if m.content or m.tool_calls)


def turn_boundary(messages: Sequence[common_pb2.Message]) -> int:
    """How many of `messages` end at a user-turn start.

    All of them when the last is a final answer (an assistant message without tool
    calls); otherwise up to the last user message: the turn in progress (a question
    not answered yet, a tool loop still running) stays out.
    """
    if not messages:
        return 0
    last = messages[-1]
    if last.role == common_pb2.ROLE_ASSISTANT and not last.tool_calls:
        return len(messages)
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].role == common_pb2.ROLE_USER:
            return index
    return 0


def chunks(
    messages: Sequence[common_pb2.Message], budget_tokens: int
) -> list[list[common_pb2.Message]]:
    """Consecutive runs of `messages`, each within `budget_tokens` (a message larger
    than the budget goes alone: `render` cuts its text)."""
    out: list[list[common_pb2.Message]] = []
    current: list[common_pb2.Message] = []
    used = 0
    for message in messages:
        cost = tokens_of(message)
        if current and used + cost > budget_tokens:
            out.append(current)
            current, used = [], 0
        current.append(message)
        used += cost
    if current:
        out.append(current)
    return out
