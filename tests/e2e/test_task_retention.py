"""Task retention through a running stack: the executor's sweep removes ended tasks
(record, log, workspace) once they are old enough."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from tests.conftest import make_settings
from tests.waiting import eventually
from threadline import errors
from threadline.client import GatewayClient
from threadline.config import Settings
from threadline.testing.fake_upstream import FakeUpstream
from threadline.v1 import executor_pb2


@pytest.fixture
def settings(tmp_path: Path, fake_upstream: FakeUpstream, redis_url: str) -> Settings:
    return make_settings(
        tmp_path,
        fake_upstream.base_url,
        redis_url=redis_url,
        executor={
            "workspace_root": str(tmp_path / "ws"),
            "tasks": {
                "retention_s": 1.0,
                "sweep_s": 0.2,
                "agent_types": {
                    "general": {"description": "Works on files with tools."},
                    "echo": {
                        "description": "Writes its prompt to a file.",
                        "runner": "command",
                        "argv": ["sh", "-c", 'echo "$1" > notes.txt', "sh", "{prompt}"],
                    },
                },
            },
        },
    )


def on_disk(path: str) -> bool:
    return os.path.lexists(path)


async def ended(client: GatewayClient, task_id: str) -> executor_pb2.Task:
    async def terminal() -> executor_pb2.Task | None:
        task = await client.get_task(task_id)
        return task if task.status in ("succeeded", "failed", "cancelled") else None

    return await eventually(terminal, timeout=15)


def store_bytes(settings: Settings) -> bytes:
    return b"".join(f.read_bytes() for f in settings.data_dir.glob("tasks.db*"))


async def test_an_ended_task_expires_with_its_log_and_workspace(
    gateway: GatewayClient, settings: Settings
) -> None:
    canary = "canary-40e2aa"
    task = await ended(gateway, (await gateway.submit_task(canary, agent_type="echo")).id)
    assert task.status == "succeeded" and on_disk(task.workspace)
    assert canary.encode() in await asyncio.to_thread(store_bytes, settings)

    async def gone() -> bool:
        try:
            await gateway.get_task(task.id)
        except errors.NotFound:
            return True
        return False

    await eventually(gone, timeout=10)
    assert not on_disk(task.workspace)
    # Nor in the task store's file or its WAL.
    assert canary.encode() not in await asyncio.to_thread(store_bytes, settings)
    with pytest.raises(errors.NotFound):
        _ = [entry async for entry in gateway.watch_task(task.id)]
