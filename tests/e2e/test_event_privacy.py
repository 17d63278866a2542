"""Lifecycle events never carry what a user or a model wrote: a canary in the user's
message, in tool call arguments (paths the tools refuse among them), in an upstream's
error, in a task's prompt, output and a model's last words, is in the conversation
and the task records, and never on the event stream (WatchEvents, the Redis stream)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.conftest import ADMIN_KEY, make_settings
from tests.waiting import eventually
from threadline import errors
from threadline.client import GatewayClient
from threadline.config import Settings
from threadline.stack import Stack
from threadline.testing.fake_upstream import FakeUpstream, Script
from threadline.v1 import events_pb2, executor_pb2, memory_pb2

CANARY = "canary-e1b7c04d"


@pytest.fixture
def settings(tmp_path: Path, fake_upstream: FakeUpstream, redis_url: str) -> Settings:
    return make_settings(
        tmp_path,
        fake_upstream.base_url,
        redis_url=redis_url,
        # Keeps only the last user message: compaction then has the rest to summarise.
        memory={"compact_retained_tokens": 0},
        executor={
            "workspace_root": str(tmp_path / "ws"),
            "tools_enabled": True,
            "tool_rules": [
                {"path": "", "permission": "write"},
                {"path": "docs", "permission": "read"},
            ],
            "tasks": {
                "agent_types": {
                    "general": {"description": "Works on files with tools."},
                    "shouter": {
                        "description": "Prints its prompt and fails.",
                        "runner": "command",
                        "argv": ["sh", "-c", 'echo "$1"; echo "$1" >&2; exit 3', "sh", "{prompt}"],
                    },
                },
            },
        },
    )


async def watched(gateway: GatewayClient, received: list[events_pb2.LifecycleEvent]) -> None:
    async for event in gateway.watch_events():
        received.append(event)


async def stream_events(redis_client: aioredis.Redis) -> list[str]:
    """Every event the Redis streams hold, as stored."""
    stored: list[str] = []
    async for key in redis_client.scan_iter(_type="STREAM"):
        for _, fields in await redis_client.xrange(key) or []:
            stored.extend(str(value) for value in (fields or {}).values())
    return stored


async def task_end(gateway: GatewayClient, task_id: str) -> executor_pb2.Task:
    async def ended() -> executor_pb2.Task | None:
        task = await gateway.get_task(task_id)
        return task if task.status in ("succeeded", "failed", "cancelled") else None

    return await eventually(ended, timeout=15)


async def test_no_event_carries_the_users_or_the_models_text(
    stack: Stack,
    gateway: GatewayClient,
    fake_upstream: FakeUpstream,
    redis_client: aioredis.Redis,
) -> None:
    received: list[events_pb2.LifecycleEvent] = []
    async with GatewayClient(stack.address("gateway"), api_key=ADMIN_KEY) as admin:
        watch = asyncio.create_task(watched(admin, received))

        async def live() -> bool:
            if not any(e.type == "session.created" for e in received):
                await gateway.create_session(title="probe")
            return any(e.type == "session.created" for e in received)

        await eventually(live, interval=0.1)
        session = await gateway.create_session()
        calls = [
            ("write_file", {"path": f"notes/{CANARY}.txt", "content": CANARY}),
            ("read_file", {"path": f"../{CANARY}/x"}),
            ("read_file", {"path": f"/{CANARY}/abs"}),
            ("write_file", {"path": f"docs/{CANARY}.md", "content": CANARY}),
            (f"no_such_tool_{CANARY}", {"path": CANARY}),
        ]
        fake_upstream.enqueue(
            Script(tool_calls=[(name, json.dumps(args)) for name, args in calls]),
            Script(text=f"Saved {CANARY}."),
        )
        turn = [e async for e in gateway.converse(session.id, f"Please keep {CANARY} safe.")]
        statuses = [e.tool_result.status for e in turn if e.WhichOneof("event") == "tool_result"]
        assert statuses == ["ok", "denied", "denied", "denied", "error"]
        # A server that echoes the request in its error.
        fake_upstream.enqueue(
            Script(status=400, error_body={"error": {"message": f"bad input: {CANARY}"}})
        )
        with pytest.raises(errors.ThreadlineError):
            _ = [e async for e in gateway.converse(session.id, f"Again {CANARY}.")]

        # A memory job whose model call meets the same server.
        echo = Script(status=400, error_body={"error": {"message": f"bad input: {CANARY}"}})
        fake_upstream.enqueue(echo, echo, echo)
        job = await gateway.compact_session(session.id, wait=True)
        assert job.state == memory_pb2.JOB_STATE_FAILED and CANARY in job.error

        command = await gateway.submit_task(f"{CANARY} command", agent_type="shouter")
        fake_upstream.enqueue(Script(text=f"I refuse: {CANARY}", finish_reason="content_filter"))
        local = await gateway.submit_task(f"{CANARY} local", agent_type="general")
        assert (await task_end(gateway, command.id)).status == "failed"
        assert (await task_end(gateway, local.id)).status == "failed"

        async def all_seen() -> bool:
            ended = {e.type for e in received if e.type.startswith("task.")}
            return (
                "task.failed" in ended
                and sum(e.type == "task.failed" for e in received) == 2
                and any(e.type == "turn.failed" for e in received)
            )

        await eventually(all_seen)
        watch.cancel()

    # The tenant still has its text where it belongs: the conversation, the task record.
    detail = await gateway.get_session(session.id)
    assert any(CANARY in m.content for m in detail.messages)
    assert CANARY in (await gateway.get_task(local.id)).reason
    types = {e.type for e in received}
    assert {"tool.denied", "turn.completed", "turn.failed", "task.failed"} <= types
    assert "compact.failed" in types
    leaking = [f"{e.type}: {dict(e.attributes)}" for e in received if CANARY in str(e)]
    assert leaking == [], "\n".join(leaking)
    stored = await stream_events(redis_client)
    assert any('"tool.denied"' in line for line in stored)
    assert [line for line in stored if CANARY in line] == []
