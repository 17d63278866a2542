"""llm_proxy's connection pool: a wait for a connection is its own state.

The pool is small on purpose (4 connections) and each answer takes longer than
the upstream's connect and first-token timeouts allow a wait to: a request that
waits for a connection must neither fail as a silent upstream nor count
against the upstream's circuit.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from tests.service.conftest import attrs
from tests.service.test_llm_proxy_resilience import peak
from tests.service.test_llm_proxy_routes import (
    collect,
    done_of,
    request,
    route,
    running_proxy,
    text_of,
    upstream,
)
from tests.waiting import eventually
from threadline import errors
from threadline.testing.fake_upstream import FakeUpstream, Script
from threadline.v1 import common_pb2

#: 0.5 s per answer: five waves of 4 take 2.5 s, past the 1 s connect and first-token
#: timeouts of `upstream()`.
SLOW = Script(tokens=5, first_token_delay_s=0.1, token_delay_s=0.1)
STREAMS = 20
POOL = 4


@pytest.fixture
def uid() -> str:
    return uuid.uuid4().hex[:8]


def wait_count(upstream_name: str, resource: str) -> float:
    value = REGISTRY.get_sample_value(
        "threadline_llm_wait_seconds_count", {"upstream": upstream_name, "resource": resource}
    )
    return value or 0.0


async def test_streams_beyond_the_pool_wait_for_a_connection_and_all_complete(
    tmp_path: Path,
    redis_url: str,
    redis_client: aioredis.Redis,
    fake_upstream: FakeUpstream,
    uid: str,
) -> None:
    name = f"pooled-{uid}"
    llm = {"upstreams": [upstream(fake_upstream, name, "model-a", max_connections=POOL)]}
    fake_upstream.route("model-a", SLOW)
    async with running_proxy(tmp_path, redis_url, llm) as proxy:
        async with peak(lambda: fake_upstream.open_connections) as connections:
            answers = await asyncio.gather(
                *(collect(proxy.llm, request("model-a", f"question {i}")) for i in range(STREAMS))
            )
        await proxy.events.settle()

        for chunks in answers:
            assert done_of(chunks).finish_reason == common_pb2.FINISH_REASON_STOP
            assert text_of(chunks) == "".join(SLOW.content_tokens())
        assert max(connections) <= POOL
        # Every request beyond the first 4 waited, and said so as a wait for the pool.
        waits = proxy.events.of_type("llm.pool_wait")
        assert len(waits) >= STREAMS - POOL
        assert {attrs(w)["upstream"] for w in waits} == {name}
        assert max(attrs(w)["waited_s"] for w in waits) > 1.0
        assert all(attrs(w)["pool_size"] == POOL for w in waits)
        assert wait_count(name, "connection") >= STREAMS - POOL
        waiting = REGISTRY.get_sample_value(
            "threadline_llm_waiting_requests", {"upstream": name, "resource": "connection"}
        )
        assert waiting == 0
        # Nothing failed, nothing was retried, the circuit never opened.
        assert proxy.events.of_type("llm.attempt_failed") == []
        assert proxy.events.of_type("llm.circuit_opened") == []
        assert len(fake_upstream.chat_requests()) == STREAMS
        open_circuit = REGISTRY.get_sample_value("threadline_llm_circuit_open", {"upstream": name})
        assert open_circuit in (None, 0.0)


async def test_a_pool_wait_that_runs_out_fails_over_without_counting_against_the_circuit(
    tmp_path: Path,
    redis_url: str,
    redis_client: aioredis.Redis,
    fake_upstream: FakeUpstream,
    uid: str,
) -> None:
    narrow, wide = f"narrow-{uid}", f"wide-{uid}"
    # Holds the narrow upstream's one connection for a second (0.2 s may be waited).
    busy = Script(tokens=5, first_token_delay_s=0.5, token_delay_s=0.1)
    narrow_config = upstream(fake_upstream, narrow, "model-a", max_connections=1)
    narrow_config["timeouts"]["pool_wait_s"] = 0.2
    llm = {
        "upstreams": [narrow_config, upstream(fake_upstream, wide, "model-c")],
        "routes": {"pair": route((narrow, "model-a"), (wide, "model-c"))},
        "circuit": {"failure_threshold": 1, "cooldown_s": 60},
    }
    fake_upstream.route("model-a", busy)
    async with running_proxy(tmp_path, redis_url, llm) as proxy:
        holding = asyncio.create_task(collect(proxy.llm, request("model-a", "first")))
        await eventually(lambda: len(fake_upstream.chat_requests()) == 1)
        overflow = await collect(proxy.llm, request("pair", "second"))
        assert done_of(overflow).upstream == wide
        assert done_of(await holding).upstream == narrow
        await proxy.events.settle()

        (limited,) = proxy.events.of_type("llm.rate_limited")
        assert attrs(limited)["limit"] == "connection pool"
        assert proxy.events.of_type("llm.circuit_opened") == []
        # The one-failure circuit is still closed: the narrow upstream answers again.
        again = await collect(proxy.llm, request("model-a", "third"))
        assert done_of(again).upstream == narrow

        # With no other target, the caller is told the pool is full, with a retry delay.
        blocking = asyncio.create_task(collect(proxy.llm, request("model-a", "fourth")))
        await eventually(lambda: len(fake_upstream.chat_requests()) == 4)
        with pytest.raises(errors.ResourceExhausted) as refused:
            await collect(proxy.llm, request("model-a", "fifth"))
        assert "connection pool limit" in refused.value.message
        assert refused.value.retry_after_s is not None
        await blocking
