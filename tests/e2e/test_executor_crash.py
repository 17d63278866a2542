"""An executor killed mid-turn: its sessions take new turns once the lease expires."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.conftest import ACME_KEY
from tests.processes import serve_all, service_env, start_service, wait_healthy
from tests.waiting import eventually
from threadline import errors
from threadline.client import GatewayClient
from threadline.testing.fake_upstream import FakeUpstream, Script
from threadline.v1 import common_pb2

pytestmark = pytest.mark.slow

TURN_LEASE_TTL_S = 3.0


async def test_a_session_whose_executor_died_mid_turn_is_free_within_the_lease_ttl(
    tmp_path: Path, fake_upstream: FakeUpstream, redis_url: str, redis_client: aioredis.Redis
) -> None:
    fake_upstream.default = Script(tokens=400, token_delay_s=0.05)
    env = service_env(
        tmp_path,
        fake_upstream.base_url,
        redis_url,
        THREADLINE_EXECUTOR__TURN_LEASE_TTL_S=str(TURN_LEASE_TTL_S),
    )
    executor_address = env["THREADLINE_ADDRESSES__EXECUTOR"]
    async with (
        serve_all(env, tmp_path) as procs,
        GatewayClient(env["THREADLINE_ADDRESSES__GATEWAY"], api_key=ACME_KEY) as client,
    ):
        session = await client.create_session()
        seen = ""
        with pytest.raises(errors.ThreadlineError):
            async for event in client.converse(session.id, "a long story"):
                if event.WhichOneof("event") == "delta":
                    seen += event.delta
                    # Killed once the answer has been streaming for a while.
                    if len(seen) > 100:
                        procs["executor"].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        await procs["executor"].wait()
        procs["executor"] = await start_service("executor", env, tmp_path)
        await wait_healthy(executor_address)
        fake_upstream.default = Script(text="Back again.")

        async def answered() -> str | None:
            try:
                async for event in client.converse(session.id, "are you back?"):
                    if event.WhichOneof("event") == "done":
                        assert event.done.finish_reason == common_pb2.FINISH_REASON_STOP
                        return event.done.content
            except errors.Aborted:  # session busy: the dead executor's lease is still there
                return None
            except errors.Unavailable:  # the gateway is not reconnected to the new one yet
                return None
            return None

        answer = await eventually(answered, timeout=TURN_LEASE_TTL_S + 10, interval=0.2)
        free_after_s = time.monotonic() - killed
        stored = (await client.get_session(session.id, verify_chain=True)).messages

    assert answer == "Back again."
    # What the user saw of the killed turn is stored, marked interrupted, before
    # the next turn: all of it but at most its last moments.
    assert [m.content for m in stored][0::2] == ["a long story", "are you back?"]
    cut = stored[1]
    assert cut.interrupted and cut.role == common_pb2.ROLE_ASSISTANT
    assert seen.startswith(cut.content) and len(cut.content) > 50
    # The lease was renewed at most a third of its TTL before the kill.
    assert free_after_s < TURN_LEASE_TTL_S + 5
