"""The five services as five processes (`threadline serve <service>`), sharing Redis."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.conftest import ACME_KEY
from tests.e2e.redis_events import next_types, subscribe
from tests.processes import serve_all, service_env
from threadline.client import GatewayClient
from threadline.events import EventKeys
from threadline.stack import START_ORDER
from threadline.testing.fake_upstream import FakeUpstream, Script
from threadline.v1 import common_pb2

pytestmark = pytest.mark.slow


async def exit_codes(
    procs: dict[str, asyncio.subprocess.Process], timeout_s: float
) -> dict[str, int]:
    """Each process's exit code; fails naming the first one still running after the wait."""
    codes: dict[str, int] = {}
    for name, proc in procs.items():
        try:
            codes[name] = await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            raise AssertionError(f"{name} still running {timeout_s} s after SIGTERM") from None
    return codes


async def test_a_turn_across_five_processes(
    tmp_path: Path, fake_upstream: FakeUpstream, redis_url: str, redis_client: aioredis.Redis
) -> None:
    fake_upstream.default = Script(text="Five processes, one answer.")
    env = service_env(tmp_path, fake_upstream.base_url, redis_url)
    keys = EventKeys.on(redis_client)
    pubsub = await subscribe(redis_client, keys.channel("turn.*"))
    async with serve_all(env) as procs:
        async with GatewayClient(env["THREADLINE_ADDRESSES__GATEWAY"], api_key=ACME_KEY) as client:
            session = await client.create_session()
            events = [e async for e in client.converse(session.id, "hello")]
            detail = await client.get_session(session.id, verify_chain=True)
        types = await next_types(pubsub, 2)
        for proc in procs.values():
            proc.terminate()
        codes = await exit_codes(procs, timeout_s=15)
    await pubsub.aclose()  # type: ignore[no-untyped-call]

    assert events[-1].done.finish_reason == common_pb2.FINISH_REASON_STOP
    assert events[-1].done.content == "Five processes, one answer."
    assert detail.chain_verified and len(detail.messages) == 2
    assert types == ["turn.started", "turn.completed"]
    assert codes == dict.fromkeys(START_ORDER, 0)
    # The stream keeps a replayable copy of what was published.
    stored = await redis_client.xrange(keys.stream) or []
    assert {json.loads(str(fields["event"]))["type"] for _, fields in stored if fields} >= {
        "session.created",
        "turn.started",
        "turn.completed",
        "service.started",
    }
