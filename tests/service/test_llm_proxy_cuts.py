"""Streams cut after output: what each route's `on_cut` makes of them, rollbacks,
verified continuations, settled TPM buckets and the proxy's own time.

Upstreams point at one fake and serve different model names; upstream names carry
a per-test suffix so Redis buckets and metrics never leak between tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from tests.service.conftest import attrs
from tests.service.test_llm_proxy_routes import (
    collect,
    done_of,
    request,
    requests_for,
    route,
    running_proxy,
    upstream,
)
from tests.waiting import eventually
from threadline import errors
from threadline.testing.fake_upstream import FakeUpstream, Script, estimate_prompt_tokens
from threadline.v1 import common_pb2, llm_pb2

FULL = "Lyon sits where the Rhone meets the Saone, in the east of France."
#: What the cut target had sent: the first 4 words of FULL.
CUT_AFTER = 4
ONE_ATTEMPT = {"max_attempts": 1, "base_delay_s": 0.01, "max_delay_s": 0.01, "budget_s": 5}


@pytest.fixture
def uid() -> str:
    return uuid.uuid4().hex[:8]


def cut_route(on_cut: str, *targets: tuple[str, str]) -> dict[str, Any]:
    return {**route(*targets), "on_cut": on_cut}


def kinds(chunks: list[llm_pb2.ChatChunk]) -> list[str]:
    return [str(c.WhichOneof("chunk")) for c in chunks]


def split_at_rollback(
    chunks: list[llm_pb2.ChatChunk],
) -> tuple[str, llm_pb2.Rollback, str]:
    """(text before the one rollback, the rollback, text after it)."""
    (at,) = [i for i, c in enumerate(chunks) if c.WhichOneof("chunk") == "rollback"]
    before = "".join(c.delta for c in chunks[:at] if c.WhichOneof("chunk") == "delta")
    after = "".join(c.delta for c in chunks[at:] if c.WhichOneof("chunk") == "delta")
    return before, chunks[at].rollback, after


def first_words(text: str, n: int) -> str:
    return "".join(text.split(" ")[i] + " " for i in range(n))


async def test_restart_rolls_back_the_cut_answer_and_the_next_target_answers_whole(
    tmp_path: Path, redis_url: str, fake_upstream: FakeUpstream, uid: str
) -> None:
    a, c = f"a-{uid}", f"c-{uid}"
    llm = {
        "upstreams": [upstream(fake_upstream, a, "model-a"), upstream(fake_upstream, c, "model-c")],
        "routes": {"r": cut_route("restart", (a, "model-a"), (c, "model-c"))},
    }
    fake_upstream.route("model-a", Script(text=FULL, fault="cut", fault_after=CUT_AFTER))
    fake_upstream.route("model-c", Script(text=FULL))
    async with running_proxy(tmp_path, redis_url, llm) as proxy:
        chunks = await collect(proxy.llm, request("r"))
        (rollback_event,) = await proxy.events.wait_for("llm.rollback")
        (failover,) = await proxy.events.wait_for("llm.failover")

    before, rollback, after = split_at_rollback(chunks)
    assert before == first_words(FULL, CUT_AFTER)  # what the caller saw, then discarded
    assert after == FULL  # the whole answer again, once
    assert (rollback.reason, rollback.upstream, rollback.model) == ("restart", c, "model-c")
    assert rollback.error.startswith("reset: ")
    done = done_of(chunks)
    assert done.finish_reason == common_pb2.FINISH_REASON_STOP
    assert done.content == FULL and (done.upstream, done.rollbacks) == (c, 1)
    # The discarded answer is billed too: its prompt again and what it produced.
    (sent_c,) = requests_for(fake_upstream, "model-c")
    prompt = estimate_prompt_tokens(sent_c.body["messages"])
    assert done.usage.completion_tokens >= len(Script(text=FULL).content_tokens()) + 1
    assert done.usage.prompt_tokens > prompt
    assert attrs(failover)["restart"] is True and attrs(failover)["to_upstream"] == c
    assert attrs(rollback_event)["reason"] == "restart"
    assert "continue_final_message" not in sent_c.body  # asked afresh, not to continue


async def test_interrupt_ends_a_cut_stream_interrupted_even_with_a_prefill_fallback(
    tmp_path: Path, redis_url: str, fake_upstream: FakeUpstream, uid: str
) -> None:
    a, b = f"a-{uid}", f"b-{uid}"
    llm = {
        "upstreams": [
            upstream(fake_upstream, a, "model-a"),
            upstream(fake_upstream, b, "model-b", capabilities={"prefill": True}),
        ],
        "routes": {"r": cut_route("interrupt", (a, "model-a"), (b, "model-b"))},
    }
    fake_upstream.route("model-a", Script(text=FULL, fault="cut", fault_after=CUT_AFTER))
    fake_upstream.route("model-b", Script(text="never asked"))
    async with running_proxy(tmp_path, redis_url, llm) as proxy:
        chunks = await collect(proxy.llm, request("r"))
        await proxy.events.wait_for("llm.stream_interrupted")
        await proxy.events.settle()
        types = proxy.events.types("llm.")

    assert "rollback" not in kinds(chunks)
    done = done_of(chunks)
    assert done.finish_reason == common_pb2.FINISH_REASON_INTERRUPTED
    assert done.content == first_words(FULL, CUT_AFTER) and done.upstream == a
    # The error names what happened, not aiohttp's parser ("TransferEncodingError: 400").
    assert done.error.startswith("reset: upstream ")
    assert "mid-answer" in done.error and "400" not in done.error
    assert "Error" not in done.error.split(":", 1)[1]
    assert requests_for(fake_upstream, "model-b") == []
    assert "llm.failover" not in types and "llm.rollback" not in types


async def test_a_continuation_that_starts_over_is_rolled_back_never_garbled(
    tmp_path: Path, redis_url: str, fake_upstream: FakeUpstream, uid: str
) -> None:
    a, b = f"a-{uid}", f"b-{uid}"
    llm = {
        "upstreams": [
            upstream(fake_upstream, a, "model-a"),
            # Marked prefill-capable, but (like the fake) ignores the partial answer.
            upstream(fake_upstream, b, "model-b", capabilities={"prefill": True}),
        ],
        "routes": {"r": cut_route("continue", (a, "model-a"), (b, "model-b"))},
    }
    fake_upstream.route("model-a", Script(text=FULL, fault="cut", fault_after=CUT_AFTER))
    fake_upstream.route("model-b", Script(text=FULL))
    async with running_proxy(tmp_path, redis_url, llm) as proxy:
        chunks = await collect(proxy.llm, request("r"))
        (rollback_event,) = await proxy.events.wait_for("llm.rollback")

    before, rollback, after = split_at_rollback(chunks)
    assert before == first_words(FULL, CUT_AFTER)
    assert rollback.reason == "replayed_continuation" and rollback.upstream == b
    assert after == FULL
    done = done_of(chunks)
    assert done.content == FULL  # not the partial followed by a replay of it
    assert done.finish_reason == common_pb2.FINISH_REASON_STOP and done.rollbacks == 1
    (sent_b,) = requests_for(fake_upstream, "model-b")
    assert sent_b.body["continue_final_message"] is True  # it was asked to continue
    assert attrs(rollback_event)["discarded_deltas"] >= 1


async def test_a_genuine_continuation_is_relayed_without_a_rollback(
    tmp_path: Path, redis_url: str, fake_upstream: FakeUpstream, uid: str
) -> None:
    a, b = f"a-{uid}", f"b-{uid}"
    llm = {
        "upstreams": [
            upstream(fake_upstream, a, "model-a"),
            upstream(fake_upstream, b, "model-b", capabilities={"prefill": True}),
        ],
        "routes": {"r": cut_route("continue_then_restart", (a, "model-a"), (b, "model-b"))},
    }
    head = first_words(FULL, CUT_AFTER)
    fake_upstream.route("model-a", Script(text=FULL, fault="cut", fault_after=CUT_AFTER))
    fake_upstream.route("model-b", Script(text=FULL[len(head) :]))
    async with running_proxy(tmp_path, redis_url, llm) as proxy:
        chunks = await collect(proxy.llm, request("r"))

    assert "rollback" not in kinds(chunks)
    text = "".join(c.delta for c in chunks if c.WhichOneof("chunk") == "delta")
    assert text == FULL and done_of(chunks).content == FULL


async def test_a_refused_continuation_is_reported_then_the_answer_restarts(
    tmp_path: Path, redis_url: str, fake_upstream: FakeUpstream, uid: str
) -> None:
    a, b, c = f"a-{uid}", f"b-{uid}", f"c-{uid}"
    llm = {
        "upstreams": [
            upstream(fake_upstream, a, "model-a"),
            upstream(fake_upstream, b, "model-b", capabilities={"prefill": True}),
            upstream(fake_upstream, c, "model-c"),
        ],
        "routes": {
            "r": cut_route("continue_then_restart", (a, "model-a"), (b, "model-b"), (c, "model-c"))
        },
        "retry": ONE_ATTEMPT,
    }
    fake_upstream.route("model-a", Script(text=FULL, fault="cut", fault_after=CUT_AFTER))
    # b refuses to continue, and is down for the restart too: c answers.
    fake_upstream.route("model-b", Script.error(503, "continue_final_message is not supported"))
    fake_upstream.route("model-c", Script(text=FULL))
    async with running_proxy(tmp_path, redis_url, llm) as proxy:
        chunks = await collect(proxy.llm, request("r"))
        (refused,) = await proxy.events.wait_for("llm.continuation_refused")

    assert attrs(refused)["upstream"] == b and attrs(refused)["reason"] == "http_503"
    before, rollback, after = split_at_rollback(chunks)
    assert before == first_words(FULL, CUT_AFTER) and after == FULL
    assert rollback.upstream == c
    done = done_of(chunks)
    assert (done.content, done.upstream, done.rollbacks) == (FULL, c, 1)


async def test_restart_with_no_target_left_keeps_the_cut_answer(
    tmp_path: Path, redis_url: str, fake_upstream: FakeUpstream, uid: str
) -> None:
    a, c = f"a-{uid}", f"c-{uid}"
    llm = {
        "upstreams": [upstream(fake_upstream, a, "model-a"), upstream(fake_upstream, c, "model-c")],
        "routes": {"r": cut_route("restart", (a, "model-a"), (c, "model-c"))},
        "retry": ONE_ATTEMPT,
    }
    fake_upstream.route("model-a", Script(text=FULL, fault="cut", fault_after=CUT_AFTER))
    fake_upstream.route("model-c", Script.error(503, "down"))
    async with running_proxy(tmp_path, redis_url, llm) as proxy:
        chunks = await collect(proxy.llm, request("r"))

    # Nothing was rolled back: the caller keeps the part it saw, honestly interrupted.
    assert "rollback" not in kinds(chunks)
    done = done_of(chunks)
    assert done.finish_reason == common_pb2.FINISH_REASON_INTERRUPTED
    assert done.content == first_words(FULL, CUT_AFTER) and done.upstream == a


async def test_a_tool_call_cut_before_it_completes_is_restarted_whole(
    tmp_path: Path, redis_url: str, fake_upstream: FakeUpstream, uid: str
) -> None:
    a, c = f"a-{uid}", f"c-{uid}"
    llm = {
        "upstreams": [upstream(fake_upstream, a, "model-a"), upstream(fake_upstream, c, "model-c")],
        "routes": {"r": cut_route("continue_then_restart", (a, "model-a"), (c, "model-c"))},
    }
    call = ("read_file", '{"path": "notes/lyon.txt", "max_lines": 40}')
    # The id and name went out, then one piece of the arguments: then the cut.
    fake_upstream.route("model-a", Script(tool_calls=[call], fault="cut", fault_after=2))
    fake_upstream.route("model-c", Script(tool_calls=[call]))
    async with running_proxy(tmp_path, redis_url, llm) as proxy:
        chunks = await collect(proxy.llm, request("r"))

    at = kinds(chunks).index("rollback")
    assert "tool_call_delta" in kinds(chunks)[:at]  # the partial call had been relayed
    done = done_of(chunks)
    assert done.finish_reason == common_pb2.FINISH_REASON_TOOL_CALLS
    (whole,) = done.tool_calls
    assert (whole.name, whole.arguments_json) == call
    assert whole.id.startswith("call_fake")
    after = [c.tool_call_delta for c in chunks[at:] if c.WhichOneof("chunk") == "tool_call_delta"]
    assert "".join(d.arguments_delta for d in after) == call[1]


async def test_the_proxy_reports_its_own_time_per_request(
    tmp_path: Path, redis_url: str, fake_upstream: FakeUpstream, uid: str
) -> None:
    a = f"a-{uid}"
    llm = {"upstreams": [upstream(fake_upstream, a, "model-a")]}
    # The upstream takes 50 ms to its first token: waiting, not the proxy's own time.
    fake_upstream.route("model-a", Script(text=FULL, first_token_delay_s=0.05))
    before = REGISTRY.get_sample_value("threadline_llm_proxy_overhead_seconds_count") or 0.0
    async with running_proxy(tmp_path, redis_url, llm) as proxy:
        call = proxy.llm.stub.StreamChat(request("model-a"))
        chunks = [chunk async for chunk in call]
        trailer = dict(await call.trailing_metadata())

    done = done_of(chunks)
    assert 0 < done.proxy_overhead_ms < 50
    assert float(trailer["threadline-proxy-overhead-ms"]) == pytest.approx(
        done.proxy_overhead_ms, abs=0.001
    )
    after = REGISTRY.get_sample_value("threadline_llm_proxy_overhead_seconds_count")
    assert after == before + 1


# -- exact accounting ---------------------------------------------------------------

N_STREAMS = 100
TOKENS = 12
#: Kinds of stream, in turn: whole, cut, left by the client, refused (503).
KINDS = 4


def _accounting_script(kind: int) -> tuple[Script, int | None, int | None]:
    """(script, completion tokens the upstream reports or None when it refuses the
    request, after how many the client leaves, if it does)."""
    if kind == 1:
        return Script(tokens=TOKENS, fault="cut", fault_after=5), 5, None
    if kind == 2:
        # Stalls after 3 tokens: the client leaves once it has them.
        return Script(tokens=TOKENS, fault="stall", fault_after=3), 3, 3
    if kind == 3:
        return Script.error(503, "overloaded"), None, None
    return Script(tokens=TOKENS), TOKENS, None


async def _one_stream(proxy: Any, i: int, leaves_after: int | None) -> None:
    req = request(f"model-a-{i % KINDS}", f"Question {i}: " + "words " * (i % 7))
    if i % KINDS == 3:
        with pytest.raises(errors.Unavailable):
            await collect(proxy.llm, req)
        return
    if leaves_after is None:
        await collect(proxy.llm, req)
        return
    text = ""
    async for chunk in proxy.llm.stream_chat(req):
        text += chunk.delta
        if text.count("tok") == leaves_after:
            break  # the client leaves: the proxy is cancelled mid-stream


def _reported(fake: FakeUpstream, models: list[str], scripts: list[Any]) -> int:
    """What the upstream counted over every request it got: prompt plus completion
    tokens, nothing for the requests it refused."""
    total = 0
    for sent in fake.chat_requests():
        (_, completion, _) = scripts[models.index(str(sent.model))]
        if completion is not None:
            total += estimate_prompt_tokens(sent.body["messages"]) + completion
    return total


@pytest.mark.slow
async def test_tpm_buckets_equal_the_upstreams_reported_usage_after_100_streams(
    tmp_path: Path,
    redis_url: str,
    redis_client: aioredis.Redis,
    fake_upstream: FakeUpstream,
    uid: str,
) -> None:
    name = f"tpm-{uid}"
    models = [f"model-a-{k}" for k in range(KINDS)]
    config = upstream(
        fake_upstream, name, models[0], tpm=10_000_000, capabilities={"usage_per_chunk": True}
    )
    config = {**config, "model": "", "models": models}
    retry = {"max_attempts": 2, "base_delay_s": 0.01, "max_delay_s": 0.01, "budget_s": 5}
    # A circuit that never opens: every refused request reaches the upstream.
    circuit = {"failure_threshold": 1000}
    llm = {"upstreams": [config], "on_cut": "interrupt", "retry": retry, "circuit": circuit}
    scripts = [_accounting_script(k) for k in range(KINDS)]
    for model, (script, _, _) in zip(models, scripts, strict=True):
        fake_upstream.route(model, script)
    async with running_proxy(tmp_path, redis_url, llm) as proxy:
        for start in range(0, N_STREAMS, 20):
            await asyncio.gather(
                *(_one_stream(proxy, i, scripts[i % KINDS][2]) for i in range(start, start + 20))
            )
        expected = _reported(fake_upstream, models, scripts)
        key = f"threadline:ratelimit:{name}:tpm"

        async def charged() -> float:
            return float(await redis_client.hget(key, "charged") or 0)

        async def settled() -> bool:
            return await charged() == expected

        # Settlements run beside the answers (and after a client left): wait for them.
        with contextlib.suppress(TimeoutError):
            await eventually(settled, timeout=10)
        assert await charged() == expected
    # Every stream reached the upstream; each refused one twice (two attempts).
    assert len(fake_upstream.chat_requests()) == N_STREAMS + N_STREAMS // KINDS
