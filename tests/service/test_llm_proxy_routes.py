"""llm_proxy with several upstreams: routes, failover, continuation, circuits, rate limits.

Every upstream points at the same fake; they serve different model names, so
the fake's per-model routes script each upstream separately.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.conftest import make_settings
from tests.service.conftest import EventRecorder, attrs, private_stack, upstream_config
from threadline import errors
from threadline.channels import unary
from threadline.peers import LlmClient
from threadline.testing.fake_upstream import FakeUpstream, Script
from threadline.v1 import common_pb2, llm_pb2

FIRST_TOKEN_S = 1.0
MAX_ATTEMPTS = 3  # make_settings' retry policy


@dataclass
class Proxy:
    llm: LlmClient
    events: EventRecorder


def upstream(fake: FakeUpstream, name: str, model: str, **extra: Any) -> dict[str, Any]:
    config = upstream_config(fake.base_url, first_token_s=FIRST_TOKEN_S, total_s=10)
    return {**config, "name": name, "model": model, **extra}


def route(*targets: tuple[str, str], context_fallback: str = "") -> dict[str, Any]:
    return {
        "targets": [{"upstream": u, "model": m} for u, m in targets],
        "context_fallback": context_fallback,
    }


@contextlib.asynccontextmanager
async def running_proxy(
    tmp_path: Path, redis_url: str, llm: dict[str, Any]
) -> AsyncIterator[Proxy]:
    settings = make_settings(tmp_path, None, redis_url=redis_url, llm=llm)
    async with private_stack(settings, ["llm_proxy"]) as stack:
        client = LlmClient(stack.address("llm_proxy"))
        recorder = EventRecorder(stack.bus, await stack.bus.subscribe())
        try:
            await recorder.settle()
            yield Proxy(client, recorder)
        finally:
            await recorder.close()
            await client.close()


@pytest.fixture
async def proxy(
    tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, fake_upstream: FakeUpstream
) -> AsyncIterator[Proxy]:
    """Upstreams a, b (prefill-capable) and c; routes over them."""
    llm = {
        "upstreams": [
            upstream(fake_upstream, "a", "model-a"),
            upstream(fake_upstream, "b", "model-b", capabilities={"prefill": True}),
            upstream(fake_upstream, "c", "model-c"),
        ],
        "routes": {
            "smart": route(("a", "model-a"), ("b", "model-b")),
            "plain": route(("a", "model-a"), ("c", "model-c")),
            "small": route(("a", "model-a"), context_fallback="big"),
            "big": route(("c", "model-c")),
        },
        "default_route": "plain",
    }
    async with running_proxy(tmp_path, redis_url, llm) as running:
        yield running


def request(model: str, text: str = "Tell me about Lyon.") -> llm_pb2.ChatRequest:
    return llm_pb2.ChatRequest(
        model=model, messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=text)]
    )


async def collect(llm: LlmClient, req: llm_pb2.ChatRequest) -> list[llm_pb2.ChatChunk]:
    return [chunk async for chunk in llm.stream_chat(req)]


def text_of(chunks: list[llm_pb2.ChatChunk]) -> str:
    return "".join(c.delta for c in chunks if c.WhichOneof("chunk") == "delta")


def done_of(chunks: list[llm_pb2.ChatChunk]) -> llm_pb2.ChatDone:
    assert chunks[-1].WhichOneof("chunk") == "done"
    assert sum(c.WhichOneof("chunk") == "done" for c in chunks) == 1
    return chunks[-1].done


def requests_for(fake: FakeUpstream, model: str) -> list[Any]:
    return [r for r in fake.chat_requests() if r.model == model]


async def test_list_models_shows_routes_and_served_models(proxy: Proxy) -> None:
    listed = await unary(proxy.llm.stub.ListModels(llm_pb2.ListModelsRequest()))
    pairs = {(m.id, m.upstream) for m in listed.models}
    assert {("model-a", "a"), ("model-b", "b"), ("model-c", "c")} <= pairs
    assert {("smart", "a"), ("plain", "a"), ("big", "c")} <= pairs


async def test_empty_model_uses_the_default_route(
    proxy: Proxy, fake_upstream: FakeUpstream
) -> None:
    response = await proxy.llm.chat(request(""))
    assert (response.done.upstream, response.done.model) == ("a", "model-a")


async def test_failing_upstream_fails_over_to_the_next_target(
    proxy: Proxy, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.route("model-a", Script.error(503, "a is overloaded"))
    fake_upstream.route("model-b", Script(text="Lyon is on the Rhone."))

    chunks = await collect(proxy.llm, request("smart"))

    assert text_of(chunks) == "Lyon is on the Rhone."
    done = done_of(chunks)
    assert done.finish_reason == common_pb2.FINISH_REASON_STOP
    assert (done.upstream, done.model) == ("b", "model-b")
    assert len(requests_for(fake_upstream, "model-a")) == MAX_ATTEMPTS
    assert len(requests_for(fake_upstream, "model-b")) == 1
    (failover,) = await proxy.events.wait_for("llm.failover")
    assert attrs(failover)["upstream"] == "a" and attrs(failover)["to_upstream"] == "b"


async def test_slow_first_token_fails_over_without_waiting_twice(
    proxy: Proxy, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.route("model-a", Script(text="late", first_token_delay_s=10))
    fake_upstream.route("model-c", Script(text="On time."))

    started = time.monotonic()
    response = await proxy.llm.chat(request("plain"))
    elapsed = time.monotonic() - started

    assert response.message.content == "On time." and response.done.upstream == "c"
    assert len(requests_for(fake_upstream, "model-a")) == 1
    assert elapsed < FIRST_TOKEN_S + 1.0


async def test_cut_stream_is_continued_on_a_prefill_fallback(
    proxy: Proxy, fake_upstream: FakeUpstream, redis_client: aioredis.Redis
) -> None:
    fake_upstream.route("model-a", Script(tokens=10, fault="cut", fault_after=3))
    fake_upstream.route("model-b", Script(text="and the rest."))

    chunks = await collect(proxy.llm, request("smart"))

    done = done_of(chunks)
    assert done.finish_reason == common_pb2.FINISH_REASON_STOP
    assert done.content == "tok0 tok1 tok2 and the rest." == text_of(chunks)
    assert done.upstream == "b"
    (continuation,) = requests_for(fake_upstream, "model-b")
    assert continuation.body["messages"][-1] == {
        "role": "assistant",
        "content": "tok0 tok1 tok2 ",
    }
    assert continuation.body["continue_final_message"] is True
    await proxy.events.wait_for("llm.stream_interrupted")
    (failover,) = await proxy.events.wait_for("llm.failover")
    assert attrs(failover)["continuation"] is True


async def test_cut_stream_without_a_prefill_fallback_is_interrupted(
    proxy: Proxy, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.route("model-a", Script(tokens=10, fault="cut", fault_after=3))

    chunks = await collect(proxy.llm, request("plain"))

    done = done_of(chunks)
    assert done.finish_reason == common_pb2.FINISH_REASON_INTERRUPTED
    assert done.content == "tok0 tok1 tok2 " and done.upstream == "a"
    assert requests_for(fake_upstream, "model-c") == []


async def test_cut_after_a_tool_call_delta_is_never_continued(
    proxy: Proxy, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.route(
        "model-a", Script(tool_calls=[("search", '{"q": "Lyon"}')], fault="cut", fault_after=2)
    )
    fake_upstream.route("model-b", Script(text="should not be asked"))

    chunks = await collect(proxy.llm, request("smart"))

    assert done_of(chunks).finish_reason == common_pb2.FINISH_REASON_INTERRUPTED
    assert requests_for(fake_upstream, "model-b") == []


async def test_failed_continuation_still_reports_the_original_cut(
    proxy: Proxy, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.route("model-a", Script(tokens=10, fault="cut", fault_after=3))
    fake_upstream.route("model-b", Script.error(400, "continue_final_message is not supported"))

    chunks = await collect(proxy.llm, request("smart"))

    done = done_of(chunks)
    assert done.finish_reason == common_pb2.FINISH_REASON_INTERRUPTED
    assert done.content == "tok0 tok1 tok2 "
    assert done.error.startswith("reset")  # the cut, not the fallback's refusal


async def test_context_length_exceeded_goes_to_the_context_fallback_route(
    proxy: Proxy, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.route("model-a", Script.context_length_exceeded(2048))
    fake_upstream.route("model-c", Script(text="I have room."))

    response = await proxy.llm.chat(request("small"))

    assert response.message.content == "I have room."
    assert (response.done.upstream, response.done.model) == ("c", "model-c")
    assert len(requests_for(fake_upstream, "model-a")) == 1
    (failover,) = await proxy.events.wait_for("llm.failover")
    assert attrs(failover)["to_route"] == "big"


async def test_open_circuit_skips_the_upstream(
    tmp_path: Path,
    redis_url: str,
    redis_client: aioredis.Redis,
    fake_upstream: FakeUpstream,
) -> None:
    llm = {
        "upstreams": [
            upstream(fake_upstream, "a", "model-a"),
            upstream(fake_upstream, "c", "model-c"),
        ],
        "routes": {"plain": route(("a", "model-a"), ("c", "model-c"))},
        "retry": {"max_attempts": 1, "base_delay_s": 0.01, "max_delay_s": 0.01, "budget_s": 5},
        "circuit": {"failure_threshold": 2, "cooldown_s": 60},
    }
    fake_upstream.route("model-a", Script.error(502, "bad gateway"))
    fake_upstream.route("model-c", Script(text="c answers."))
    async with running_proxy(tmp_path, redis_url, llm) as proxy:
        for _ in range(2):
            assert (await proxy.llm.chat(request("plain"))).done.upstream == "c"
        (opened,) = await proxy.events.wait_for("llm.circuit_opened")
        assert attrs(opened)["upstream"] == "a"

        for _ in range(3):
            assert (await proxy.llm.chat(request("plain"))).done.upstream == "c"

        assert len(requests_for(fake_upstream, "model-a")) == 2  # none while open


async def test_circuit_opened_mid_request_stops_the_retries_on_that_upstream(
    tmp_path: Path,
    redis_url: str,
    redis_client: aioredis.Redis,
    fake_upstream: FakeUpstream,
) -> None:
    llm = {
        "upstreams": [
            upstream(fake_upstream, "a", "model-a"),
            upstream(fake_upstream, "c", "model-c"),
        ],
        "routes": {"plain": route(("a", "model-a"), ("c", "model-c"))},
        "retry": {"max_attempts": 5, "base_delay_s": 0.01, "max_delay_s": 0.01, "budget_s": 5},
        "circuit": {"failure_threshold": 2, "cooldown_s": 60},
    }
    fake_upstream.route("model-a", Script.error(503, "down"))
    fake_upstream.route("model-c", Script(text="c answers."))
    async with running_proxy(tmp_path, redis_url, llm) as proxy:
        assert (await proxy.llm.chat(request("plain"))).done.upstream == "c"
        assert len(requests_for(fake_upstream, "model-a")) == 2


async def test_rate_limited_upstream_is_resource_exhausted_without_a_request(
    tmp_path: Path,
    redis_url: str,
    redis_client: aioredis.Redis,
    fake_upstream: FakeUpstream,
) -> None:
    llm = {
        "upstreams": [upstream(fake_upstream, "a", "model-a", rpm=1)],
        "rate_limit_wait_s": 0.2,
    }
    async with running_proxy(tmp_path, redis_url, llm) as proxy:
        assert (await proxy.llm.chat(request("model-a"))).done.finish_reason == (
            common_pb2.FINISH_REASON_STOP
        )

        started = time.monotonic()
        with pytest.raises(errors.ResourceExhausted) as caught:
            await proxy.llm.chat(request("model-a"))

        assert time.monotonic() - started < 1.0  # waited boundedly, not for the whole minute
        assert caught.value.retry_after_s is not None and caught.value.retry_after_s > 1
        assert len(fake_upstream.chat_requests()) == 1
        (limited,) = await proxy.events.wait_for("llm.rate_limited")
        assert attrs(limited)["limit"] == "rpm" and attrs(limited)["upstream"] == "a"


async def test_rate_limited_upstream_fails_over_to_the_next_target(
    tmp_path: Path,
    redis_url: str,
    redis_client: aioredis.Redis,
    fake_upstream: FakeUpstream,
) -> None:
    llm = {
        "upstreams": [
            upstream(fake_upstream, "a", "model-a", rpm=1),
            upstream(fake_upstream, "c", "model-c"),
        ],
        "routes": {"plain": route(("a", "model-a"), ("c", "model-c"))},
        "rate_limit_wait_s": 0.1,
    }
    async with running_proxy(tmp_path, redis_url, llm) as proxy:
        first = await proxy.llm.chat(request("plain"))
        second = await proxy.llm.chat(request("plain"))

    assert (first.done.upstream, second.done.upstream) == ("a", "c")
    assert len(requests_for(fake_upstream, "model-a")) == 1


async def test_cancelled_half_open_probe_does_not_exclude_the_upstream_forever(
    tmp_path: Path,
    redis_url: str,
    redis_client: aioredis.Redis,
    fake_upstream: FakeUpstream,
) -> None:
    llm = {
        "upstreams": [
            upstream(fake_upstream, "a", "model-a"),
            upstream(fake_upstream, "c", "model-c"),
        ],
        "routes": {"plain": route(("a", "model-a"), ("c", "model-c"))},
        "retry": {"max_attempts": 1, "base_delay_s": 0.01, "max_delay_s": 0.01, "budget_s": 5},
        "circuit": {"failure_threshold": 1, "cooldown_s": 0.3},
    }
    fake_upstream.route_sequence(
        "model-a",
        [Script.error(503, "down"), Script(tokens=100, token_delay_s=0.02), Script(text="a ok")],
    )
    fake_upstream.route("model-c", Script(text="c answers."))
    async with running_proxy(tmp_path, redis_url, llm) as proxy:
        assert (await proxy.llm.chat(request("plain"))).done.upstream == "c"  # a's circuit opens
        await proxy.events.wait_for("llm.circuit_opened")
        await asyncio.sleep(0.4)  # cooldown over: the next request probes a

        probe = proxy.llm.stub.StreamChat(request("plain"))
        async for chunk in probe:
            if chunk.WhichOneof("chunk") == "delta":
                break  # the caller goes away mid-probe
        probe.cancel()
        await fake_upstream.wait_for_disconnects(1)
        await asyncio.sleep(0.4)

        answered_by = [(await proxy.llm.chat(request("plain"))).done.upstream for _ in range(3)]

    assert "a" in answered_by
