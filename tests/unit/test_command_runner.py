"""The command runner against real processes: output, exit codes, timeout, cancel,
and what the command leaves behind (children that left its process group)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
import time
import uuid
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


def survivors(marker: str) -> list[int]:
    """Live processes with `marker` in their command line."""
    found = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/cmdline", "rb") as cmdline:
                if marker.encode() in cmdline.read() and alive(int(name)):
                    found.append(int(name))
        except (OSError, ValueError):
            continue
    return found


def escaping(then: str) -> tuple[list[str], str]:
    """An argv that starts a child which leaves the process group (setsid) with a
    grandchild of its own, says `escaped <child> <grandchild>`, then runs `then`;
    and the marker every process of it but the grandchild carries in its argv."""
    marker = f"h-escape-{uuid.uuid4().hex}"
    script = f"setsid sh -c 'sleep 1000 & echo escaped $$ $!; wait' \"$0\" & {then}"
    return ["sh", "-c", script, marker], marker


def escaped_pids(log: LogCollector) -> list[int]:
    for line in log.lines("stdout"):
        if line.startswith("escaped "):
            return [int(pid) for pid in line.split()[1:]]
    return []


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


async def test_cancel_stops_a_child_that_left_the_process_group(tmp_path: Path) -> None:
    argv, marker = escaping(then="sleep 30")
    log = LogCollector()
    run = asyncio.create_task(CommandRunner(argv).run(make_task(tmp_path), log))
    escaped = await eventually(lambda: escaped_pids(log))
    assert all(alive(pid) for pid in escaped)

    cancelled_at = time.monotonic()
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(10):
            await run

    assert time.monotonic() - cancelled_at < 2
    # Killed and reaped before the run ended, not left for init.
    assert [pid for pid in escaped if alive(pid)] == []
    assert survivors(marker) == []


async def test_exit_0_leaving_a_daemon_succeeds_at_once_and_the_daemon_is_stopped(
    tmp_path: Path,
) -> None:
    argv, marker = escaping(then="echo main done")
    log = LogCollector()
    started = time.monotonic()
    # The daemon would outlive the timeout: only the command itself counts.
    async with asyncio.timeout(10):
        outcome = await CommandRunner(argv, timeout_s=1).run(make_task(tmp_path), log)

    assert (outcome.status, outcome.exit_code) == ("succeeded", 0)
    assert time.monotonic() - started < 4
    escaped = escaped_pids(log)
    assert len(escaped) == 2 and [pid for pid in escaped if alive(pid)] == []
    assert survivors(marker) == []
    (cleanup,) = [e["line"] for e in log.entries if e["type"] == "cleanup"]
    assert "left running" in cleanup and f"{escaped[0]} (sh -c sleep 1000" in cleanup


async def test_a_detached_daemon_is_stopped_even_with_its_output_elsewhere(
    tmp_path: Path,
) -> None:
    # Double-forked, setsid, stdio off the task's pipes: nothing ties it to the task.
    argv = [
        "sh",
        "-c",
        "(setsid sh -c 'echo $$ > daemon.pid; exec sleep 1000' </dev/null >/dev/null 2>&1 &);"
        "while [ ! -s daemon.pid ]; do sleep 0.01; done",
    ]
    task = make_task(tmp_path)
    async with asyncio.timeout(10):
        outcome = await CommandRunner(argv).run(task, LogCollector())

    assert outcome.status == "succeeded"
    daemon = int((Path(task.workspace) / "daemon.pid").read_text())
    assert not alive(daemon)


async def test_a_command_past_its_timeout_is_timed_out_with_its_escaped_child_stopped(
    tmp_path: Path,
) -> None:
    argv, marker = escaping(then="sleep 30")
    log = LogCollector()
    started = time.monotonic()
    async with asyncio.timeout(10):
        outcome = await CommandRunner(argv, timeout_s=0.5).run(make_task(tmp_path), log)

    assert (outcome.status, outcome.reason) == ("failed", "timed out after 0.5s")
    assert time.monotonic() - started < 3
    escaped = escaped_pids(log)
    assert len(escaped) == 2 and [pid for pid in escaped if alive(pid)] == []
    assert survivors(marker) == []


async def test_a_command_that_cannot_start_fails_saying_why(tmp_path: Path) -> None:
    outcome = await CommandRunner(["h-no-such-agent"]).run(make_task(tmp_path), LogCollector())
    assert outcome.status == "failed"
    assert "cannot start the command" in outcome.reason and "h-no-such-agent" in outcome.reason


#: An executor in miniature: runs one command task, prints its log lines.
EXECUTOR = textwrap.dedent(
    """
    import asyncio, json, sys
    from services.executor.tasks.command_runner import CommandRunner
    from services.executor.tasks.records import TaskRecord

    async def main() -> None:
        async def output(entry: dict) -> None:
            print(json.dumps(entry), flush=True)

        task = TaskRecord("task_x", "acme", "p", "coder", "command", sys.argv[1])
        await CommandRunner(json.loads(sys.argv[2])).run(task, output)

    asyncio.run(main())
    """
)


async def test_a_dying_executor_takes_the_command_and_its_escaped_child_along(
    tmp_path: Path,
) -> None:
    argv, marker = escaping(then="sleep 30")
    executor = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        EXECUTOR,
        str(tmp_path / "ws"),
        json.dumps(argv),
        stdout=asyncio.subprocess.PIPE,
    )
    assert executor.stdout is not None
    escaped: list[int] = []
    while not escaped:
        line = json.loads(await executor.stdout.readline())["line"]
        escaped = [int(pid) for pid in line.split()[1:]] if line.startswith("escaped ") else []

    executor.kill()
    await executor.wait()

    await eventually(lambda: not survivors(marker) and not any(alive(p) for p in escaped))


async def test_a_command_does_not_inherit_the_executors_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("THREADLINE_SERVICE_AUTH__TOKEN", "s3cret-token")
    monkeypatch.setenv("THREADLINE_SESSION__DATABASE", "postgresql://app:pw@db/threadline")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    log = LogCollector()

    outcome = await CommandRunner(["env"]).run(make_task(tmp_path), log)

    assert outcome.status == "succeeded"
    seen = "\n".join(log.lines("stdout"))
    assert "s3cret" not in seen and "THREADLINE_" not in seen and "pw@db" not in seen
    assert "PATH=" in seen and "LC_ALL=C.UTF-8" in seen
