"""Background tasks through the public gateway: command and local runners, the
classifier, cancel, logs, records (in the default SQLite file, and in PostgreSQL)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from pathlib import Path

import asyncpg
import pytest
from typer.testing import CliRunner

from tests.conftest import ACME_KEY, OTHER_KEY, make_settings
from tests.processes import alive
from tests.waiting import eventually
from threadline import errors
from threadline.cli import app
from threadline.client import GatewayClient
from threadline.config import Settings
from threadline.peers import ExecutorClient
from threadline.stack import Stack
from threadline.testing.fake_upstream import FakeUpstream, Script
from threadline.v1 import executor_pb2


@pytest.fixture
def tasks_database(request: pytest.FixtureRequest) -> str:
    """`executor.tasks.database`: empty (the default SQLite file) unless a test is
    parametrised with "postgresql", which means the run's own PostgreSQL database."""
    if getattr(request, "param", "") == "postgresql":
        return str(request.getfixturevalue("postgres_url"))
    return ""


@pytest.fixture
def settings(
    tmp_path: Path, fake_upstream: FakeUpstream, redis_url: str, tasks_database: str
) -> Settings:
    return make_settings(
        tmp_path,
        fake_upstream.base_url,
        redis_url=redis_url,
        executor={
            "workspace_root": str(tmp_path / "ws"),
            "tasks": {
                "database": tasks_database,
                "max_concurrency": 1,
                "max_queue": 2,
                "default_agent_type": "general",
                "agent_types": {
                    "general": {"description": "Works on files with tools."},
                    "echo": {
                        "description": "Repeats the prompt with a shell command.",
                        "runner": "command",
                        "argv": ["sh", "-c", 'echo "got: $1"; echo second line', "sh", "{prompt}"],
                    },
                    "sleeper": {
                        "description": "Sleeps for a long time.",
                        "runner": "command",
                        "argv": ["sh", "-c", "sleep 30 & echo child $!; wait"],
                    },
                    "escaper": {
                        "description": "Starts a child that leaves its process group.",
                        "runner": "command",
                        # The escaped sh carries the task id in its argv ($0).
                        "argv": [
                            "sh",
                            "-c",
                            "setsid sh -c 'sleep 1000 & echo escaped $$ $!; wait' \"$1\" & wait",
                            "sh",
                            "escapee-{task_id}",
                        ],
                    },
                },
            },
            "prices": {"fake-model": {"input_per_1k": 1.0, "output_per_1k": 2.0}},
        },
    )


def on_disk(path: str | Path) -> bool:
    return os.path.lexists(path)


async def finished(client: GatewayClient, task_id: str) -> executor_pb2.Task:
    async def terminal() -> executor_pb2.Task | None:
        task = await client.get_task(task_id)
        return task if task.status in ("succeeded", "failed", "cancelled") else None

    return await eventually(terminal, timeout=15)


async def logs(client: GatewayClient, task_id: str) -> list[dict[str, object]]:
    return [json.loads(entry.json) async for entry in client.watch_task(task_id)]


async def test_a_command_task_streams_its_output_and_records_the_result(
    gateway: GatewayClient,
) -> None:
    task = await gateway.submit_task("hello there", agent_type="echo")
    assert task.status == "queued" and task.runner == "command"
    entries = await logs(gateway, task.id)
    done = await finished(gateway, task.id)
    assert done.status == "succeeded" and done.exit_code == 0
    lines = [e["line"] for e in entries if e.get("type") == "stdout"]
    assert lines == ["got: hello there", "second line"]
    assert entries[-1]["type"] == "result"
    assert [t.id for t in (await gateway.list_tasks()).tasks] == [task.id]


@pytest.mark.parametrize("tasks_database", ["postgresql"], indirect=True)
async def test_a_task_kept_in_postgresql_runs_and_is_recorded_there(
    gateway: GatewayClient, tasks_database: str
) -> None:
    task = await gateway.submit_task("hello there", agent_type="echo")
    entries = await logs(gateway, task.id)
    done = await finished(gateway, task.id)
    assert done.status == "succeeded" and done.exit_code == 0
    assert task.id in [t.id for t in (await gateway.list_tasks()).tasks]
    # Read back from the database itself: the record and log are there, not in a file.
    conn = await asyncpg.connect(tasks_database)
    try:
        row = await conn.fetchrow("SELECT status, exit_code FROM tasks WHERE id = $1", task.id)
        logged = await conn.fetchval("SELECT count(*) FROM task_logs WHERE task_id = $1", task.id)
    finally:
        await conn.close()
    assert row is not None and (row["status"], row["exit_code"]) == ("succeeded", 0)
    assert logged == len(entries)


async def test_cancel_stops_a_command_and_its_children(gateway: GatewayClient) -> None:
    task = await gateway.submit_task("sleep", agent_type="sleeper")
    child = 0
    async for entry in gateway.watch_task(task.id):
        line = json.loads(entry.json)
        if line.get("type") == "stdout" and str(line["line"]).startswith("child"):
            child = int(str(line["line"]).split()[1])
            break
    cancelled = await gateway.cancel_task(task.id)
    assert cancelled.status == "cancelled"
    await eventually(lambda: not alive(child))


def live_with_marker(marker: str) -> list[int]:
    """Live processes with `marker` in their command line."""
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError), open(f"/proc/{name}/cmdline", "rb") as cmdline:
            if marker.encode() in cmdline.read() and alive(int(name)):
                found.append(int(name))
    return found


async def test_cancel_stops_a_command_whose_child_left_its_process_group_at_once(
    gateway: GatewayClient,
) -> None:
    task = await gateway.submit_task("escape", agent_type="escaper")
    escaped: list[int] = []
    async for entry in gateway.watch_task(task.id):
        line = json.loads(entry.json)
        if line.get("type") == "stdout" and str(line["line"]).startswith("escaped"):
            escaped = [int(pid) for pid in str(line["line"]).split()[1:]]
            break
    assert len(escaped) == 2 and all(alive(pid) for pid in escaped)

    started = time.monotonic()
    cancelled = await gateway.cancel_task(task.id)

    assert time.monotonic() - started < 2.5
    assert cancelled.status == "cancelled"
    # Stopped and reaped before the cancel returned: not even left to init.
    assert [pid for pid in escaped if alive(pid)] == []
    assert live_with_marker(f"escapee-{task.id}") == []


async def test_the_classifier_picks_the_type_and_a_local_task_records_cost(
    gateway: GatewayClient, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(
        Script(text='{"agent_type": "general", "reasons": "it is about files"}'),
        Script(text="Nothing to do: the workspace is empty."),
    )
    task = await gateway.submit_task("Tidy the workspace.")
    assert task.agent_type == "general" and "it is about files" in task.reason
    done = await finished(gateway, task.id)
    assert done.status == "succeeded", done.reason
    assert done.tokens_in > 0 and done.tokens_out > 0
    expected = done.tokens_in / 1000 * 1.0 + done.tokens_out / 1000 * 2.0
    assert done.cost == pytest.approx(expected)
    entries = await logs(gateway, task.id)
    assert any(e.get("type") == "answer" for e in entries)


async def test_a_full_queue_is_refused_and_other_tenants_see_nothing(
    stack: Stack, gateway: GatewayClient
) -> None:
    first = await gateway.submit_task("one", agent_type="sleeper")
    await gateway.submit_task("two", agent_type="sleeper")
    await gateway.submit_task("three", agent_type="sleeper")
    with pytest.raises(errors.ResourceExhausted):
        await gateway.submit_task("four", agent_type="sleeper")
    async with GatewayClient(stack.address("gateway"), api_key=OTHER_KEY) as other:
        with pytest.raises(errors.NotFound):
            await other.get_task(first.id)
        assert (await other.list_tasks()).tasks == []
    for task in (await gateway.list_tasks()).tasks:
        await gateway.cancel_task(task.id)


async def test_bad_task_input_names_the_problem(gateway: GatewayClient) -> None:
    with pytest.raises(errors.InvalidArgument, match="prompt is empty"):
        await gateway.submit_task("  ")
    with pytest.raises(errors.InvalidArgument, match="unknown agent_type"):
        await gateway.submit_task("x", agent_type="nope")
    with pytest.raises(errors.InvalidArgument, match="plain directory name"):
        await gateway.submit_task("x", agent_type="echo", workspace="../etc")
    with pytest.raises(errors.InvalidArgument, match="malformed task id"):
        await gateway.get_task("nope")


@pytest.mark.parametrize("tasks_database", ["", "postgresql"], indirect=True)
async def test_delete_task_removes_the_record_the_log_and_the_workspace(
    stack: Stack, gateway: GatewayClient, tmp_path: Path, settings: Settings, tasks_database: str
) -> None:
    task = await gateway.submit_task(f"{CANARY} written here", agent_type="echo")
    await finished(gateway, task.id)
    assert CANARY in await stored_text(settings, tasks_database)
    workspace = Path(task.workspace)
    assert on_disk(workspace)
    # The tenant's name is never part of the path: a hashed key stands for it.
    assert workspace.parent.parent == tmp_path / "ws" / "tasks"
    assert "acme" not in str(workspace)

    async with GatewayClient(stack.address("gateway"), api_key=OTHER_KEY) as other:
        with pytest.raises(errors.NotFound):
            await other.delete_task(task.id)
    assert (await gateway.get_task(task.id)).id == task.id

    deleted = await gateway.delete_task(task.id)
    assert (deleted.tasks, deleted.workspaces) == (1, 1)
    assert deleted.log_lines >= 3
    assert not on_disk(workspace)
    with pytest.raises(errors.NotFound):
        await gateway.get_task(task.id)
    with pytest.raises(errors.NotFound):
        await logs(gateway, task.id)
    with pytest.raises(errors.NotFound):
        await gateway.delete_task(task.id)
    assert task.id not in [t.id for t in (await gateway.list_tasks()).tasks]
    # Nowhere the store keeps it: the SQLite file and its WAL, or PostgreSQL's tables.
    assert CANARY not in await stored_text(settings, tasks_database)


CANARY = "canary-7c1f"


async def stored_text(settings: Settings, tasks_database: str) -> str:
    """Everything the task store holds: its files' bytes, or its tables' rows."""
    if not tasks_database:
        files = settings.data_dir.glob("tasks.db*")
        return "".join([(await asyncio.to_thread(f.read_bytes)).decode("latin-1") for f in files])
    conn = await asyncpg.connect(tasks_database)
    try:
        rows = await conn.fetch(
            "SELECT t::text FROM tasks t UNION ALL SELECT l::text FROM task_logs l"
        )
    finally:
        await conn.close()
    return "\n".join(row[0] for row in rows)


async def test_delete_task_cancels_a_running_task_first(gateway: GatewayClient) -> None:
    task = await gateway.submit_task("sleep", agent_type="sleeper")

    async def started() -> bool:
        return (await gateway.get_task(task.id)).status == "running"

    await eventually(started, timeout=15)
    deleted = await gateway.delete_task(task.id)
    assert deleted.tasks == 1
    assert not on_disk(task.workspace)
    with pytest.raises(errors.NotFound):
        await gateway.get_task(task.id)
    with pytest.raises(errors.InvalidArgument, match="malformed task id"):
        await gateway.delete_task("task_" + "x" * 5000)


async def test_delete_tenant_tasks_removes_every_task_of_the_tenant_only(
    stack: Stack, gateway: GatewayClient
) -> None:
    async with GatewayClient(stack.address("gateway"), api_key=OTHER_KEY) as other:
        done = await finished(gateway, (await gateway.submit_task("a", agent_type="echo")).id)
        running = await gateway.submit_task("b", agent_type="sleeper")

        async def started() -> bool:
            return (await gateway.get_task(running.id)).status == "running"

        await eventually(started, timeout=15)
        # One worker (max_concurrency 1): it waits behind the running one.
        theirs = await other.submit_task("x", agent_type="sleeper")
        executor = ExecutorClient(stack.address("executor"))
        try:
            deleted = await executor.delete_tenant_tasks("acme")
            assert (deleted.tasks, deleted.still_running) == (2, 0)
            assert deleted.workspaces == 2 and deleted.log_lines >= 2
            assert (await gateway.list_tasks()).tasks == []
            assert not on_disk(done.workspace) and not on_disk(running.workspace)
            # The other tenant's task is untouched (and now runs).
            assert (await other.get_task(theirs.id)).status in ("queued", "running")
            again = await executor.delete_tenant_tasks("acme")
            assert (again.tasks, again.still_running) == (0, 0)
            with pytest.raises(errors.InvalidArgument, match="tenant is required"):
                await executor.delete_tenant_tasks("")
        finally:
            await executor.close()
        await other.cancel_task(theirs.id)


async def test_the_cli_deletes_a_task(stack: Stack, gateway: GatewayClient) -> None:
    task = await finished(gateway, (await gateway.submit_task("a", agent_type="echo")).id)
    argv = ["tasks", "delete", task.id, "--address", stack.address("gateway")]
    argv += ["--api-key", ACME_KEY]
    # The CLI runs its own event loop: in a thread, beside the stack's.
    result = await asyncio.to_thread(CliRunner().invoke, app, argv)
    assert result.exit_code == 0, result.output
    assert f"{task.id} deleted" in result.output and "1 workspace" in result.output
    assert not on_disk(task.workspace)
    again = await asyncio.to_thread(CliRunner().invoke, app, argv)
    assert again.exit_code == 1 and "NOT_FOUND" in again.output
