"""SIGTERM against `threadline up` running as its own process, mid-turn."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc.aio
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import ACME_KEY, FAKE_MODEL
from threadline import errors
from threadline.client import GatewayClient
from threadline.config import SERVICE_NAMES, hash_api_key
from threadline.testing.fake_upstream import FakeUpstream, Script
from threadline.v1 import common_pb2

pytestmark = pytest.mark.slow


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


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


async def wait_healthy(address: str, timeout_s: float = 30) -> float:
    started = time.perf_counter()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return time.perf_counter() - started
            if time.perf_counter() - started > timeout_s:
                raise TimeoutError(f"{address} not healthy after {timeout_s}s")
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def threadline_up(config: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "threadline.cli",
        "up",
        "--config",
        str(config),
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


async def test_sigterm_lets_a_running_turn_finish(
    tmp_path: Path, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.default = Script(tokens=30, token_delay_s=0.05)
    config = write_config(tmp_path, fake_upstream.base_url, grace_s=10)
    address = gateway_address(config)
    async with threadline_up(config) as proc:
        await wait_healthy(address)
        async with GatewayClient(address, api_key=ACME_KEY) as client:
            session = await client.create_session()
            text: list[str] = []
            done = None
            async for event in client.converse(session.id, "count to thirty"):
                if event.WhichOneof("event") == "delta":
                    if not text:
                        proc.send_signal(signal.SIGTERM)
                    text.append(event.delta)
                elif event.WhichOneof("event") == "done":
                    done = event.done
            assert done is not None and done.finish_reason == common_pb2.FINISH_REASON_STOP
            assert len(text) == 30
            # New work is refused while draining.
            with pytest.raises(errors.ThreadlineError):
                await client.create_session()
        assert await asyncio.wait_for(proc.wait(), 15) == 0

    async with threadline_up(config):
        await wait_healthy(address)
        async with GatewayClient(address, api_key=ACME_KEY) as client:
            detail = await client.get_session(session.id, verify_chain=True)
    assert detail.chain_verified
    assert [m.content for m in detail.messages] == ["count to thirty", "".join(text)]
    assert not detail.messages[1].interrupted


async def test_sigterm_past_the_grace_period_stores_the_partial_answer(
    tmp_path: Path, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.default = Script(tokens=200, token_delay_s=0.05)
    config = write_config(tmp_path, fake_upstream.base_url, grace_s=1)
    address = gateway_address(config)
    async with threadline_up(config) as proc:
        await wait_healthy(address)
        async with GatewayClient(address, api_key=ACME_KEY) as client:
            session = await client.create_session()
            seen: list[str] = []
            with pytest.raises(errors.ThreadlineError):
                async for event in client.converse(session.id, "a long story"):
                    if event.WhichOneof("event") == "delta":
                        if not seen:
                            proc.send_signal(signal.SIGTERM)
                        seen.append(event.delta)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    assert 0 < len(seen) < 200

    async with threadline_up(config):
        await wait_healthy(address)
        async with GatewayClient(address, api_key=ACME_KEY) as client:
            detail = await client.get_session(session.id, verify_chain=True)
    _user, answer = detail.messages
    assert answer.interrupted
    # Everything the user saw was stored (the executor may have relayed a little more).
    assert answer.content.startswith("".join(seen))
