"""SIGTERM against `threadline up` running as its own process, mid-turn."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import ACME_KEY, FAKE_MODEL
from tests.ports import free_ports
from tests.processes import threadline_environ, wait_healthy
from threadline import errors
from threadline.client import GatewayClient
from threadline.config import SERVICE_NAMES, hash_api_key
from threadline.testing.fake_upstream import FakeUpstream, Script
from threadline.v1 import common_pb2, executor_pb2, session_pb2

pytestmark = pytest.mark.slow


def write_config(tmp_path: Path, upstream_url: str, grace_s: float) -> Path:
    ports = free_ports(len(SERVICE_NAMES))
    config = {
        "data_dir": str(tmp_path / "data"),
        "grace_period_s": grace_s,
        "log_level": "warning",
        "addresses": {
            name: f"127.0.0.1:{port}" for name, port in zip(SERVICE_NAMES, ports, strict=True)
        },
        "gateway": {"api_keys": [{"sha256": hash_api_key(ACME_KEY), "tenant": "acme"}]},
        "llm": {"upstream": {"base_url": upstream_url, "model": FAKE_MODEL}},
    }
    path = tmp_path / "threadline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@contextlib.asynccontextmanager
async def threadline_up(config: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "threadline.cli",
        "up",
        "--config",
        str(config),
        env=threadline_environ(),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


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


async def test_sigterm_past_the_grace_period_stores_the_partial_answer(
    tmp_path: Path, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.default = Script(tokens=200, token_delay_s=0.05)
    config = write_config(tmp_path, fake_upstream.base_url, grace_s=1)
    seen: list[str] = []
    async with serving(config) as (proc, client):
        session = await client.create_session()
        with pytest.raises(errors.ThreadlineError):
            await sigterm_at_first_delta(proc, client, session.id, "a long story", seen)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    assert 0 < len(seen) < 200

    detail = await stored_after_restart(config, session.id)
    _user, answer = detail.messages
    assert answer.interrupted
    # Everything the user saw was stored (the executor may have relayed a little more).
    assert answer.content.startswith("".join(seen))
