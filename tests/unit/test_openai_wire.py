"""The OpenAI chat-completions wire format: the body we send, the chunks we read."""

from __future__ import annotations

import json

import pytest

from services.llm_proxy.openai_wire import (
    Finish,
    MalformedChunk,
    TextDelta,
    ToolDelta,
    UsageReport,
    parse_chunk,
    request_body,
)
from threadline.v1 import common_pb2, llm_pb2

Message = common_pb2.Message
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}}


def _conversation() -> llm_pb2.ChatRequest:
    request = llm_pb2.ChatRequest(model="alias")
    request.messages.add(role=common_pb2.ROLE_SYSTEM, content="Be brief.")
    request.messages.add(role=common_pb2.ROLE_USER, content="Weather in Oslo?")
    assistant = request.messages.add(role=common_pb2.ROLE_ASSISTANT, content="")
    assistant.tool_calls.add(id="call_1", name="weather", arguments_json='{"city": "Oslo"}')
    request.messages.add(
        role=common_pb2.ROLE_TOOL, tool_call_id="call_1", name="weather", content="-3C, snow"
    )
    return request


def test_messages_keep_roles_and_tool_calls() -> None:
    body = request_body(_conversation(), "llama3", stream=True)

    assert body["model"] == "llama3"
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "content": "-3C, snow", "tool_call_id": "call_1", "name": "weather"},
    ]


def test_body_is_json_serialisable() -> None:
    request = _conversation()
    request.tools.add(name="weather", parameters_json=json.dumps(WEATHER_SCHEMA))

    body = request_body(request, "llama3", stream=True)

    assert json.loads(json.dumps(body)) == body


def test_tool_specs_become_function_tools() -> None:
    request = _conversation()
    request.tools.add(
        name="weather", description="Current weather", parameters_json=json.dumps(WEATHER_SCHEMA)
    )
    request.tools.add(name="now")

    body = request_body(request, "llama3", stream=False)

    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "description": "Current weather",
                "parameters": WEATHER_SCHEMA,
            },
        },
        {"type": "function", "function": {"name": "now", "description": "", "parameters": {}}},
    ]


def test_no_tools_key_without_tools() -> None:
    assert "tools" not in request_body(_conversation(), "m", stream=False)


def test_streaming_asks_for_usage() -> None:
    streamed = request_body(_conversation(), "m", stream=True)
    whole = request_body(_conversation(), "m", stream=False)

    assert streamed["stream"] is True
    assert streamed["stream_options"] == {"include_usage": True}
    assert whole["stream"] is False
    assert "stream_options" not in whole


def test_json_object_response_format() -> None:
    request = _conversation()
    request.response_format = llm_pb2.RESPONSE_FORMAT_JSON_OBJECT

    assert request_body(request, "m", stream=False)["response_format"] == {"type": "json_object"}


@pytest.mark.parametrize(
    "response_format", [llm_pb2.RESPONSE_FORMAT_UNSPECIFIED, llm_pb2.RESPONSE_FORMAT_TEXT]
)
def test_text_response_format_is_not_sent(response_format: int) -> None:
    request = _conversation()
    request.response_format = response_format  # type: ignore[assignment]

    assert "response_format" not in request_body(request, "m", stream=False)


def test_sampling_options_only_when_set() -> None:
    body = request_body(_conversation(), "m", stream=False)

    for key in ("temperature", "top_p", "max_tokens", "stop"):
        assert key not in body


def test_sampling_options_when_set() -> None:
    request = _conversation()
    request.temperature = 0.0  # greedy decoding is a choice, not "unset"
    request.top_p = 0.9
    request.max_tokens = 64
    request.stop.extend(["\n\n", "END"])

    body = request_body(request, "m", stream=False)

    assert body["temperature"] == 0.0
    assert body["top_p"] == pytest.approx(0.9)
    assert body["max_tokens"] == 64
    assert body["stop"] == ["\n\n", "END"]


def test_system_messages_folded_for_templates_without_system_role() -> None:
    request = _conversation()

    messages = request_body(request, "m", stream=True, system_role=False)["messages"]

    assert [m["role"] for m in messages] == ["user", "assistant", "tool"]
    assert messages[0]["content"] == "Be brief.\n\nWeather in Oslo?"


def test_content_delta() -> None:
    chunk = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}}]}

    assert parse_chunk(json.dumps(chunk)) == [TextDelta("Hel")]


def test_role_only_and_empty_deltas_yield_nothing() -> None:
    assert parse_chunk('{"choices": [{"index": 0, "delta": {"role": "assistant"}}]}') == []
    assert parse_chunk('{"choices": [{"index": 0, "delta": {"content": ""}}]}') == []
    assert parse_chunk('{"choices": [{"index": 0, "delta": {"content": null}}]}') == []


def test_tool_call_deltas() -> None:
    start = {
        "choices": [
            {
                "delta": {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "weather", "arguments": ""},
                        },
                        {"index": 1, "id": "call_2", "function": {"name": "now"}},
                    ]
                }
            }
        ]
    }
    more = {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]}}]}

    assert parse_chunk(json.dumps(start)) == [
        ToolDelta(index=0, id="call_1", name="weather", arguments=""),
        ToolDelta(index=1, id="call_2", name="now", arguments=""),
    ]
    assert parse_chunk(json.dumps(more)) == [ToolDelta(index=0, id="", name="", arguments="{")]


@pytest.mark.parametrize("reason", ["stop", "length", "tool_calls", "content_filter"])
def test_finish_reason(reason: str) -> None:
    chunk = {"choices": [{"delta": {"content": "."}, "finish_reason": reason}]}

    assert parse_chunk(json.dumps(chunk)) == [TextDelta("."), Finish(reason)]


def test_no_finish_while_streaming() -> None:
    chunk = {"choices": [{"delta": {"content": "a"}, "finish_reason": None}], "usage": None}

    assert parse_chunk(json.dumps(chunk)) == [TextDelta("a")]


def test_usage_chunk_with_cached_tokens() -> None:
    chunk = {
        "choices": [],
        "usage": {
            "prompt_tokens": 120,
            "completion_tokens": 30,
            "total_tokens": 150,
            "prompt_tokens_details": {"cached_tokens": 96},
        },
    }

    assert parse_chunk(json.dumps(chunk)) == [
        UsageReport(prompt_tokens=120, completion_tokens=30, cached_tokens=96)
    ]


def test_usage_chunk_without_cache_details() -> None:
    chunk = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}

    assert parse_chunk(json.dumps(chunk)) == [UsageReport(5, 2, 0)]


@pytest.mark.parametrize(
    ("payload", "shown"),
    [
        ('{"error": {"message": "model overloaded", "type": "server_error"}}', "model overloaded"),
        ('{"error": "out of memory"}', "out of memory"),
    ],
)
def test_error_payload_mid_stream(payload: str, shown: str) -> None:
    with pytest.raises(MalformedChunk, match=shown):
        parse_chunk(payload)


@pytest.mark.parametrize(
    "payload",
    ["not json", '{"choices": [', "[1, 2]", '"text"', '{"id": "x"}', '{"choices": ["x"]}'],
)
def test_not_a_chunk_is_malformed(payload: str) -> None:
    with pytest.raises(MalformedChunk):
        parse_chunk(payload)


@pytest.mark.parametrize(
    "payload",
    [
        '{"choices": [{"delta": "x"}]}',
        '{"choices": [{"delta": {"tool_calls": [null]}}]}',
        '{"choices": [{"delta": {"tool_calls": [{"index": null}]}}]}',
        '{"choices": [], "usage": {"prompt_tokens": "many"}}',
    ],
)
def test_wrongly_shaped_chunk_is_malformed(payload: str) -> None:
    with pytest.raises(MalformedChunk):
        parse_chunk(payload)
