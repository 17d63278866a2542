"""llm_proxy under sustained trouble: persistent refusals, outages and recovery,
limits shared between replicas, concurrency caps, and the /metrics endpoint.

The single-fault cases live in test_llm_proxy.py and test_llm_proxy_routes.py;
this module covers what takes several requests, several servers or a clock.
Upstream names carry a per-test suffix: rate-limit buckets in Redis and the
process-wide Prometheus series are keyed by them, so nothing leaks between
tests (or from another run sharing the Redis server).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import make_settings
from tests.service.conftest import attrs, private_stack, upstream_config
from tests.service.test_llm_proxy_routes import (
    FIRST_TOKEN_S,
    collect,
    done_of,
    request,
    requests_for,
    route,
    running_proxy,
    text_of,
    upstream,
)
from tests.waiting import eventually
from threadline import errors
from threadline.peers import LlmClient
from threadline.testing.fake_upstream import FakeUpstream, Script, estimate_prompt_tokens
from threadline.v1 import common_pb2, llm_pb2

#: RetrySettings' defaults: what an operator gets without tuning anything.
DEFAULT_RETRY = {"max_attempts": 3, "base_delay_s": 0.2, "max_delay_s": 5.0, "budget_s": 30.0}
#: One attempt per request, so each request is exactly one verdict for the circuit.
ONE_ATTEMPT = {"max_attempts": 1, "base_delay_s": 0.01, "max_delay_s": 0.01, "budget_s": 5}
ANSWER = "Lyon is on the Rhone."


@pytest.fixture
def uid() -> str:
    return uuid.uuid4().hex[:8]


def usage_of(fake: FakeUpstream, model: str, script: Script) -> common_pb2.Usage:
    """What the fake billed for its one request for `model` (see its token accounting)."""
    (sent,) = requests_for(fake, model)
    prompt = estimate_prompt_tokens(sent.body["messages"])
    completion = len(script.content_tokens())
    return common_pb2.Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


# -- persistent refusals on the primary --------------------------------------------


@pytest.mark.parametrize(
    ("script", "reason"),
    [(Script.rate_limited(), "http_429"), (Script.error(503, "overloaded"), "http_503")],
    ids=["429-without-retry-after", "503"],
)
async def test_persistent_refusal_backs_off_boundedly_then_the_fallback_answers(
    tmp_path: Path,
    redis_url: str,
    redis_client: aioredis.Redis,
    fake_upstream: FakeUpstream,
    uid: str,
    script: Script,
    reason: str,
) -> None:
    primary, fallback = f"a-{uid}", f"b-{uid}"
    llm = {
        "upstreams": [
            upstream(fake_upstream, primary, "model-a"),
            upstream(fake_upstream, fallback, "model-b"),
        ],
        "routes": {"smart": route((primary, "model-a"), (fallback, "model-b"))},
        "retry": DEFAULT_RETRY,
    }
    answer = Script(text=ANSWER)
    fake_upstream.route("model-a", script)
    fake_upstream.route("model-b", answer)
    async with running_proxy(tmp_path, redis_url, llm) as proxy:
        chunks = await collect(proxy.llm, request("smart"))
        retries = await proxy.events.wait_for("llm.retry", count=2)
        (failover,) = await proxy.events.wait_for("llm.failover")
        await proxy.events.settle()
        failed = proxy.events.of_type("llm.attempt_failed")

    # Bounded: max_attempts on the primary, each after the backoff the proxy announced.
    on_primary = requests_for(fake_upstream, "model-a")
    assert len(on_primary) == DEFAULT_RETRY["max_attempts"]
    delays = [attrs(r)["delay_s"] for r in retries]
    assert len(delays) == len(on_primary) - 1
    gaps = [b.received_at - a.received_at for a, b in itertools.pairwise(on_primary)]
    for n, (gap, delay) in enumerate(zip(gaps, delays, strict=True)):
        ceiling = min(DEFAULT_RETRY["max_delay_s"], DEFAULT_RETRY["base_delay_s"] * 2**n)
        assert 0 <= delay <= ceiling  # full jitter under the exponential ceiling
        assert delay - 0.01 <= gap <= delay + 0.5, (gaps, delays)
    # Never hammered: every attempt falls in the first second, and there are only three.
    assert on_primary[-1].received_at - on_primary[0].received_at < 1.0
    (on_fallback,) = requests_for(fake_upstream, "model-b")
    assert on_fallback.received_at >= on_primary[-1].received_at

    # The answer, its names and its usage are the fallback's.
    assert text_of(chunks) == ANSWER
    done = done_of(chunks)
    assert done.finish_reason == common_pb2.FINISH_REASON_STOP
    assert (done.upstream, done.model) == (fallback, "model-b")
    assert done.attempts == len(on_primary) + 1
    assert done.usage == usage_of(fake_upstream, "model-b", answer)
    assert done.usage.completion_tokens > 0 and done.usage.prompt_tokens > 0
    attempts = [
        (c.attempt.attempt, c.attempt.upstream, c.attempt.status, c.attempt.reason)
        for c in chunks
        if c.HasField("attempt")
    ]
    expected: list[tuple[int, str, str, str]] = []
    for n in range(1, len(on_primary) + 1):
        expected += [(n, primary, "started", ""), (n, primary, "failed", reason)]
    expected.append((len(on_primary) + 1, fallback, "started", ""))
    assert attempts == expected

    assert {attrs(r)["reason"] for r in retries} == {reason}
    assert [attrs(f)["reason"] for f in failed] == [reason] * len(on_primary)
    assert attrs(failover) | {"upstream": primary} == {
        "upstream": primary,
        "model": "model-a",
        "attempt": float(len(on_primary)),
        "reason": reason,
        "to_upstream": fallback,
        "to_model": "model-b",
    }
    # Failed attempts are counted as attempts, never billed as tokens.
    assert sample(
        "threadline_llm_attempts_total", upstream=primary, model="model-a", outcome="failed"
    ) == len(on_primary)
    assert (
        sample("threadline_llm_tokens_total", upstream=primary, model="model-a", kind="completion")
        is None
    )
    assert sample(
        "threadline_llm_tokens_total", upstream=fallback, model="model-b", kind="completion"
    ) == float(done.usage.completion_tokens)
    assert sample(
        "threadline_llm_failovers_total",
        from_upstream=primary,
        to_upstream=fallback,
        reason=reason,
    ) == float(1)


async def test_silent_primary_fails_over_after_one_first_token_wait(
    tmp_path: Path,
    redis_url: str,
    redis_client: aioredis.Redis,
    fake_upstream: FakeUpstream,
    uid: str,
) -> None:
    primary, fallback = f"a-{uid}", f"b-{uid}"
    llm = {
        "upstreams": [
            upstream(fake_upstream, primary, "model-a"),
            upstream(fake_upstream, fallback, "model-b"),
        ],
        "routes": {"smart": route((primary, "model-a"), (fallback, "model-b"))},
    }
    fake_upstream.route("model-a", Script(fault="silent"))  # takes the request, never answers
    fake_upstream.route("model-b", Script(text=ANSWER))
    async with running_proxy(tmp_path, redis_url, llm) as proxy:
        started = time.monotonic()
        response = await proxy.llm.chat(request("smart"))
        elapsed = time.monotonic() - started
        (failover,) = await proxy.events.wait_for("llm.failover")

    assert response.message.content == ANSWER and response.done.upstream == fallback
    assert len(requests_for(fake_upstream, "model-a")) == 1  # not waited on a second time
    assert FIRST_TOKEN_S - 0.1 <= elapsed < FIRST_TOKEN_S + 1.0
    assert attrs(failover)["reason"] == "first_token_timeout"
    await fake_upstream.wait_for_disconnects(1)  # the silent request was abandoned


# -- an outage and its recovery, request after request -----------------------------


async def test_outage_is_served_by_the_fallback_and_recovery_returns_to_the_primary(
    tmp_path: Path,
    redis_url: str,
    redis_client: aioredis.Redis,
    fake_upstream: FakeUpstream,
    uid: str,
) -> None:
    primary, fallback = f"a-{uid}", f"c-{uid}"
    cooldown_s = 0.25
    llm = {
        "upstreams": [
            upstream(fake_upstream, primary, "model-a"),
            upstream(fake_upstream, fallback, "model-c"),
        ],
        "routes": {"plain": route((primary, "model-a"), (fallback, "model-c"))},
        "retry": ONE_ATTEMPT,
        "circuit": {"failure_threshold": 2, "cooldown_s": cooldown_s},
    }
    down = [Script.error(503, "down"), Script(fault="reset_before_headers")] * 2 + [
        Script.error(502, "still down")
    ]
    fake_upstream.route_sequence("model-a", [*down, Script(text="a is back.")])
    fake_upstream.route("model-c", Script(text="c covers."))

    served: list[tuple[str, str]] = []
    async with running_proxy(tmp_path, redis_url, llm) as proxy:
        for _ in range(20):
            response = await proxy.llm.chat(request("plain"))
            assert response.done.finish_reason == common_pb2.FINISH_REASON_STOP
            served.append((response.done.upstream, response.message.content))
            await asyncio.sleep(cooldown_s / 3)
        await proxy.events.settle()
        circuit = [
            (e.type, attrs(e)["upstream"], attrs(e).get("reopened"))
            for e in proxy.events.events
            if e.type.startswith("llm.circuit_")
        ]

    assert len(served) == 20  # every request answered
    recovered_at = next(i for i, (name, _) in enumerate(served) if name == primary)
    assert served[:recovered_at] == [(fallback, "c covers.")] * recovered_at
    assert served[recovered_at:] == [(primary, "a is back.")] * (20 - recovered_at)
    assert recovered_at <= 16, served  # back on the primary with requests to spare
    # During the outage the primary saw only the failures that opened the circuit and
    # one probe per cooldown: the open circuit kept the other requests away from it.
    on_primary = requests_for(fake_upstream, "model-a")
    assert len(on_primary) == len(down) + (20 - recovered_at)
    assert recovered_at > len(down)
    # Opened once by the failures, then again by every probe that failed (an operator
    # sees each re-open), closed by the probe that succeeded.
    probes = len(down) - 2  # failure_threshold
    assert probes >= 1
    assert circuit == [
        ("llm.circuit_opened", primary, False),
        *[("llm.circuit_opened", primary, True)] * probes,
        ("llm.circuit_closed", primary, None),
    ]
    assert sample("threadline_llm_circuit_open", upstream=primary) == 0.0


# -- rate limits ------------------------------------------------------------------


async def test_two_proxies_sharing_redis_respect_one_rpm_limit_together(
    tmp_path: Path,
    redis_url: str,
    redis_client: aioredis.Redis,
    fake_upstream: FakeUpstream,
    uid: str,
) -> None:
    name, rpm = f"shared-{uid}", 6
    llm = {"upstreams": [upstream(fake_upstream, name, "model-a", rpm=rpm)], "rate_limit_wait_s": 0}
    settings = make_settings(tmp_path, None, redis_url=redis_url, llm=llm)
    fake_upstream.route("model-a", Script(text="ok"))

    async def ask(client: LlmClient) -> errors.ResourceExhausted | None:
        try:
            await client.chat(request("model-a"))
        except errors.ResourceExhausted as exc:
            return exc
        return None

    async with (
        private_stack(settings, ["llm_proxy"]) as one,
        private_stack(settings, ["llm_proxy"]) as two,
    ):
        first, second = LlmClient(one.address("llm_proxy")), LlmClient(two.address("llm_proxy"))
        try:
            started = time.monotonic()
            by_first = [await ask(first) for _ in range(4)]
            # The second replica finds the first one's four requests already spent.
            by_second = await asyncio.gather(*(ask(second) for _ in range(4)))
            later = await asyncio.gather(ask(first), ask(second))
            elapsed = time.monotonic() - started
        finally:
            await first.close()
            await second.close()

    assert elapsed < 5  # well inside the minute: the bucket cannot have refilled a request
    assert by_first == [None] * 4
    assert sum(r is None for r in by_second) == rpm - 4
    refused = [r for r in [*by_second, *later] if r is not None]
    assert len(refused) == 4
    for exc in refused:
        assert exc.details["limit"] == "rpm" and exc.details["upstream"] == name
        assert exc.retry_after_s is not None and 0 < exc.retry_after_s <= 60 / rpm
    assert len(fake_upstream.chat_requests()) == rpm


def _tpm_request(max_tokens: int) -> llm_pb2.ChatRequest:
    return llm_pb2.ChatRequest(
        model="model-a",
        max_tokens=max_tokens,
        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content="x" * 40)],
    )


#: The proxy's estimate for `_tpm_request(n)`: 40 chars // 4 + 4 per message, plus n.
def _tpm_estimate(max_tokens: int) -> int:
    return 40 // 4 + 4 + max_tokens


#: Answers `_tpm_request(600)` with 589 tokens: the fake reports 11 prompt tokens
#: (40 // 4 + 1) and 589 completion tokens, 600 in all.
SPENDER = Script(tokens=589)
SPENT = 600


async def _tpm_charged(redis_client: aioredis.Redis, upstream_name: str, amount: float) -> None:
    """Wait until the upstream's TPM bucket has been settled to `amount` tokens charged."""

    async def settled() -> bool:
        charged = await redis_client.hget(f"threadline:ratelimit:{upstream_name}:tpm", "charged")
        return charged is not None and float(charged) == amount

    await eventually(settled)


async def test_tpm_refuses_a_request_whose_estimate_exceeds_the_remaining_budget(
    tmp_path: Path,
    redis_url: str,
    redis_client: aioredis.Redis,
    fake_upstream: FakeUpstream,
    uid: str,
) -> None:
    name, tpm = f"tpm-{uid}", 1000
    llm = {"upstreams": [upstream(fake_upstream, name, "model-a", tpm=tpm)], "rate_limit_wait_s": 0}
    fake_upstream.route_sequence("model-a", [SPENDER, Script(text="ok")])
    async with running_proxy(tmp_path, redis_url, llm) as proxy:
        await proxy.llm.chat(_tpm_request(600))  # 600 of 1000 tokens used
        # Reserved at its estimate (614), then settled with the upstream's count.
        await _tpm_charged(redis_client, name, SPENT)
        with pytest.raises(errors.ResourceExhausted) as caught:
            await proxy.llm.chat(_tpm_request(500))  # ~514 > the ~400 left
        # A refusal takes nothing: a request that fits the remainder still goes through.
        small = await proxy.llm.chat(_tpm_request(300))
        (limited,) = await proxy.events.wait_for("llm.rate_limited")

    assert small.done.finish_reason == common_pb2.FINISH_REASON_STOP
    assert caught.value.details["limit"] == "tpm"
    missing = _tpm_estimate(500) - (tpm - SPENT)
    per_second = tpm / 60
    assert caught.value.retry_after_s is not None
    assert 0 < caught.value.retry_after_s <= missing / per_second + 0.01
    assert attrs(limited)["limit"] == "tpm" and attrs(limited)["upstream"] == name
    assert [r.body["max_tokens"] for r in fake_upstream.chat_requests()] == [600, 300]


async def test_a_request_refused_by_tpm_does_not_spend_an_rpm_token(
    tmp_path: Path,
    redis_url: str,
    redis_client: aioredis.Redis,
    fake_upstream: FakeUpstream,
    uid: str,
) -> None:
    name = f"both-{uid}"
    llm = {
        "upstreams": [upstream(fake_upstream, name, "model-a", rpm=2, tpm=1000)],
        "rate_limit_wait_s": 0,
    }
    fake_upstream.route_sequence("model-a", [SPENDER, Script(text="ok")])
    async with running_proxy(tmp_path, redis_url, llm) as proxy:
        await proxy.llm.chat(_tpm_request(600))
        await _tpm_charged(redis_client, name, SPENT)
        with pytest.raises(errors.ResourceExhausted) as refused:
            await proxy.llm.chat(_tpm_request(500))  # refused by TPM, never sent
        assert refused.value.details["limit"] == "tpm"
        # One request sent of the two a minute allows: this one fits both limits.
        await proxy.llm.chat(_tpm_request(300))

    assert len(fake_upstream.chat_requests()) == 2


# -- concurrency --------------------------------------------------------------------

#: 4 tokens 0.1 s apart after a 0.1 s first token: at least 0.4 s at the upstream.
SLOW = Script(tokens=4, first_token_delay_s=0.1, token_delay_s=0.1)
SLOW_S = 0.4


@contextlib.asynccontextmanager
async def peak(probe: Callable[[], int]) -> AsyncIterator[list[int]]:
    """The largest value `probe` returned while the block ran (sampled every 2 ms)."""
    seen = [probe()]

    async def watch() -> None:
        while True:
            seen.append(probe())
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    try:
        yield seen
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


async def test_max_concurrency_caps_requests_in_flight_and_extra_ones_wait(
    tmp_path: Path,
    redis_url: str,
    redis_client: aioredis.Redis,
    fake_upstream: FakeUpstream,
    uid: str,
) -> None:
    name = f"narrow-{uid}"
    llm = {
        "upstreams": [upstream(fake_upstream, name, "model-a", max_concurrency=2)],
        "rate_limit_wait_s": 5,
    }
    fake_upstream.route("model-a", SLOW)
    async with running_proxy(tmp_path, redis_url, llm) as proxy:
        async with peak(lambda: fake_upstream.open_connections) as connections:
            results = await asyncio.gather(
                *(proxy.llm.chat(request("model-a", f"question {i}")) for i in range(6))
            )
        await proxy.events.settle()
        assert proxy.events.of_type("llm.rate_limited") == []

    assert all(r.done.finish_reason == common_pb2.FINISH_REASON_STOP for r in results)
    assert max(connections) <= 2
    received = sorted(r.received_at for r in fake_upstream.chat_requests())
    assert len(received) == 6
    assert received[1] - received[0] < SLOW_S / 2  # two at once: the cap is used...
    for earlier, third in zip(received, received[2:], strict=False):
        # ...and a third only starts once one of those (>= SLOW_S long) has finished.
        assert third - earlier >= SLOW_S - 0.05, received


async def test_max_concurrency_overflow_fails_over_after_the_wait(
    tmp_path: Path,
    redis_url: str,
    redis_client: aioredis.Redis,
    fake_upstream: FakeUpstream,
    uid: str,
) -> None:
    narrow, wide = f"narrow-{uid}", f"wide-{uid}"
    llm = {
        "upstreams": [
            upstream(fake_upstream, narrow, "model-a", max_concurrency=2),
            upstream(fake_upstream, wide, "model-c"),
        ],
        "routes": {"plain": route((narrow, "model-a"), (wide, "model-c"))},
        "rate_limit_wait_s": 0.1,
    }
    fake_upstream.route("model-a", SLOW)
    fake_upstream.route("model-c", Script(text="c takes the overflow."))
    async with running_proxy(tmp_path, redis_url, llm) as proxy:
        started = time.monotonic()
        results = await asyncio.gather(*(proxy.llm.chat(request("plain")) for _ in range(4)))
        elapsed = time.monotonic() - started
        limited = await proxy.events.wait_for("llm.rate_limited", count=2)
        failovers = await proxy.events.wait_for("llm.failover", count=2)

    assert sorted(r.done.upstream for r in results) == [narrow, narrow, wide, wide]
    assert len(requests_for(fake_upstream, "model-a")) == 2
    assert elapsed < SLOW_S + 1.0  # the overflow waited 0.1 s, not for a free slot
    assert {(attrs(e)["upstream"], attrs(e)["limit"]) for e in limited} == {(narrow, "concurrency")}
    assert {(attrs(e)["reason"], attrs(e)["to_upstream"]) for e in failovers} == {
        ("rate_limited", wide)
    }


async def test_zero_wait_with_max_concurrency_admits_requests_while_slots_are_free(
    tmp_path: Path,
    redis_url: str,
    redis_client: aioredis.Redis,
    fake_upstream: FakeUpstream,
    uid: str,
) -> None:
    name = f"nowait-{uid}"
    llm = {
        "upstreams": [upstream(fake_upstream, name, "model-a", max_concurrency=2)],
        "rate_limit_wait_s": 0,
    }
    fake_upstream.route("model-a", Script(text="ok"))
    async with running_proxy(tmp_path, redis_url, llm) as proxy:
        response = await proxy.llm.chat(request("model-a"))  # nothing else in flight

    assert response.message.content == "ok"


# -- circuit gauge after a continuation probe -----------------------------------------


async def test_circuit_closed_by_a_continuation_resets_the_open_gauge(
    tmp_path: Path,
    redis_url: str,
    redis_client: aioredis.Redis,
    fake_upstream: FakeUpstream,
    uid: str,
) -> None:
    primary, fallback = f"a-{uid}", f"b-{uid}"
    llm = {
        "upstreams": [
            upstream(fake_upstream, primary, "model-a"),
            upstream(fake_upstream, fallback, "model-b", capabilities={"prefill": True}),
        ],
        "routes": {"smart": route((primary, "model-a"), (fallback, "model-b"))},
        "retry": ONE_ATTEMPT,
        "circuit": {"failure_threshold": 1, "cooldown_s": 0.2},
    }
    fake_upstream.route_sequence(
        "model-a", [Script.error(503, "down"), Script(tokens=10, fault="cut", fault_after=3)]
    )
    fake_upstream.route_sequence(
        "model-b", [Script.error(503, "down"), Script(text="and the rest.")]
    )
    async with running_proxy(tmp_path, redis_url, llm) as proxy:
        with pytest.raises(errors.Unavailable):
            await proxy.llm.chat(request("smart"))  # both circuits open
        assert sample("threadline_llm_circuit_open", upstream=fallback) == 1.0
        await asyncio.sleep(0.3)
        # a's probe is cut after three tokens; b's probe continues it and succeeds.
        response = await proxy.llm.chat(request("smart"))
        assert response.done.finish_reason == common_pb2.FINISH_REASON_STOP
        assert response.done.upstream == fallback
        closed = await proxy.events.wait_for("llm.circuit_closed")
        assert [attrs(e)["upstream"] for e in closed] == [fallback]

        assert sample("threadline_llm_circuit_open", upstream=fallback) == 0.0


# -- honest endings the fake cannot script ----------------------------------------------


@contextlib.asynccontextmanager
async def close_delimited_upstream(
    deltas: list[str], finish_reason: str | None = None
) -> AsyncIterator[str]:
    """A server that writes `deltas` (then `finish_reason`, if given) at once in a
    close-delimited body (no Content-Length, no chunking) and closes cleanly: no usage,
    no [DONE]. The proxy reads several events at once, as behind a buffering reverse
    proxy, and the end is a clean EOF, not a reset."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.partition(b":")[2])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n")
        writer.write(b"connection: close\r\n\r\n")
        for text in deltas:
            choice = {"index": 0, "delta": {"content": text}, "finish_reason": None}
            writer.write(b"data: " + json.dumps({"choices": [choice]}).encode() + b"\n\n")
        if finish_reason is not None:
            choice = {"index": 0, "delta": {}, "finish_reason": finish_reason}
            writer.write(b"data: " + json.dumps({"choices": [choice]}).encode() + b"\n\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
    finally:
        server.close()
        await server.wait_closed()


async def test_stream_ending_without_finish_reason_or_done_is_not_presented_as_complete(
    tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, uid: str
) -> None:
    name = f"raw-{uid}"
    async with close_delimited_upstream(["The capital ", "of France is"]) as base_url:
        config = {**upstream_config(base_url), "name": name, "model": "model-raw"}
        async with running_proxy(tmp_path, redis_url, {"upstreams": [config]}) as proxy:
            chunks = await collect(proxy.llm, request("model-raw"))

    assert text_of(chunks) == "The capital of France is"
    done = done_of(chunks)
    assert done.content == "The capital of France is"
    assert done.finish_reason == common_pb2.FINISH_REASON_INTERRUPTED
    assert done.error


async def test_estimated_usage_counts_the_tokens_not_the_reads(
    tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, uid: str
) -> None:
    name = f"raw-{uid}"
    tokens = [f"tok{i} " for i in range(40)]
    async with close_delimited_upstream(tokens, finish_reason="stop") as base_url:
        config = {**upstream_config(base_url), "name": name, "model": "model-raw"}
        async with running_proxy(tmp_path, redis_url, {"upstreams": [config]}) as proxy:
            chunks = await collect(proxy.llm, request("model-raw"))

    done = done_of(chunks)
    assert done.finish_reason == common_pb2.FINISH_REASON_STOP
    assert done.content == "".join(tokens)
    assert done.usage_estimated
    # 40 tokens, 230 characters: any honest estimate is in this range.
    assert 20 <= done.usage.completion_tokens <= 80, done.usage


async def test_attempts_are_numbered_across_a_context_fallback(
    tmp_path: Path,
    redis_url: str,
    redis_client: aioredis.Redis,
    fake_upstream: FakeUpstream,
    uid: str,
) -> None:
    small, big = f"small-{uid}", f"big-{uid}"
    llm = {
        "upstreams": [
            upstream(fake_upstream, small, "model-a"),
            upstream(fake_upstream, big, "model-c"),
        ],
        "routes": {
            "small": route((small, "model-a"), context_fallback="big"),
            "big": route((big, "model-c")),
        },
    }
    fake_upstream.route("model-a", Script.context_length_exceeded(2048))
    fake_upstream.route("model-c", Script(text="I have room."))
    async with running_proxy(tmp_path, redis_url, llm) as proxy:
        chunks = await collect(proxy.llm, request("small"))

    started = [(c.attempt.attempt, c.attempt.upstream) for c in chunks if c.HasField("attempt")]
    assert started == [(1, small), (1, small), (2, big)]  # started, failed, started
    assert done_of(chunks).attempts == 2


async def test_tokens_of_an_interrupted_answer_are_counted_in_the_metrics(
    tmp_path: Path,
    redis_url: str,
    redis_client: aioredis.Redis,
    fake_upstream: FakeUpstream,
    uid: str,
) -> None:
    name = f"cut-{uid}"
    fake_upstream.route("model-a", Script(tokens=10, fault="cut", fault_after=4))
    async with running_proxy(
        tmp_path, redis_url, {"upstreams": [upstream(fake_upstream, name, "model-a")]}
    ) as proxy:
        done = done_of(await collect(proxy.llm, request("model-a")))

    assert done.finish_reason == common_pb2.FINISH_REASON_INTERRUPTED
    assert done.usage_estimated
    assert done.usage.completion_tokens == 5  # "tok0 tok1 tok2 tok3 ": 20 characters / 4
    assert sample(
        "threadline_llm_attempts_total", upstream=name, model="model-a", outcome="interrupted"
    ) == float(1)
    assert sample(
        "threadline_llm_tokens_total", upstream=name, model="model-a", kind="completion"
    ) == float(5)


# -- /metrics -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_metrics_endpoint_shows_attempts_and_time_to_first_token(
    tmp_path: Path,
    redis_url: str,
    redis_client: aioredis.Redis,
    fake_upstream: FakeUpstream,
    uid: str,
) -> None:
    # prometheus_client's server cannot be stopped: this port stays bound for the session.
    port = free_port()
    name = f"metered-{uid}"
    llm: dict[str, Any] = {"upstreams": [upstream(fake_upstream, name, "model-a")]}
    settings = make_settings(tmp_path, None, redis_url=redis_url, llm=llm, metrics_port=port)
    answer = Script(text="Counted, once.")
    fake_upstream.route("model-a", answer)
    async with private_stack(settings, ["llm_proxy"]) as stack:
        client = LlmClient(stack.address("llm_proxy"))
        try:
            await client.chat(request("model-a"))
        finally:
            await client.close()
        async with httpx.AsyncClient() as http:
            response = await http.get(f"http://127.0.0.1:{port}/metrics")

    assert response.status_code == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }
    model, upstream_label = ("model", "model-a"), ("upstream", name)
    ok = ("threadline_llm_attempts_total", (model, ("outcome", "ok"), upstream_label))
    assert samples[ok] == 1
    ttft = "threadline_llm_time_to_first_token_seconds"
    assert samples[(f"{ttft}_count", (model, upstream_label))] == 1
    assert samples[(f"{ttft}_sum", (model, upstream_label))] > 0
    completion = ("threadline_llm_tokens_total", (("kind", "completion"), model, upstream_label))
    assert samples[completion] == len(answer.content_tokens())


@pytest.mark.parametrize("status", [401, 404, 501])
async def test_an_upstream_refusing_for_its_own_reasons_fails_over(
    tmp_path: Path,
    redis_url: str,
    redis_client: aioredis.Redis,
    fake_upstream: FakeUpstream,
    uid: str,
    status: int,
) -> None:
    primary, fallback = f"a-{uid}", f"b-{uid}"
    llm = {
        "upstreams": [
            upstream(fake_upstream, primary, "model-a"),
            upstream(fake_upstream, fallback, "model-b"),
        ],
        "routes": {"smart": route((primary, "model-a"), (fallback, "model-b"))},
    }
    fake_upstream.route("model-a", Script.error(status, "not here"))
    fake_upstream.route("model-b", Script(text=ANSWER))
    async with running_proxy(tmp_path, redis_url, llm) as proxy:
        done = done_of(await collect(proxy.llm, request("smart")))
    assert (done.upstream, done.content) == (fallback, ANSWER)
    assert len(requests_for(fake_upstream, "model-a")) == 1  # not retried


async def test_every_target_rate_limiting_is_resource_exhausted_with_retry_info(
    tmp_path: Path,
    redis_url: str,
    redis_client: aioredis.Redis,
    fake_upstream: FakeUpstream,
    uid: str,
) -> None:
    name = f"a-{uid}"
    fake_upstream.route("model-a", Script.rate_limited(retry_after="60"))
    async with running_proxy(
        tmp_path, redis_url, {"upstreams": [upstream(fake_upstream, name, "model-a")]}
    ) as proxy:
        with pytest.raises(errors.ResourceExhausted) as caught:
            await collect(proxy.llm, request("model-a"))
    assert caught.value.retry_after_s == 60
    assert len(requests_for(fake_upstream, "model-a")) == 1  # 60 s does not fit the budget


async def test_a_target_without_tool_support_is_skipped_for_tool_requests(
    tmp_path: Path,
    redis_url: str,
    redis_client: aioredis.Redis,
    fake_upstream: FakeUpstream,
    uid: str,
) -> None:
    plain, capable = f"a-{uid}", f"b-{uid}"
    llm = {
        "upstreams": [
            upstream(fake_upstream, plain, "model-a", capabilities={"tools": False}),
            upstream(fake_upstream, capable, "model-b"),
        ],
        "routes": {"smart": route((plain, "model-a"), (capable, "model-b"))},
    }
    fake_upstream.route("model-b", Script(tool_calls=[("lookup", '{"q": "Lyon"}')]))
    with_tools = request("smart")
    with_tools.tools.append(
        common_pb2.ToolSpec(name="lookup", description="look up", parameters_json="{}")
    )
    async with running_proxy(tmp_path, redis_url, llm) as proxy:
        done = done_of(await collect(proxy.llm, with_tools))
        (skipped,) = await proxy.events.wait_for("llm.target_skipped")
    assert done.upstream == capable and done.tool_calls[0].name == "lookup"
    assert requests_for(fake_upstream, "model-a") == []
    assert attrs(skipped)["reason"] == "unsupported_tools"
