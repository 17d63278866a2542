"""Workspaces on several executor replicas: a session's turns ran on both, one replica
is down when the session is deleted; the other erases its copy and the cascade
finishes, and the one that was down removes its own copy once it is back."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from services.executor.turns.session_workspaces import tenant_key
from tests.conftest import ACME_KEY
from tests.postgres_database import PostgresUnavailable, postgres_database
from tests.processes import service_env
from tests.replicas import serve_replicas
from tests.waiting import eventually
from threadline.client import GatewayClient
from threadline.testing.fake_upstream import FakeUpstream, Script

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

TENANT = "acme"


@pytest.fixture
def database() -> Iterator[str]:
    try:
        with postgres_database() as url:
            yield url
    except PostgresUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)


def workspace(tmp_path: Path, index: int, session_id: str) -> Path:
    data = tmp_path / "data" / f"executor-{index}"
    return data / "workspaces" / "sessions" / tenant_key(TENANT) / session_id


async def completed(database: str, session_id: str) -> bool:
    conn = await asyncpg.connect(database)
    try:
        done = await conn.fetchval(
            "SELECT completed_at FROM erasures WHERE session_id = $1", session_id
        )
    finally:
        await conn.close()
    return bool(done)


async def test_every_replicas_copy_goes_the_one_down_at_the_time_included(
    tmp_path: Path,
    fake_upstream: FakeUpstream,
    redis_url: str,
    redis_client: aioredis.Redis,
    database: str,
) -> None:
    env = service_env(
        tmp_path,
        fake_upstream.base_url,
        redis_url,
        THREADLINE_SESSION__DATABASE=database,
        THREADLINE_MEMORY__DATABASE=database,
        THREADLINE_EXECUTOR__TASKS__DATABASE=database,
        THREADLINE_EXECUTOR__TOOLS_ENABLED="true",
        THREADLINE_EXECUTOR__ERASURE_POLL_S="0.2",
        THREADLINE_MEMORY__ERASURE_POLL_S="0.2",
    )
    async with (
        serve_replicas(env, tmp_path) as stack,
        GatewayClient(env["THREADLINE_ADDRESSES__GATEWAY"], api_key=ACME_KEY) as client,
    ):
        session = await client.create_session()

        async def on_both() -> bool:
            # Turns are balanced round robin over the executors: a few reach both.
            fake_upstream.enqueue(
                Script(tool_calls=[("write_file", json.dumps({"path": "f.txt", "content": "x"}))]),
                Script(text="Saved."),
            )
            async for _ in client.converse(session.id, "Save a file."):
                pass
            return all(workspace(tmp_path, i, session.id).is_dir() for i in (0, 1))

        await eventually(on_both, timeout=60, interval=0)
        await stack.kill(("executor", 1), signal.SIGKILL)

        await client.delete_session(session.id)

        await eventually(lambda: completed(database, session.id), timeout=60)
        assert not workspace(tmp_path, 0, session.id).exists()
        assert (workspace(tmp_path, 1, session.id) / "f.txt").exists()  # it was down

        await stack.start(("executor", 1))
        await stack.wait_healthy(("executor", 1))
        await eventually(lambda: not workspace(tmp_path, 1, session.id).exists(), timeout=60)
