"""Redis restarts under load: five `threadline serve` processes, 8 clients, Redis down twice.

Redis carries turn leases, events and the memory job queue. It is stopped once with
SIGTERM and once with SIGKILL (no persistence: it comes back empty) while clients
keep taking turns. A turn may wait for Redis; none may fail, nothing acknowledged
may be lost, no session may stay busy, event watches and memory jobs carry on.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import ACME_KEY
from tests.ports import free_ports
from tests.processes import serve_all, service_env
from tests.redis_server import start_redis, stop_redis
from tests.waiting import eventually
from threadline import errors
from threadline.client import GatewayClient
from threadline.testing.fake_upstream import FakeUpstream, Script
from threadline.v1 import common_pb2, memory_pb2

pytestmark = pytest.mark.slow

CLIENTS = 8
#: Load before the first stop, and after each restart.
LOADED_S = 3.0
#: How long Redis stays down each time.
DOWN_S = 1.0
#: Events must flow again this soon after Redis is back.
EVENTS_RESUME_S = 5.0


@dataclass
class Load:
    """What the clients saw: answers per session, in order, and every failure."""

    answers: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    failures: list[str] = field(default_factory=list)


async def _turn(client: GatewayClient, session_id: str, text: str) -> str:
    done = None
    async for event in client.converse(session_id, text, max_tokens=16):
        if event.WhichOneof("event") == "done":
            done = event.done
    assert done is not None and done.finish_reason == common_pb2.FINISH_REASON_STOP, done
    return done.content


async def _converse(
    client: GatewayClient, session_id: str, stop: asyncio.Event, load: Load
) -> None:
    while not stop.is_set():
        try:
            content = await _turn(client, session_id, f"turn {len(load.answers[session_id])}")
        except errors.ThreadlineError as exc:
            load.failures.append(f"{exc.code}: {exc.message}")
            continue
        load.answers[session_id].append(content)


async def _watch(client: GatewayClient, seen: list[tuple[float, str]]) -> None:
    async for event in client.watch_events():
        seen.append((time.monotonic(), event.type))


async def _restart(
    server: subprocess.Popen[bytes], sig: int, directory: Path, port: int
) -> tuple[subprocess.Popen[bytes], float]:
    """Stop Redis with `sig`, keep it down for DOWN_S, start it again; when it was back."""
    server.send_signal(sig)
    await asyncio.to_thread(server.wait)
    await asyncio.sleep(DOWN_S)  # the outage itself
    restarted, _ = await asyncio.to_thread(start_redis, directory, port)
    return restarted, time.monotonic()


def _queued_jobs(memory_db: Path) -> int:
    with sqlite3.connect(memory_db) as conn:
        (count,) = conn.execute(
            "SELECT count(*) FROM jobs WHERE state = ?", (memory_pb2.JOB_STATE_QUEUED,)
        ).fetchone()
    return int(count)


async def test_turns_events_and_memory_ride_out_two_redis_restarts(
    tmp_path: Path, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.default = Script(tokens=6, token_delay_s=0.005)
    (port,) = free_ports(1)
    redis_dir, logs = tmp_path / "redis", tmp_path / "logs"
    redis_dir.mkdir()
    logs.mkdir()
    server, redis_url = await asyncio.to_thread(start_redis, redis_dir, port)
    env = service_env(
        tmp_path,
        fake_upstream.base_url,
        redis_url,
        THREADLINE_MEMORY__CONSOLIDATE_FRACTION="0.02",
        THREADLINE_MEMORY__SCAN_INTERVAL_S="0.5",
        THREADLINE_MEMORY__CLAIM_IDLE_S="2",
        THREADLINE_MEMORY__LEASE_TTL_S="2",
        # Jobs do not rest while turns run, so the backlog the load leaves drains fast.
        THREADLINE_MEMORY__DUTY_CYCLE="1",
    )
    load, seen = Load(), list[tuple[float, str]]()
    back: list[float] = []
    try:
        async with (
            serve_all(env, logs),
            GatewayClient(env["THREADLINE_ADDRESSES__GATEWAY"], api_key=ACME_KEY) as client,
        ):
            sessions = [(await client.create_session()).id for _ in range(CLIENTS)]
            watch = asyncio.create_task(_watch(client, seen))
            stop = asyncio.Event()
            clients = [asyncio.create_task(_converse(client, s, stop, load)) for s in sessions]
            await asyncio.sleep(LOADED_S)  # the load the first restart cuts into
            for sig in (signal.SIGTERM, signal.SIGKILL):
                server, when = await _restart(server, sig, redis_dir, port)
                back.append(when)
                await asyncio.sleep(LOADED_S)  # load after the restart
            stop.set()
            await asyncio.gather(*clients)

            # No session is left busy: each takes a turn at once.
            after = await asyncio.gather(*(_turn(client, s, "still there?") for s in sessions))
            details = [await client.get_session(s, verify_chain=True) for s in sessions]
            # The load leaves a backlog of jobs: none may stay queued for good.
            await eventually(lambda: _queued_jobs(tmp_path / "data" / "memory.db") == 0, timeout=60)
            watch.cancel()
    finally:
        stop_redis(server)

    assert load.failures == []
    assert sum(len(answers) for answers in load.answers.values()) > 8 * CLIENTS
    for session_id, detail in zip(sessions, details, strict=True):
        stored = [m.content for m in detail.messages if m.role == common_pb2.ROLE_ASSISTANT]
        # Every acknowledged answer is in the log, in order, and nothing was cut.
        assert stored == [*load.answers[session_id], after[sessions.index(session_id)]]
        assert detail.chain_verified
    for when in back:
        assert any(when < at < when + EVENTS_RESUME_S for at, _ in seen), "events did not resume"
        consolidated = [at for at, kind in seen if kind == "memory.consolidation.done"]
        assert any(at > when for at in consolidated), "no consolidation after a restart"
