"""The command runner against real processes: output, exit codes, timeout, cancel."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from services.executor.tasks.command_runner import CommandRunner
from services.executor.tasks.records import TaskRecord, new_task_id
from tests.processes import alive
from tests.waiting import eventually
from threadline.errors import InvalidArgument


def make_task(tmp_path: Path, prompt: str = "hello") -> TaskRecord:
    return TaskRecord(
        id=new_task_id(),
        tenant="acme",
        prompt=prompt,
        agent_type="coder",
        runner="command",
        workspace=str(tmp_path / "ws"),
    )


class LogCollector:
    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self.times: list[float] = []

    async def __call__(self, entry: dict[str, Any]) -> None:
        self.entries.append(entry)
        self.times.append(time.monotonic())

    def lines(self, kind: str) -> list[str]:
        return [e["line"] for e in self.entries if e["type"] == kind]


async def test_stdout_is_streamed_line_by_line_as_it_arrives(tmp_path: Path) -> None:
    runner = CommandRunner(["sh", "-c", "echo one; sleep 0.5; echo two; echo oops >&2"])
    log = LogCollector()
    outcome = await runner.run(make_task(tmp_path), log)
    assert outcome.status == "succeeded"
    assert outcome.exit_code == 0
    assert log.lines("stdout") == ["one", "two"]
    assert log.lines("stderr") == ["oops"]
    # "one" was logged before the process went on to sleep, not at exit.
    assert log.times[1] - log.times[0] >= 0.4


async def test_placeholders_are_arguments_never_shell_and_cwd_is_the_workspace(
    tmp_path: Path,
) -> None:
    runner = CommandRunner(
        ["sh", "-c", 'printf "%s|%s|%s\\n" "$1" "$2" "$(pwd)"', "sh", "{prompt}", "{task_id}"]
    )
    task = make_task(tmp_path, prompt="$(echo pwned); {workspace} `id`")
    log = LogCollector()
    outcome = await runner.run(task, log)
    assert outcome.status == "succeeded"
    assert log.lines("stdout") == [f"$(echo pwned); {{workspace}} `id`|{task.id}|{tmp_path / 'ws'}"]


async def test_nonzero_exit_fails_with_the_code(tmp_path: Path) -> None:
    outcome = await CommandRunner(["sh", "-c", "exit 3"]).run(make_task(tmp_path), LogCollector())
    assert outcome.status == "failed"
    assert outcome.reason == "exit code 3"
    assert outcome.exit_code == 3


def test_unknown_placeholder_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="unknown placeholders"):
        CommandRunner(["agent", "{secret}"])


async def test_timeout_kills_the_process_group(tmp_path: Path) -> None:
    runner = CommandRunner(
        ["sh", "-c", "trap '' TERM; sleep 30 & echo child $!; wait"], timeout_s=0.5
    )
    log = LogCollector()
    started = time.monotonic()
    outcome = await runner.run(make_task(tmp_path), log)
    assert outcome.status == "failed"
    assert outcome.reason == "timed out after 0.5s"
    # SIGTERM ignored by the shell: SIGKILL after the grace.
    assert time.monotonic() - started < 5
    child = int(log.lines("stdout")[0].split()[1])
    # Killed with its group; gone once init has reaped it.
    await eventually(lambda: not alive(child))


async def test_cancel_kills_the_whole_process_group(tmp_path: Path) -> None:
    runner = CommandRunner(["sh", "-c", "sleep 30 & echo child $!; wait"])
    log = LogCollector()
    run = asyncio.create_task(runner.run(make_task(tmp_path), log))
    (line,) = await eventually(lambda: log.lines("stdout"))
    child = int(line.split()[1])
    assert alive(child)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    await eventually(lambda: not alive(child))
