"""The erasure cascade survives its owners dying: memory, down when sessions are
deleted and SIGKILLed again halfway through erasing them, erases every one of them
after it comes back, and every erasure finishes."""

from __future__ import annotations

import contextlib
import signal
import sqlite3
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.conftest import ACME_KEY
from tests.processes import serve_all, service_env, start_service, wait_healthy
from tests.service.erasure_stores import sqlite_rows
from tests.waiting import eventually
from threadline import errors
from threadline.client import GatewayClient
from threadline.peers import MemoryClient
from threadline.testing.fake_upstream import FakeUpstream, Script
from threadline.v1 import memory_pb2

pytestmark = pytest.mark.slow

TENANT = "acme"
#: Enough that erasing them takes memory a while: the second kill lands halfway.
SESSIONS = 150


def memory_done(data: Path) -> int:
    """Erasures memory has acknowledged, read from the session store's file."""
    with contextlib.closing(sqlite3.connect(data / "sessions.db")) as conn:
        row = conn.execute(
            "SELECT count(*) FROM erasure_owners WHERE owner = 'memory' AND done = 1"
        ).fetchone()
    return int(row[0])


def unfinished(data: Path) -> int:
    with contextlib.closing(sqlite3.connect(data / "sessions.db")) as conn:
        row = conn.execute("SELECT count(*) FROM erasures WHERE completed_at = 0").fetchone()
    return int(row[0])


async def test_memory_killed_before_and_during_a_cascade_finishes_it_after_restart(
    tmp_path: Path, fake_upstream: FakeUpstream, redis_url: str, redis_client: aioredis.Redis
) -> None:
    env = service_env(
        tmp_path,
        fake_upstream.base_url,
        redis_url,
        THREADLINE_MEMORY__ERASURE_POLL_S="0.1",
        THREADLINE_EXECUTOR__ERASURE_POLL_S="0.1",
    )
    data = tmp_path / "data"
    memory_address = env["THREADLINE_ADDRESSES__MEMORY"]
    async with (
        serve_all(env, tmp_path) as procs,
        GatewayClient(env["THREADLINE_ADDRESSES__GATEWAY"], api_key=ACME_KEY) as client,
    ):
        memory = MemoryClient(memory_address)
        ids = []
        for _ in range(SESSIONS):
            session = await client.create_session()
            # A row in memory's store for every session (what a turn leaves).
            await memory.record_activity(
                memory_pb2.RecordActivityRequest(
                    tenant=TENANT, session_id=session.id, prompt_tokens=10
                )
            )
            ids.append(session.id)
        await memory.close()
        assert sum(1 for row in sqlite_rows(data / "memory.db") if row.startswith("activity")) == (
            SESSIONS
        )

        procs["memory"].send_signal(signal.SIGKILL)
        await procs["memory"].wait()
        for session_id in ids:
            await client.delete_session(session_id)
        # The executor is done with them; memory, being down, with none.
        await eventually(lambda: unfinished(data) == SESSIONS and memory_done(data) == 0)

        procs["memory"] = await start_service("memory", env, tmp_path)
        await eventually(lambda: memory_done(data) > 0, timeout=30, interval=0.005)
        procs["memory"].send_signal(signal.SIGKILL)
        await procs["memory"].wait()
        halfway = memory_done(data)
        assert 0 < halfway < SESSIONS, halfway

        procs["memory"] = await start_service("memory", env, tmp_path)
        await wait_healthy(memory_address)
        await eventually(lambda: unfinished(data) == 0, timeout=60, interval=0.1)

        assert memory_done(data) == SESSIONS
        left = [row for row in sqlite_rows(data / "memory.db") if any(i in row for i in ids)]
        # Only memory's tombstones of the erased ids remain: ids, no content.
        assert left and all(row.startswith("erased_sessions:") for row in left)


async def test_the_draft_of_an_answer_cut_by_a_killed_executor_goes_with_its_session(
    tmp_path: Path, fake_upstream: FakeUpstream, redis_url: str, redis_client: aioredis.Redis
) -> None:
    # The draft is what a user saw of an answer whose executor died: model text, kept
    # in Redis for the next turn, which a deleted session never has.
    canary = "Pangolin-Magenta-5150"
    fake_upstream.default = Script(text=f"{canary} " * 200, token_delay_s=0.02)
    env = service_env(
        tmp_path, fake_upstream.base_url, redis_url, THREADLINE_EXECUTOR__ERASURE_POLL_S="0.1"
    )
    data = tmp_path / "data"
    async with (
        serve_all(env, tmp_path) as procs,
        GatewayClient(env["THREADLINE_ADDRESSES__GATEWAY"], api_key=ACME_KEY) as client,
    ):
        session = await client.create_session()
        seen = ""
        with pytest.raises(errors.ThreadlineError):
            async for event in client.converse(session.id, "tell me"):
                seen += event.delta
                if len(seen) > 200 and procs["executor"].returncode is None:
                    procs["executor"].send_signal(signal.SIGKILL)
        await procs["executor"].wait()
        drafts = [key async for key in redis_client.scan_iter(match="*draft*")]
        assert drafts and canary in str(await redis_client.get(drafts[0]))

        await client.delete_session(session.id)
        procs["executor"] = await start_service("executor", env, tmp_path)
        await eventually(lambda: unfinished(data) == 0, timeout=30, interval=0.1)

        assert [key async for key in redis_client.scan_iter(match="*draft*")] == []
