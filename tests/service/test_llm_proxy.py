"""llm_proxy as a real gRPC server in front of the scripted fake upstream.

What a caller of LlmProxy sees (chunks, errors, timing) and what the proxy
sent upstream and published, for healthy answers and for every fault the
fake can inject.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from tests.conftest import FAKE_MODEL, make_settings
from tests.service.conftest import EventRecorder, attrs, private_stack, upstream_config
from threadline import errors
from threadline.channels import unary
from threadline.config import Settings, load_settings
from threadline.events import InProcessEventBus
from threadline.peers import LlmClient
from threadline.stack import Stack, start_stack
from threadline.testing.fake_upstream import (
    FakeUpstream,
    RecordedRequest,
    Script,
    estimate_prompt_tokens,
)
from threadline.v1 import common_pb2, llm_pb2

FIRST_TOKEN_S = 1.0
IDLE_S = 1.5
TOTAL_S = 4.0
MAX_ATTEMPTS = 3  # make_settings' retry policy

QUESTION = "What is the capital of France?"


@pytest.fixture
def settings(tmp_path: Path, fake_upstream: FakeUpstream, redis_url: str) -> Settings:
    upstream = upstream_config(
        fake_upstream.base_url,
        first_token_s=FIRST_TOKEN_S,
        idle_between_chunks_s=IDLE_S,
        total_s=TOTAL_S,
    )
    return make_settings(
        tmp_path, fake_upstream.base_url, redis_url=redis_url, llm={"upstream": upstream}
    )


@pytest.fixture
async def stack(settings: Settings, redis_client: aioredis.Redis) -> AsyncIterator[Stack]:
    async with private_stack(settings, ["llm_proxy"]) as running:
        yield running


@pytest.fixture
async def llm(stack: Stack) -> AsyncIterator[LlmClient]:
    client = LlmClient(stack.address("llm_proxy"))
    yield client
    await client.close()


def request(text: str = QUESTION, **fields: Any) -> llm_pb2.ChatRequest:
    messages = [
        common_pb2.Message(role=common_pb2.ROLE_SYSTEM, content="Answer in one word."),
        common_pb2.Message(role=common_pb2.ROLE_USER, content=text),
    ]
    return llm_pb2.ChatRequest(messages=messages, **fields)


async def collect(llm: LlmClient, req: llm_pb2.ChatRequest) -> list[llm_pb2.ChatChunk]:
    return [chunk async for chunk in llm.stream_chat(req)]


def kinds(chunks: list[llm_pb2.ChatChunk]) -> list[str | None]:
    return [c.WhichOneof("chunk") for c in chunks]


def text_of(chunks: list[llm_pb2.ChatChunk]) -> str:
    return "".join(c.delta for c in chunks if c.WhichOneof("chunk") == "delta")


def only_done(chunks: list[llm_pb2.ChatChunk]) -> llm_pb2.ChatDone:
    dones = [c.done for c in chunks if c.WhichOneof("chunk") == "done"]
    assert len(dones) == 1, kinds(chunks)
    assert kinds(chunks)[-1] == "done", "nothing may follow the done chunk"
    return dones[0]


# -- healthy answers -------------------------------------------------------------


async def test_stream_sends_deltas_then_one_done_with_usage_and_names(
    llm: LlmClient, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.default = Script(text="Paris is the capital.")

    chunks = await collect(llm, request())

    assert kinds(chunks)[0] == "attempt"
    assert chunks[0].attempt.status == "started" and chunks[0].attempt.attempt == 1
    # However the upstream's tokens are grouped into deltas, only deltas come between.
    assert set(kinds(chunks)[1:-1]) == {"delta"} and kinds(chunks)[-1] == "done"
    assert text_of(chunks) == "Paris is the capital."
    done = only_done(chunks)
    assert done.finish_reason == common_pb2.FINISH_REASON_STOP
    assert done.content == "Paris is the capital."
    assert (done.model, done.upstream, done.attempts) == (FAKE_MODEL, "fake", 1)
    sent = fake_upstream.chat_requests()[0].body
    prompt_tokens = estimate_prompt_tokens(sent["messages"])
    assert done.usage == common_pb2.Usage(
        prompt_tokens=prompt_tokens, completion_tokens=4, total_tokens=prompt_tokens + 4
    )
    assert done.error == ""
    assert sent["messages"] == [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": QUESTION},
    ]
    assert sent["model"] == FAKE_MODEL and sent["stream"] is True


async def test_chat_returns_the_whole_answer_in_one_response(
    llm: LlmClient, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.default = Script(text="Paris, of course.")

    response = await llm.chat(request())

    assert response.message.role == common_pb2.ROLE_ASSISTANT
    assert response.message.content == "Paris, of course."
    assert not response.message.interrupted
    assert response.done.finish_reason == common_pb2.FINISH_REASON_STOP
    assert response.done.usage.completion_tokens == 3
    assert response.done.model == FAKE_MODEL and response.done.upstream == "fake"


async def test_sequential_answers_reuse_one_upstream_connection(
    llm: LlmClient, fake_upstream: FakeUpstream
) -> None:
    # Connecting again for every request costs the proxy a TCP handshake each time.
    fake_upstream.default = Script(tokens=20)
    before = fake_upstream.connections_accepted

    for _ in range(5):
        chunks = await collect(llm, request())
        assert chunks[-1].done.finish_reason == common_pb2.FINISH_REASON_STOP

    assert fake_upstream.connections_accepted - before == 1


async def test_list_models_names_the_served_model_and_its_upstream(llm: LlmClient) -> None:
    listed = await unary(llm.stub.ListModels(llm_pb2.ListModelsRequest()))
    assert list(listed.models) == [llm_pb2.ModelInfo(id=FAKE_MODEL, upstream="fake")]


async def test_request_options_and_json_mode_reach_the_upstream(
    llm: LlmClient, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.default = Script(text='{"capital": "Paris"}')

    response = await llm.chat(
        request(
            model=FAKE_MODEL,
            max_tokens=64,
            temperature=0.25,
            stop=["\n\n"],
            response_format=llm_pb2.RESPONSE_FORMAT_JSON_OBJECT,
        )
    )

    assert json.loads(response.message.content) == {"capital": "Paris"}
    sent = fake_upstream.chat_requests()[0].body
    assert sent["response_format"] == {"type": "json_object"}
    assert (sent["max_tokens"], sent["temperature"], sent["stop"]) == (64, 0.25, ["\n\n"])


async def test_text_response_format_sends_no_response_format(
    llm: LlmClient, fake_upstream: FakeUpstream
) -> None:
    await llm.chat(request(response_format=llm_pb2.RESPONSE_FORMAT_TEXT))
    assert "response_format" not in fake_upstream.chat_requests()[0].body


async def test_tool_calls_stream_as_deltas_and_are_assembled_in_done(
    llm: LlmClient, fake_upstream: FakeUpstream
) -> None:
    weather_args = '{"city": "Paris", "unit": "celsius"}'
    time_args = '{"timezone": "Europe/Paris"}'
    fake_upstream.default = Script(tool_calls=[("get_weather", weather_args), ("now", time_args)])
    tools = [
        common_pb2.ToolSpec(
            name="get_weather",
            description="Current weather",
            parameters_json='{"type": "object", "properties": {"city": {"type": "string"}}}',
        )
    ]

    chunks = await collect(llm, request(tools=tools))

    assert "delta" not in kinds(chunks)
    deltas = [c.tool_call_delta for c in chunks if c.WhichOneof("chunk") == "tool_call_delta"]
    assert {d.index for d in deltas} == {0, 1}
    rebuilt = {
        i: "".join(d.arguments_delta for d in deltas if d.index == i) for i in sorted({0, 1})
    }
    assert rebuilt == {0: weather_args, 1: time_args}
    done = only_done(chunks)
    assert done.finish_reason == common_pb2.FINISH_REASON_TOOL_CALLS
    assert [(c.name, c.arguments_json) for c in done.tool_calls] == [
        ("get_weather", weather_args),
        ("now", time_args),
    ]
    assert all(c.id.startswith("call_") for c in done.tool_calls)
    assert len({c.id for c in done.tool_calls}) == 2
    sent = fake_upstream.chat_requests()[0].body
    assert sent["tools"][0]["function"]["name"] == "get_weather"
    assert sent["tools"][0]["function"]["parameters"]["properties"] == {"city": {"type": "string"}}


async def test_max_tokens_cut_is_length_not_stop(
    llm: LlmClient, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.default = Script(tokens=10)

    chunks = await collect(llm, request(max_tokens=3))

    assert text_of(chunks) == "tok0 tok1 tok2 "
    assert only_done(chunks).finish_reason == common_pb2.FINISH_REASON_LENGTH


async def test_upstream_content_filter_finish_is_reported(
    llm: LlmClient, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.default = Script(text="I cannot", finish_reason="content_filter")

    response = await llm.chat(request())

    assert response.done.finish_reason == common_pb2.FINISH_REASON_CONTENT_FILTER
    assert response.message.content == "I cannot"


# -- failures before the first token ---------------------------------------------


async def test_500_once_is_retried_and_the_answer_is_complete(
    llm: LlmClient, fake_upstream: FakeUpstream, events: EventRecorder
) -> None:
    fake_upstream.enqueue(Script.error(500, "worker crashed"))
    fake_upstream.default = Script(text="Paris.")

    chunks = await collect(llm, request())

    assert text_of(chunks) == "Paris."
    done = only_done(chunks)
    assert done.finish_reason == common_pb2.FINISH_REASON_STOP and done.attempts == 2
    attempts = [(c.attempt.attempt, c.attempt.status) for c in chunks if c.HasField("attempt")]
    assert attempts == [(1, "started"), (1, "failed"), (2, "started")]
    assert len(fake_upstream.chat_requests()) == 2
    (retry,) = await events.wait_for("llm.retry")
    assert attrs(retry)["attempt"] == 1 and attrs(retry)["reason"] == "http_500"
    assert attrs(retry)["upstream"] == "fake"
    (failed,) = events.of_type("llm.attempt_failed")
    assert attrs(failed)["status"] == 500


async def test_persistent_503_is_unavailable_after_max_attempts(
    llm: LlmClient, fake_upstream: FakeUpstream, events: EventRecorder
) -> None:
    fake_upstream.default = Script.error(503, "overloaded")

    with pytest.raises(errors.Unavailable, match="overloaded"):
        await collect(llm, request())

    assert len(fake_upstream.chat_requests()) == MAX_ATTEMPTS
    await events.wait_for("llm.attempt_failed", count=MAX_ATTEMPTS)
    await events.settle()
    assert len(events.of_type("llm.retry")) == MAX_ATTEMPTS - 1


async def test_generic_400_is_not_retried_and_is_invalid_argument(
    llm: LlmClient, fake_upstream: FakeUpstream, events: EventRecorder
) -> None:
    fake_upstream.default = Script.error(
        400, "temperature must be <= 2", error_type="invalid_request_error", param="temperature"
    )

    with pytest.raises(errors.InvalidArgument, match="temperature must be <= 2") as caught:
        await collect(llm, request())

    assert caught.value.details["upstream_status"] == "400"
    assert len(fake_upstream.chat_requests()) == 1
    await events.settle()
    assert events.types("llm.") == ["llm.attempt_failed"]


@pytest.mark.parametrize(
    ("script", "reason", "upstream_text"),
    [
        (Script.context_length_exceeded(4096), "context_length_exceeded", "maximum context length"),
        (Script.content_filter(), "content_filter", "content management policy"),
    ],
)
async def test_refusals_are_failed_precondition_with_the_reason(
    llm: LlmClient,
    fake_upstream: FakeUpstream,
    events: EventRecorder,
    script: Script,
    reason: str,
    upstream_text: str,
) -> None:
    fake_upstream.default = script

    with pytest.raises(errors.FailedPrecondition) as caught:
        await llm.chat(request())

    assert reason in caught.value.message and upstream_text in caught.value.message
    assert caught.value.details["reason"] == reason
    assert len(fake_upstream.chat_requests()) == 1
    await events.settle()
    assert events.of_type("llm.retry") == []


async def test_429_retry_after_is_honoured(
    llm: LlmClient, fake_upstream: FakeUpstream, events: EventRecorder
) -> None:
    fake_upstream.enqueue(Script.rate_limited(retry_after=1))
    fake_upstream.default = Script(text="Paris.")

    response = await llm.chat(request())

    assert response.message.content == "Paris."
    first, second = fake_upstream.chat_requests()
    assert second.received_at - first.received_at >= 0.95
    (retry,) = await events.wait_for("llm.retry")
    assert attrs(retry)["reason"] == "http_429" and attrs(retry)["delay_s"] == 1.0


async def test_malformed_chunk_before_any_token_is_retried(
    llm: LlmClient, fake_upstream: FakeUpstream, events: EventRecorder
) -> None:
    fake_upstream.enqueue(Script(text="garbage first", fault="malformed", fault_after=0))
    fake_upstream.default = Script(text="Paris.")

    chunks = await collect(llm, request())

    assert text_of(chunks) == "Paris."
    assert only_done(chunks).finish_reason == common_pb2.FINISH_REASON_STOP
    assert len(fake_upstream.chat_requests()) == 2
    (failed,) = await events.wait_for("llm.attempt_failed")
    assert attrs(failed)["reason"] == "malformed_chunk"


async def test_first_token_timeout_after_headers_is_unavailable_and_not_retried(
    llm: LlmClient, fake_upstream: FakeUpstream, events: EventRecorder
) -> None:
    # Headers arrive at once, the first token never does in time.
    fake_upstream.default = Script(text="too late", first_token_delay_s=10)

    started = time.monotonic()
    with pytest.raises(errors.Unavailable, match="first token"):
        await collect(llm, request())
    elapsed = time.monotonic() - started

    assert FIRST_TOKEN_S - 0.1 <= elapsed < FIRST_TOKEN_S + 1.0
    assert len(fake_upstream.chat_requests()) == 1
    (failed,) = await events.wait_for("llm.attempt_failed")
    assert attrs(failed)["reason"] == "first_token_timeout"


async def test_silent_upstream_fails_within_the_first_token_timeout(
    llm: LlmClient, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.default = Script(fault="silent")

    started = time.monotonic()
    with pytest.raises(errors.Unavailable):
        await collect(llm, request())
    elapsed = time.monotonic() - started

    assert len(fake_upstream.chat_requests()) == 1  # no second wait on the same upstream
    assert elapsed < FIRST_TOKEN_S + 1.0


async def test_reset_before_headers_is_retried(llm: LlmClient, fake_upstream: FakeUpstream) -> None:
    fake_upstream.enqueue(Script(fault="reset_before_headers"))
    fake_upstream.default = Script(text="Paris.")

    response = await llm.chat(request())

    assert response.message.content == "Paris."
    assert response.done.attempts == 2


# -- failures after the first token ----------------------------------------------


async def test_cut_stream_ends_interrupted_with_the_partial_text(
    llm: LlmClient, fake_upstream: FakeUpstream, events: EventRecorder
) -> None:
    fake_upstream.default = Script(tokens=10, fault="cut", fault_after=4)

    chunks = await collect(llm, request())

    assert text_of(chunks) == "tok0 tok1 tok2 tok3 "
    done = only_done(chunks)
    assert done.finish_reason == common_pb2.FINISH_REASON_INTERRUPTED
    assert done.content == "tok0 tok1 tok2 tok3 " and done.error
    assert done.usage.completion_tokens > 0  # the partial answer is still accounted
    assert len(fake_upstream.chat_requests()) == 1  # never restarted after output was sent
    (interrupted,) = await events.wait_for("llm.stream_interrupted")
    assert attrs(interrupted)["deltas_sent"] >= 1


async def test_cut_stream_through_chat_is_marked_interrupted(
    llm: LlmClient, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.default = Script(tokens=10, fault="cut", fault_after=2)

    response = await llm.chat(request())

    assert response.message.interrupted and response.message.content == "tok0 tok1 "
    assert response.done.finish_reason == common_pb2.FINISH_REASON_INTERRUPTED


async def test_malformed_chunk_after_tokens_interrupts_and_is_never_passed_on(
    llm: LlmClient, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.default = Script(tokens=6, fault="malformed", fault_after=3)

    chunks = await collect(llm, request())

    assert text_of(chunks) == "tok0 tok1 tok2 "
    done = only_done(chunks)
    assert done.finish_reason == common_pb2.FINISH_REASON_INTERRUPTED
    assert "malformed" in done.error and "not json" not in done.content


async def test_stream_without_done_marker_is_finalised_promptly(
    llm: LlmClient, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.default = Script(text="Paris, France.", fault="no_done")

    started = time.monotonic()
    chunks = await collect(llm, request())
    elapsed = time.monotonic() - started

    assert elapsed < 1.0 < IDLE_S  # not waiting for an idle timeout
    done = only_done(chunks)
    assert done.finish_reason == common_pb2.FINISH_REASON_STOP
    assert done.content == "Paris, France."
    assert done.usage.completion_tokens == 2 and done.usage.prompt_tokens > 0


async def test_stall_after_tokens_ends_interrupted_after_the_idle_timeout(
    llm: LlmClient, fake_upstream: FakeUpstream, events: EventRecorder
) -> None:
    fake_upstream.default = Script(tokens=10, fault="stall", fault_after=3)

    started = time.monotonic()
    chunks = await collect(llm, request())
    elapsed = time.monotonic() - started

    assert IDLE_S - 0.1 <= elapsed < IDLE_S + 1.0
    done = only_done(chunks)
    assert done.finish_reason == common_pb2.FINISH_REASON_INTERRUPTED
    assert done.content == "tok0 tok1 tok2 " and "idle" in done.error
    assert len(fake_upstream.chat_requests()) == 1
    (interrupted,) = await events.wait_for("llm.stream_interrupted")
    assert attrs(interrupted)["reason"] == "idle_timeout"


async def test_sse_comments_and_multiline_data_are_tolerated(
    llm: LlmClient, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.default = Script(text="Paris is lovely.", sse_comments=True, sse_multiline=True)

    chunks = await collect(llm, request())

    assert text_of(chunks) == "Paris is lovely."
    assert only_done(chunks).finish_reason == common_pb2.FINISH_REASON_STOP


# -- the upstream's API key -------------------------------------------------------

KEY_VARIABLE = "TEST_UPSTREAM_API_KEY"


def keyed_settings(tmp_path: Path, fake: FakeUpstream, environ: dict[str, str]) -> Settings:
    """llm_proxy settings whose upstream takes its key from KEY_VARIABLE in `environ`."""
    upstream = {**upstream_config(fake.base_url), "api_key_env": KEY_VARIABLE}
    return load_settings(
        environ=environ,
        overrides={"data_dir": str(tmp_path / "data"), "llm": {"upstream": upstream}},
    )


async def test_no_authorization_is_sent_without_api_key_env(
    llm: LlmClient, fake_upstream: FakeUpstream
) -> None:
    await llm.chat(request())

    assert "authorization" not in fake_upstream.chat_requests()[0].headers


async def _one_chat(settings: Settings, fake: FakeUpstream) -> RecordedRequest:
    """One chat through an llm_proxy of these settings; the request the upstream got."""
    async with private_stack(settings, ["llm_proxy"]) as stack:
        client = LlmClient(stack.address("llm_proxy"))
        try:
            await client.chat(request())
        finally:
            await client.close()
    (sent,) = fake.chat_requests()
    return sent


async def test_api_key_is_sent_as_a_bearer_token(
    tmp_path: Path, fake_upstream: FakeUpstream
) -> None:
    settings = keyed_settings(tmp_path, fake_upstream, {KEY_VARIABLE: "sk-test-upstream"})

    sent = await _one_chat(settings, fake_upstream)
    assert sent.headers["authorization"] == "Bearer sk-test-upstream"


async def test_an_empty_key_variable_sends_no_authorization(
    tmp_path: Path, fake_upstream: FakeUpstream
) -> None:
    settings = keyed_settings(tmp_path, fake_upstream, {KEY_VARIABLE: ""})

    sent = await _one_chat(settings, fake_upstream)
    assert "authorization" not in sent.headers


async def test_llm_proxy_refuses_to_start_when_its_key_variable_is_not_set(
    tmp_path: Path, fake_upstream: FakeUpstream
) -> None:
    settings = keyed_settings(tmp_path, fake_upstream, {})
    bus = InProcessEventBus()
    try:
        with pytest.raises(errors.FailedPrecondition) as caught:
            await start_stack(settings, services=["llm_proxy"], bus=bus, ephemeral_ports=True)
    finally:
        await bus.close()

    # Named twice: the variable to set, and the setting that names it.
    assert f"environment variable {KEY_VARIABLE}" in caught.value.message
    assert "llm.upstream.api_key_env" in caught.value.message
    assert fake_upstream.chat_requests() == []


# -- the caller ------------------------------------------------------------------


async def test_cancelling_the_stream_closes_the_upstream_connection(
    llm: LlmClient, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.default = Script(tokens=200, token_delay_s=0.02)
    call = llm.stub.StreamChat(request())
    received = ""
    async for chunk in call:
        received += chunk.delta
        if received.count("tok") >= 3:
            break

    call.cancel()

    await fake_upstream.wait_for_disconnects(1, timeout=3)
    assert received.startswith("tok0 tok1 tok2 ")
    assert call.cancelled()
    assert await call.code() == grpc.StatusCode.CANCELLED


async def test_unknown_model_is_invalid_argument_naming_it(
    llm: LlmClient, fake_upstream: FakeUpstream
) -> None:
    with pytest.raises(errors.InvalidArgument, match="no-such-model"):
        await collect(llm, request(model="no-such-model"))
    with pytest.raises(errors.InvalidArgument, match="no-such-model"):
        await llm.chat(request(model="no-such-model"))
    assert fake_upstream.chat_requests() == []


async def test_empty_messages_are_invalid_argument(
    llm: LlmClient, fake_upstream: FakeUpstream
) -> None:
    with pytest.raises(errors.InvalidArgument, match="messages"):
        await collect(llm, llm_pb2.ChatRequest(model=FAKE_MODEL))
    assert fake_upstream.chat_requests() == []


async def test_concurrent_streams_each_get_their_own_answer(
    llm: LlmClient, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.default = Script(tokens=5, token_delay_s=0.01)

    results = await asyncio.gather(*(collect(llm, request(f"question {i}")) for i in range(8)))

    for chunks in results:
        assert text_of(chunks) == "tok0 tok1 tok2 tok3 tok4 "
        assert only_done(chunks).finish_reason == common_pb2.FINISH_REASON_STOP
    assert sorted(r.body["messages"][1]["content"] for r in fake_upstream.chat_requests()) == [
        f"question {i}" for i in range(8)
    ]
