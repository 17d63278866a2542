"""The OpenAI chat-completions wire format: requests out, stream chunks in."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson

from threadline.v1 import common_pb2, llm_pb2

_ROLES = {
    common_pb2.ROLE_SYSTEM: "system",
    common_pb2.ROLE_USER: "user",
    common_pb2.ROLE_ASSISTANT: "assistant",
    common_pb2.ROLE_TOOL: "tool",
}

FINISH_REASONS = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "tool_calls": common_pb2.FINISH_REASON_TOOL_CALLS,
    "function_call": common_pb2.FINISH_REASON_TOOL_CALLS,
    "content_filter": common_pb2.FINISH_REASON_CONTENT_FILTER,
}


class MalformedChunk(ValueError):
    """A stream chunk that is not a chat.completion.chunk object."""


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ToolDelta:
    index: int
    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Finish:
    reason: str


@dataclass(frozen=True)
class UsageReport:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


StreamEvent = TextDelta | ToolDelta | Finish | UsageReport


def message_to_wire(message: common_pb2.Message) -> dict[str, Any]:
    wire: dict[str, Any] = {"role": _ROLES.get(message.role, "user"), "content": message.content}
    if message.tool_calls:
        wire["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments_json},
            }
            for call in message.tool_calls
        ]
    if message.tool_call_id:
        wire["tool_call_id"] = message.tool_call_id
    if message.name:
        wire["name"] = message.name
    return wire


def fold_system_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """System text moved to the front of the first user message, for templates without
    a system role (instructions and memory would otherwise be silently dropped)."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system" and m["content"])
    rest = [m for m in messages if m["role"] != "system"]
    if not system:
        return rest
    for message in rest:
        if message["role"] == "user":
            message["content"] = f"{system}\n\n{message['content']}"
            return rest
    return [{"role": "user", "content": system}, *rest]


def request_body(
    request: llm_pb2.ChatRequest, model: str, *, stream: bool, system_role: bool = True
) -> dict[str, Any]:
    messages = [message_to_wire(m) for m in request.messages]
    body: dict[str, Any] = {
        "model": model,
        "messages": messages if system_role else fold_system_messages(messages),
        "stream": stream,
    }
    if stream:
        # Without this most servers send no usage on streams, and nothing could be billed.
        body["stream_options"] = {"include_usage": True}
    if request.max_tokens:
        body["max_tokens"] = request.max_tokens
    if request.HasField("temperature"):
        body["temperature"] = request.temperature
    if request.HasField("top_p"):
        body["top_p"] = request.top_p
    if request.stop:
        body["stop"] = list(request.stop)
    if request.response_format == llm_pb2.RESPONSE_FORMAT_JSON_OBJECT:
        body["response_format"] = {"type": "json_object"}
    if request.tools:
        body["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": tool.name,
                    "description": tool.description,
                    "parameters": json.loads(tool.parameters_json or "{}"),
                },
            }
            for tool in request.tools
        ]
    return body


def parse_chunk(data: str) -> list[StreamEvent]:
    """Events in one SSE `data:` payload; raises MalformedChunk for anything else."""
    try:
        return _parse_chunk(data)
    except (AttributeError, TypeError, ValueError) as exc:
        if isinstance(exc, MalformedChunk):
            raise
        # A chunk of the wrong shape is as broken as one that is not JSON.
        raise MalformedChunk(f"chunk has an unexpected shape ({exc}): {data[:80]!r}") from exc


def _parse_chunk(data: str) -> list[StreamEvent]:
    try:
        # orjson: one decode per streamed token is the proxy's largest Python cost,
        # and orjson does it in about a quarter of the time the standard library takes.
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise MalformedChunk(f"chunk is not JSON: {data[:80]!r}") from exc
    if not isinstance(chunk, dict):
        raise MalformedChunk(f"chunk is not an object: {data[:80]!r}")
    if "error" in chunk:
        error = chunk["error"]
        message = error.get("message") if isinstance(error, dict) else str(error)
        raise MalformedChunk(f"upstream sent an error mid-stream: {message}")
    events: list[StreamEvent] = []
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        raise MalformedChunk(f"chunk has no choices list: {data[:80]!r}")
    for choice in choices:
        if not isinstance(choice, dict):
            raise MalformedChunk("choice is not an object")
        delta = choice.get("delta") or {}
        content = delta.get("content")
        if isinstance(content, str) and content:
            events.append(TextDelta(content))
        for call in delta.get("tool_calls") or ():
            function = call.get("function") or {}
            events.append(
                ToolDelta(
                    index=int(call.get("index", 0)),
                    id=str(call.get("id") or ""),
                    name=str(function.get("name") or ""),
                    arguments=str(function.get("arguments") or ""),
                )
            )
        if choice.get("finish_reason"):
            events.append(Finish(str(choice["finish_reason"])))
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        details = usage.get("prompt_tokens_details") or {}
        events.append(
            UsageReport(
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=int(usage.get("completion_tokens") or 0),
                cached_tokens=int(details.get("cached_tokens") or 0),
            )
        )
    return events
