"""The fake upstream behaves like an OpenAI-compatible server, faults included."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from threadline.testing.fake_upstream import FakeUpstream, Script, estimate_prompt_tokens
from threadline.testing.fake_upstream import main as fake_upstream_cli

MESSAGES = [
    {"role": "system", "content": "be brief"},  # 8 chars
    {"role": "user", "content": "hello there, model"},  # 18 chars
]
# (8 + 18) // 4 + 2 messages
PROMPT_TOKENS = 8


def chat(*, stream: bool = True, model: str = "fake-model", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": MESSAGES, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return {**body, **extra}


async def read_events(response: httpx.Response, into: list[str]) -> None:
    """Append each SSE event's data to `into` (so it survives a mid-stream error)."""
    data: list[str] = []
    async for line in response.aiter_lines():
        if line.startswith(":"):
            continue
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif line == "" and data:
            into.append("\n".join(data))
            data = []


async def stream_events(client: httpx.AsyncClient, body: dict[str, Any]) -> list[str]:
    events: list[str] = []
    async with client.stream("POST", "/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        await read_events(response, events)
    return events


def content_of(events: list[str]) -> str:
    parts = []
    for event in events:
        if event == "[DONE]":
            continue
        for choice in json.loads(event)["choices"]:
            parts.append(choice["delta"].get("content") or "")
    return "".join(parts)


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture
async def client(fake: FakeUpstream) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=fake.base_url, timeout=5.0) as http:
        yield http


async def test_models_lists_constructor_and_routed_models(
    fake: FakeUpstream, client: httpx.AsyncClient
) -> None:
    fake.route("big-model", Script())

    response = await client.get("/models")

    assert response.status_code == 200
    assert response.json()["object"] == "list"
    assert [m["id"] for m in response.json()["data"]] == ["fake-model", "big-model"]
    assert all(m["object"] == "model" for m in response.json()["data"])


async def test_non_streaming_completion_has_text_and_usage(
    fake: FakeUpstream, client: httpx.AsyncClient
) -> None:
    fake.enqueue(Script(text="Hello there, friend."))

    response = await client.post("/chat/completions", json=chat(stream=False))

    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "fake-model"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello there, friend."}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": 3,
        "total_tokens": PROMPT_TOKENS + 3,
    }
    assert estimate_prompt_tokens(MESSAGES) == PROMPT_TOKENS


async def test_stream_has_tokens_finish_usage_and_done(client: httpx.AsyncClient) -> None:
    events = await stream_events(client, chat())

    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert content_of(events) == "".join(f"tok{i} " for i in range(8))
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": 8,
        "total_tokens": PROMPT_TOKENS + 8,
    }


async def test_stream_without_include_usage_has_no_usage_chunk(
    fake: FakeUpstream, client: httpx.AsyncClient
) -> None:
    fake.enqueue(Script(text="one two three"))

    events = await stream_events(client, chat(stream_options=None))

    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["delta"].get("content") for c in chunks] == [
        "one ",
        "two ",
        "three",
        None,
    ]
    assert all("usage" not in c for c in chunks)


async def test_max_tokens_truncates_with_finish_reason_length(client: httpx.AsyncClient) -> None:
    events = await stream_events(client, chat(max_tokens=3))

    assert content_of(events) == "tok0 tok1 tok2 "
    assert json.loads(events[-3])["choices"][0]["finish_reason"] == "length"
    assert json.loads(events[-2])["usage"]["completion_tokens"] == 3


async def test_rate_limited_with_and_without_retry_after(
    fake: FakeUpstream, client: httpx.AsyncClient
) -> None:
    fake.enqueue(Script.rate_limited(retry_after=2), Script.rate_limited())

    first = await client.post("/chat/completions", json=chat())
    second = await client.post("/chat/completions", json=chat())

    assert first.status_code == 429
    assert first.headers["retry-after"] == "2"
    assert first.json()["error"]["code"] == "rate_limit_exceeded"
    assert second.status_code == 429
    assert "retry-after" not in second.headers


@pytest.mark.parametrize(
    ("script", "code"),
    [
        (Script.context_length_exceeded(), "context_length_exceeded"),
        (Script.content_filter(), "content_filter"),
    ],
)
async def test_client_errors_carry_openai_error_codes(
    fake: FakeUpstream, client: httpx.AsyncClient, script: Script, code: str
) -> None:
    fake.enqueue(script)

    response = await client.post("/chat/completions", json=chat())

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == code
    assert error["type"] == "invalid_request_error"
    assert error["message"]


async def test_server_error_without_body_gets_a_generic_error(
    fake: FakeUpstream, client: httpx.AsyncClient
) -> None:
    fake.enqueue(Script(status=503))

    response = await client.post("/chat/completions", json=chat())

    assert response.status_code == 503
    assert response.json()["error"]["message"] == "Service Unavailable"


async def test_text_error_body_with_its_own_content_type(
    fake: FakeUpstream, client: httpx.AsyncClient
) -> None:
    page = "<html><body>502 Bad Gateway</body></html>"
    fake.enqueue(Script(status=502, error_body=page, headers={"Content-Type": "text/html"}))

    response = await client.post("/chat/completions", json=chat())

    assert response.status_code == 502
    assert response.headers.get_list("content-type") == ["text/html"]
    assert response.text == page


def test_script_rejects_impossible_values() -> None:
    with pytest.raises(ValueError, match="fault"):
        Script(fault="explode")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="status"):
        Script(status=99)
    with pytest.raises(ValueError, match="delays"):
        Script(token_delay_s=-1)


async def test_reset_before_headers_fails_the_request(
    fake: FakeUpstream, client: httpx.AsyncClient
) -> None:
    fake.enqueue(Script(fault="reset_before_headers"))

    # A TCP RST: httpx reports the reset as a read error, no response at all.
    with pytest.raises(httpx.ReadError):
        await client.post("/chat/completions", json=chat())

    assert len(fake.requests) == 1
    assert fake.disconnects == 0


async def test_silent_upstream_times_out_and_counts_the_disconnect(
    fake: FakeUpstream, client: httpx.AsyncClient
) -> None:
    fake.enqueue(Script(fault="silent"))

    with pytest.raises(httpx.ReadTimeout):
        await client.post("/chat/completions", json=chat(), timeout=0.2)

    await fake.wait_for_disconnects(1, timeout=2.0)
    await fake.wait_until(lambda: fake.open_connections == 0, timeout=2.0)


async def test_cut_ends_the_stream_with_a_protocol_error_and_no_done(
    fake: FakeUpstream, client: httpx.AsyncClient
) -> None:
    fake.enqueue(Script(fault="cut", fault_after=3))
    events: list[str] = []

    # The chunked body never gets its terminating chunk.
    with pytest.raises(httpx.RemoteProtocolError):
        async with client.stream("POST", "/chat/completions", json=chat()) as response:
            await read_events(response, events)

    assert content_of(events) == "tok0 tok1 tok2 "
    assert "[DONE]" not in events
    assert fake.disconnects == 0


async def test_cut_non_streaming_body_is_a_protocol_error(
    fake: FakeUpstream, client: httpx.AsyncClient
) -> None:
    fake.enqueue(Script(fault="cut"))

    with pytest.raises(httpx.RemoteProtocolError):
        await client.post("/chat/completions", json=chat(stream=False))


async def test_stall_sends_some_tokens_then_nothing(
    fake: FakeUpstream, client: httpx.AsyncClient
) -> None:
    fake.enqueue(Script(fault="stall", fault_after=2))
    events: list[str] = []

    with pytest.raises(httpx.ReadTimeout):
        async with client.stream("POST", "/chat/completions", json=chat(), timeout=0.3) as response:
            await read_events(response, events)

    assert content_of(events) == "tok0 tok1 "
    await fake.wait_for_disconnects(1, timeout=2.0)


async def test_malformed_chunk_appears_at_its_index(
    fake: FakeUpstream, client: httpx.AsyncClient
) -> None:
    fake.enqueue(Script(tokens=4, fault="malformed", fault_after=2))

    events = await stream_events(client, chat())

    assert events[2] == "{not json"
    rest = events[:2] + events[3:]
    assert content_of(rest) == "tok0 tok1 tok2 tok3 "
    assert rest[-1] == "[DONE]"


async def test_no_done_ends_cleanly_after_usage(
    fake: FakeUpstream, client: httpx.AsyncClient
) -> None:
    fake.enqueue(Script(tokens=3, fault="no_done"))

    events = await stream_events(client, chat())

    assert "[DONE]" not in events
    assert json.loads(events[-1])["usage"]["completion_tokens"] == 3
    assert content_of(events) == "tok0 tok1 tok2 "
    await fake.wait_until(lambda: fake.open_connections == 0, timeout=2.0)
    assert fake.disconnects == 0


async def test_tool_calls_stream_as_deltas(fake: FakeUpstream, client: httpx.AsyncClient) -> None:
    arguments = json.dumps({"path": "notes.txt", "limit": 10})
    fake.enqueue(Script(tool_calls=[("read_file", arguments), ("list_dir", "{}")]))

    events = await stream_events(client, chat())

    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    calls: dict[int, dict[str, str]] = {}
    deltas_per_call: dict[int, int] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            for delta in choice["delta"].get("tool_calls", []):
                call = calls.setdefault(delta["index"], {"id": "", "name": "", "arguments": ""})
                deltas_per_call[delta["index"]] = deltas_per_call.get(delta["index"], 0) + 1
                call["id"] += delta.get("id", "")
                call["name"] += delta.get("function", {}).get("name", "")
                call["arguments"] += delta.get("function", {}).get("arguments", "")
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        ("read_file", arguments),
        ("list_dir", "{}"),
    ]
    assert all(c["id"] for c in calls.values())
    assert deltas_per_call[0] == 4  # id and name, then arguments in 3 pieces
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert content_of(events) == ""


async def test_tool_calls_in_non_streaming_response(
    fake: FakeUpstream, client: httpx.AsyncClient
) -> None:
    fake.enqueue(Script(tool_calls=[("search", '{"q": "x"}')]))

    response = await client.post("/chat/completions", json=chat(stream=False))

    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function"
    assert call["function"] == {"name": "search", "arguments": '{"q": "x"}'}


async def test_route_beats_queue_and_queue_beats_default(
    fake: FakeUpstream, client: httpx.AsyncClient
) -> None:
    fake.route("routed", Script(text="routed"))
    fake.enqueue(Script(text="queued"))
    fake.default = Script(text="default")

    async def answer(model: str) -> str:
        response = await client.post("/chat/completions", json=chat(stream=False, model=model))
        content: str = response.json()["choices"][0]["message"]["content"]
        return content

    assert await answer("routed") == "routed"
    assert await answer("other") == "queued"
    assert await answer("routed") == "routed"
    assert await answer("other") == "default"
    assert [r.model for r in fake.requests] == ["routed", "other", "routed", "other"]
    assert fake.requests[1].script == Script(text="queued")


async def test_route_sequence_repeats_its_last_script(
    fake: FakeUpstream, client: httpx.AsyncClient
) -> None:
    fake.route_sequence("flaky", [Script(status=503), Script(status=502), Script(text="ok")])

    statuses = [
        (await client.post("/chat/completions", json=chat(model="flaky"))).status_code
        for _ in range(5)
    ]

    assert statuses == [503, 502, 200, 200, 200]


async def test_first_token_delay(fake: FakeUpstream, client: httpx.AsyncClient) -> None:
    fake.enqueue(Script(tokens=2, first_token_delay_s=0.2))
    started = time.monotonic()

    async with client.stream("POST", "/chat/completions", json=chat()) as response:
        headers_after = time.monotonic() - started
        first = await anext(response.aiter_lines())
        first_token_after = time.monotonic() - started

    assert headers_after < 0.15
    assert first.startswith("data: ")
    assert first_token_after >= 0.2


async def test_client_closing_mid_stream_is_a_disconnect(
    fake: FakeUpstream, client: httpx.AsyncClient
) -> None:
    fake.enqueue(Script(tokens=100, token_delay_s=0.02))

    async with client.stream("POST", "/chat/completions", json=chat()) as response:
        lines = response.aiter_lines()
        assert (await anext(lines)).startswith("data: ")
        assert fake.open_connections == 1
    # Leaving the block closes the unfinished response and with it the connection.

    await fake.wait_for_disconnects(1, timeout=2.0)
    await fake.wait_until(lambda: fake.open_connections == 0, timeout=2.0)


async def test_connections_are_kept_alive_between_requests(
    fake: FakeUpstream, client: httpx.AsyncClient
) -> None:
    await stream_events(client, chat())
    await client.post("/chat/completions", json=chat(stream=False))
    await client.get("/models")

    assert fake.open_connections == 1
    assert len(await fake.wait_for_requests(3, timeout=1.0)) == 3


async def test_sse_comments_and_multiline_data(
    fake: FakeUpstream, client: httpx.AsyncClient
) -> None:
    fake.enqueue(Script(text="a b", sse_comments=True, sse_multiline=True))

    async with client.stream("POST", "/chat/completions", json=chat()) as response:
        raw = (await response.aread()).decode()

    blocks = raw.split("\n\n")
    assert blocks[0] == ": ping"
    assert blocks[1].startswith("data: {") and "\ndata: " in blocks[1]
    events = [
        "\n".join(line.removeprefix("data: ") for line in block.split("\n"))
        for block in blocks
        if block.startswith("data: ")
    ]
    assert content_of(events) == "a b"
    assert events[-1] == "[DONE]"


async def test_stop_with_a_silent_request_pending_returns_promptly() -> None:
    fake = FakeUpstream(default=Script(fault="silent"))
    await fake.start()
    async with httpx.AsyncClient(base_url=fake.base_url, timeout=10.0) as client:
        pending = asyncio.create_task(client.post("/chat/completions", json=chat()))
        await fake.wait_for_requests(1, timeout=2.0)

        started = time.monotonic()
        await fake.stop()
        assert time.monotonic() - started < 1.0

        with pytest.raises(httpx.RemoteProtocolError):
            await pending
    assert fake.open_connections == 0
    assert fake.disconnects == 0


async def test_unknown_path_is_404_and_recorded(
    fake: FakeUpstream, client: httpx.AsyncClient
) -> None:
    response = await client.post("/embeddings", json={"input": "x"})

    assert response.status_code == 404
    assert fake.requests[0].path == "/v1/embeddings"
    assert fake.requests[0].body == {"input": "x"}


async def test_cli_serves_the_default_script_and_per_model_lengths() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "threadline.testing.fake_upstream",
        "--port",
        "0",
        "--tokens",
        "5",
        "--model",
        "fake-model",
        "--model",
        "summarizer",
        "--model-tokens",
        "summarizer=2",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), timeout=10.0)
        base_url = line.decode().split()[-1]
        async with httpx.AsyncClient(base_url=base_url, timeout=5.0) as client:
            events = await stream_events(client, chat())
            summary = await stream_events(client, chat(model="summarizer"))
        assert content_of(events) == "tok0 tok1 tok2 tok3 tok4 "
        assert content_of(summary) == "tok0 tok1 "
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=5.0) == 0


def test_cli_refuses_a_malformed_model_tokens_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        fake_upstream_cli(["--model-tokens", "summarizer=many"])

    assert "--model-tokens takes MODEL=N" in capsys.readouterr().err
