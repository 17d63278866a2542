"""Turns beyond what the executor runs at once wait their turn, first come first
served, in a bounded queue; past it a turn is refused RESOURCE_EXHAUSTED with a
retry delay, through the gateway, before anything of it is stored."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.conftest import make_settings
from tests.service.conftest import EventRecorder
from threadline import errors
from threadline.client import GatewayClient
from threadline.config import Settings
from threadline.stack import Stack, start_stack
from threadline.testing.fake_upstream import FakeUpstream, Script


@pytest.fixture
def settings(tmp_path: Path, fake_upstream: FakeUpstream, redis_url: str) -> Settings:
    return make_settings(
        tmp_path,
        fake_upstream.base_url,
        redis_url=redis_url,
        executor={"max_running_turns": 1, "max_queued_turns": 2},
    )


@pytest.fixture
async def stack(settings: Settings, redis_client: aioredis.Redis) -> AsyncIterator[Stack]:
    running = await start_stack(settings, ephemeral_ports=True)
    yield running
    await running.stop(1.0)


@pytest.fixture
async def events(stack: Stack) -> AsyncIterator[EventRecorder]:
    recorder = EventRecorder(stack.bus, await stack.bus.subscribe())
    await recorder.settle()
    yield recorder
    await recorder.close()


async def answer(gateway: GatewayClient, session_id: str, text: str) -> str:
    parts = []
    async for event in gateway.converse(session_id, text):
        if event.WhichOneof("event") == "delta":
            parts.append(event.delta)
    return "".join(parts)


async def test_turns_past_the_running_limit_queue_in_order_and_a_full_queue_refuses(
    stack: Stack, gateway: GatewayClient, fake_upstream: FakeUpstream, events: EventRecorder
) -> None:
    # Each answer takes about 0.3 s: long enough for the others to line up behind it.
    fake_upstream.default = Script(text="Noted.", first_token_delay_s=0.3)
    sessions = [(await gateway.create_session()).id for _ in range(4)]

    turns = [asyncio.create_task(answer(gateway, sessions[0], "first"))]
    await events.wait_for("turn.started", session_id=sessions[0])
    for position, (session_id, text) in enumerate(
        zip(sessions[1:3], ["second", "third"], strict=True), 1
    ):
        turns.append(asyncio.create_task(answer(gateway, session_id, text)))
        (queued,) = await events.wait_for("turn.queued", session_id=session_id)
        assert queued.attributes["position"] == position

    with pytest.raises(errors.ResourceExhausted, match="max_queued_turns") as refused:
        await answer(gateway, sessions[3], "fourth")
    assert refused.value.retry_after_s is not None and refused.value.retry_after_s >= 1

    assert await asyncio.gather(*turns) == ["Noted."] * 3
    # First come, first served: the upstream was asked in the order the turns came.
    asked = [r.body["messages"][-1]["content"] for r in fake_upstream.chat_requests()]
    assert asked == ["first", "second", "third"]
    # The refused turn stored nothing.
    assert list((await gateway.get_session(sessions[3])).messages) == []
    # Once the queue has room again, the same turn goes through.
    assert await answer(gateway, sessions[3], "fourth") == "Noted."
