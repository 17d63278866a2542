"""Callers spread their calls over every replica, and a replica that starts late
takes calls within a second of being up.

Two session replicas with stores of their own: a session made on the first is
unknown to the second, so a Get that answers NOT_FOUND is a call the second
replica took. The client names both (`ipv4:A,B`) from the start, while only the
first runs, long enough for gRPC's default reconnect backoff to have grown past
several seconds; threadline's channels keep it under one.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.builders import TENANT
from tests.ports import free_ports
from tests.processes import start_service, threadline_environ, wait_healthy
from tests.waiting import eventually
from threadline import errors
from threadline.peers import SessionClient
from threadline.v1 import session_pb2

pytestmark = pytest.mark.slow

#: How long the second replica stays down while the client keeps calling.
ALONE_S = 6.0


async def test_a_replica_that_starts_late_takes_calls_within_a_second(tmp_path: Path) -> None:
    ports = free_ports(2)
    target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in ports)

    def env(index: int) -> dict[str, str]:
        return threadline_environ(
            THREADLINE_DATA_DIR=str(tmp_path / f"session-{index}"),
            THREADLINE_ADDRESSES__SESSION=target,
            THREADLINE_LISTEN_PORT=str(ports[index]),
            THREADLINE_LOG_LEVEL="warning",
        )

    first = await start_service("session", env(0), tmp_path, log_name="session-0")
    second = None
    try:
        await wait_healthy(f"127.0.0.1:{ports[0]}")
        client = SessionClient(target)
        try:
            session = await client.create(session_pb2.SessionsCreateRequest(tenant=TENANT))
            answers = {"found": 0, "not_found": 0}
            calling = asyncio.Event()

            async def call_on() -> None:
                while not calling.is_set():
                    try:
                        await client.get(TENANT, session.id)
                        answers["found"] += 1
                    except errors.NotFound:
                        answers["not_found"] += 1
                    await asyncio.sleep(0.01)

            caller = asyncio.create_task(call_on())
            await asyncio.sleep(ALONE_S)  # the time the second replica is away
            assert answers == {"found": answers["found"], "not_found": 0}
            second = await start_service("session", env(1), tmp_path, log_name="session-1")
            await wait_healthy(f"127.0.0.1:{ports[1]}")
            up = time.monotonic()
            await eventually(lambda: answers["not_found"] > 0, timeout=5, interval=0.005)
            took_s = time.monotonic() - up
            # Round robin: from now on the calls alternate between the two.
            before = dict(answers)
            await eventually(lambda: answers["found"] - before["found"] >= 20, timeout=5)
            calling.set()
            await caller
        finally:
            await client.close()
    finally:
        for proc in (first, second):
            if proc is not None and proc.returncode is None:
                proc.terminate()
                await proc.wait()

    assert took_s < 1.0, f"the second replica took its first call {took_s:.2f} s after it was up"
    share = (answers["not_found"] - before["not_found"]) / (
        answers["found"] - before["found"] + answers["not_found"] - before["not_found"]
    )
    assert 0.35 < share < 0.65, answers
