"""A session's tool workspace belongs to its tenant and goes with the session, deleted
or expired, on every replica that holds a copy; an import never reaches an old one."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from services.executor.turns.session_workspaces import tenant_key
from tests.builders import TENANT, new_session
from tests.conftest import make_settings
from tests.service.conftest import EventRecorder, private_stack, run_turn
from tests.waiting import eventually
from threadline.config import Settings
from threadline.peers import ExecutorClient, SessionClient
from threadline.stack import Stack
from threadline.testing.fake_upstream import FakeUpstream, Script
from threadline.v1 import executor_pb2

OTHER = "other"
SECRET = "the other tenant's plans"


def tool_settings(
    tmp_path: Path, fake_upstream: FakeUpstream, redis_url: str, **extra: Any
) -> Settings:
    return make_settings(
        tmp_path,
        fake_upstream.base_url,
        redis_url=redis_url,
        executor={
            "tools_enabled": True,
            "workspace_root": str(tmp_path / "workspaces"),
            "tool_rules": [{"path": "", "permission": "write"}],
            "erasure_poll_s": 0.1,
        },
        **extra,
    )


@pytest.fixture
def settings(tmp_path: Path, fake_upstream: FakeUpstream, redis_url: str) -> Settings:
    return tool_settings(tmp_path, fake_upstream, redis_url)


@pytest.fixture
async def stack(settings: Settings, redis_client: aioredis.Redis) -> AsyncIterator[Stack]:
    async with private_stack(settings) as running:
        yield running


def workspace(settings: Settings, tenant: str, session_id: str) -> Path:
    return Path(settings.executor.workspace_root) / "sessions" / tenant_key(tenant) / session_id


def tool_results(turn: list[executor_pb2.TurnEvent]) -> list[executor_pb2.ToolResult]:
    return [e.tool_result for e in turn if e.WhichOneof("event") == "tool_result"]


async def write_through_a_turn(
    executor: ExecutorClient,
    fake_upstream: FakeUpstream,
    session_id: str,
    tenant: str,
    path: str = "notes.txt",
) -> None:
    fake_upstream.enqueue(
        Script(tool_calls=[("write_file", json.dumps({"path": path, "content": SECRET}))]),
        Script(text="Saved."),
    )
    turn = await run_turn(executor, session_id, "Save my plans.", tenant=tenant)
    assert [r.status for r in tool_results(turn)] == ["ok"]


async def test_a_deleted_sessions_workspace_is_removed_and_no_other(
    settings: Settings,
    executor: ExecutorClient,
    sessions: SessionClient,
    fake_upstream: FakeUpstream,
) -> None:
    doomed = await new_session(sessions)
    kept = await new_session(sessions)
    await write_through_a_turn(executor, fake_upstream, doomed, TENANT)
    await write_through_a_turn(executor, fake_upstream, kept, TENANT)
    assert (workspace(settings, TENANT, doomed) / "notes.txt").read_text() == SECRET

    await sessions.delete(TENANT, doomed)

    await eventually(lambda: not workspace(settings, TENANT, doomed).exists())
    assert (workspace(settings, TENANT, kept) / "notes.txt").read_text() == SECRET


async def test_an_expired_sessions_workspace_is_removed(
    tmp_path: Path, fake_upstream: FakeUpstream, redis_url: str, redis_client: aioredis.Redis
) -> None:
    settings = tool_settings(
        tmp_path, fake_upstream, redis_url, session={"ttl_s": 1.0, "cleanup_interval_s": 0.2}
    )
    async with private_stack(settings) as running:
        events = EventRecorder(running.bus, await running.bus.subscribe())
        executor = ExecutorClient(running.address("executor"))
        sessions = SessionClient(running.address("session"))
        try:
            session_id = await new_session(sessions)
            await write_through_a_turn(executor, fake_upstream, session_id, TENANT)
            assert workspace(settings, TENANT, session_id).is_dir()

            await events.wait_for("session.expired", session_id=session_id, timeout=10)
            await eventually(lambda: not workspace(settings, TENANT, session_id).exists())
        finally:
            await events.close()
            await executor.close()
            await sessions.close()


async def test_a_tenant_importing_under_a_deleted_sessions_id_finds_none_of_its_files(
    settings: Settings,
    executor: ExecutorClient,
    sessions: SessionClient,
    fake_upstream: FakeUpstream,
) -> None:
    session_id = await new_session(sessions, tenant=OTHER)
    await write_through_a_turn(executor, fake_upstream, session_id, OTHER, path="plans.txt")
    exported = await sessions.export(OTHER, session_id)
    await sessions.delete(OTHER, session_id)
    await eventually(lambda: not workspace(settings, OTHER, session_id).exists())
    # What a replica that missed the deletion (down at the time) still holds.
    leftover = workspace(settings, OTHER, session_id)
    leftover.mkdir(parents=True)
    (leftover / "plans.txt").write_text(SECRET)

    imported = await sessions.import_session(TENANT, exported)
    fake_upstream.enqueue(
        Script(
            tool_calls=[
                ("read_file", json.dumps({"path": "plans.txt"})),
                ("list_dir", "{}"),
                ("search_text", json.dumps({"pattern": "plans"})),
            ]
        ),
        Script(text="Nothing there."),
    )
    turn = await run_turn(executor, imported.id, "What are the plans?", tenant=TENANT)

    assert imported.id != session_id
    read, listed, searched = tool_results(turn)
    assert read.status == "error" and "No such file or directory: 'plans.txt'" in read.content
    assert listed.content == "'.' is empty"
    assert all(SECRET not in r.content for r in (read, listed, searched))
    # The leftover copy goes too, at the replica's next sweep: its session is deleted.
    await eventually(lambda: not leftover.exists())


async def test_a_replicas_leftover_copy_of_a_deleted_sessions_workspace_is_swept(
    settings: Settings,
    executor: ExecutorClient,
    sessions: SessionClient,
    fake_upstream: FakeUpstream,
) -> None:
    doomed = await new_session(sessions)
    kept = await new_session(sessions)
    await write_through_a_turn(executor, fake_upstream, kept, TENANT)
    await sessions.delete(TENANT, doomed)
    # What another replica, or this one down at the time, holds of the deleted session
    # after the cascade was acknowledged elsewhere; and a directory that is no workspace.
    leftover = workspace(settings, TENANT, doomed)
    leftover.mkdir(parents=True)
    (leftover / "notes.txt").write_text(SECRET)
    stranger = leftover.parent / "not-a-session"
    stranger.mkdir()

    await eventually(lambda: not leftover.exists())

    assert (workspace(settings, TENANT, kept) / "notes.txt").read_text() == SECRET
    assert stranger.is_dir()
