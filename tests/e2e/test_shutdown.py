"""SIGTERM against `threadline up` running as its own process, mid-turn."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import yaml

from tests.conftest import ACME_KEY, FAKE_MODEL
from tests.ports import free_ports
from tests.processes import threadline_up, wait_healthy
from tests.waiting import eventually
from threadline import errors
from threadline.client import GatewayClient
from threadline.config import SERVICE_NAMES, hash_api_key
from threadline.testing.fake_upstream import FakeUpstream, Script
from threadline.v1 import common_pb2, executor_pb2, session_pb2

pytestmark = pytest.mark.slow


def write_config(
    tmp_path: Path, upstream_url: str, grace_s: float, redis_url: str | None = None
) -> Path:
    ports = free_ports(len(SERVICE_NAMES))
    config: dict[str, object] = {
        "data_dir": str(tmp_path / "data"),
        "grace_period_s": grace_s,
        "log_level": "warning",
        "addresses": {
            name: f"127.0.0.1:{port}" for name, port in zip(SERVICE_NAMES, ports, strict=True)
        },
        "gateway": {"api_keys": [{"sha256": hash_api_key(ACME_KEY), "tenant": "acme"}]},
        "llm": {"upstream": {"base_url": upstream_url, "model": FAKE_MODEL}},
    }
    if redis_url is not None:
        config["redis_url"] = redis_url
    path = tmp_path / "threadline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def gateway_address(config: Path) -> str:
    return str(yaml.safe_load(config.read_text())["addresses"]["gateway"])


@contextlib.asynccontextmanager
async def serving(config: Path) -> AsyncIterator[tuple[asyncio.subprocess.Process, GatewayClient]]:
    """`threadline up` on `config`, healthy, and a client of its gateway."""
    address = gateway_address(config)
    async with threadline_up(config) as proc:
        await wait_healthy(address)
        async with GatewayClient(address, api_key=ACME_KEY) as client:
            yield proc, client


async def sigterm_at_first_delta(
    proc: asyncio.subprocess.Process,
    client: GatewayClient,
    session_id: str,
    text: str,
    deltas: list[str],
) -> executor_pb2.TurnDone | None:
    """Converse, sending SIGTERM to `proc` once the first delta arrives.

    Collects the deltas into `deltas` as they come (the stream may end in an error).
    """
    done = None
    async for event in client.converse(session_id, text):
        if event.WhichOneof("event") == "delta":
            if not deltas:
                proc.send_signal(signal.SIGTERM)
            deltas.append(event.delta)
        elif event.WhichOneof("event") == "done":
            done = event.done
    return done


async def refuses_new_work(client: GatewayClient) -> bool:
    """The gateway is draining: a new call is refused."""
    try:
        await client.create_session()
    except errors.ThreadlineError:
        return True
    return False


async def stored_after_restart(config: Path, session_id: str) -> session_pb2.SessionDetail:
    """The session as a fresh `threadline up` on the same data reads it."""
    async with serving(config) as (_, client):
        return await client.get_session(session_id, verify_chain=True)


async def test_sigterm_lets_a_running_turn_finish(
    tmp_path: Path, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.default = Script(tokens=30, token_delay_s=0.05)
    config = write_config(tmp_path, fake_upstream.base_url, grace_s=10)
    text: list[str] = []
    async with serving(config) as (proc, client):
        session = await client.create_session()
        done = await sigterm_at_first_delta(proc, client, session.id, "count to thirty", text)
        assert done is not None and done.finish_reason == common_pb2.FINISH_REASON_STOP
        assert len(text) == 30
        # New work is refused while draining.
        with pytest.raises(errors.ThreadlineError):
            await client.create_session()
        assert await asyncio.wait_for(proc.wait(), 15) == 0

    detail = await stored_after_restart(config, session.id)
    assert detail.chain_verified
    assert [m.content for m in detail.messages] == ["count to thirty", "".join(text)]
    assert not detail.messages[1].interrupted


async def test_sigterm_past_the_grace_period_ends_the_turn_interrupted_and_stored(
    tmp_path: Path, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.default = Script(tokens=200, token_delay_s=0.05)
    config = write_config(tmp_path, fake_upstream.base_url, grace_s=1)
    seen: list[str] = []
    async with serving(config) as (proc, client):
        session = await client.create_session()
        done = await sigterm_at_first_delta(proc, client, session.id, "a long story", seen)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    assert 0 < len(seen) < 200
    # The client got the turn's final event, not a cancelled call.
    assert done is not None and done.finish_reason == common_pb2.FINISH_REASON_INTERRUPTED
    assert "shutting down" in done.error
    assert done.content == "".join(seen)

    detail = await stored_after_restart(config, session.id)
    _user, answer = detail.messages
    assert answer.interrupted
    assert answer.content == "".join(seen)


async def test_a_second_sigterm_ends_the_drain_at_once_with_partial_answers_stored(
    tmp_path: Path, fake_upstream: FakeUpstream, redis_url: str, redis_client: aioredis.Redis
) -> None:
    fake_upstream.default = Script(tokens=400, token_delay_s=0.05)
    config = write_config(tmp_path, fake_upstream.base_url, grace_s=60, redis_url=redis_url)
    seen: list[str] = []
    async with serving(config) as (proc, client):
        session = await client.create_session()
        events = client.converse(session.id, "a very long story")
        async for event in events:
            if event.WhichOneof("event") == "delta":
                seen.append(event.delta)
                break
        proc.send_signal(signal.SIGTERM)
        # The second signal must come during the drain the first one started.
        await eventually(lambda: refuses_new_work(client), timeout=5)
        proc.send_signal(signal.SIGTERM)
        done = None
        async for event in events:
            if event.WhichOneof("event") == "delta":
                seen.append(event.delta)
            elif event.WhichOneof("event") == "done":
                done = event.done
        # Far sooner than the 60 s grace period.
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    assert done is not None and done.finish_reason == common_pb2.FINISH_REASON_INTERRUPTED
    assert done.content == "".join(seen) and len(seen) < 400
    # The turn's lease went with it: the session takes a new turn at once.
    assert await redis_client.keys("threadline:turn:*") == []

    detail = await stored_after_restart(config, session.id)
    assert detail.messages[-1].interrupted
    assert detail.messages[-1].content == "".join(seen)
