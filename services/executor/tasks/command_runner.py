"""The `command` runner: an external CLI agent, run from an argv template.

The process starts in its own session (so its own process group) in the task's
workspace; a timeout or a cancel signals the whole group, because agents spawn
shells, compilers and servers that would otherwise outlive the task. The argv
never goes through a shell: a prompt is one argument, whatever it contains.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import string
from collections.abc import Sequence
from pathlib import Path

from services.executor.tasks.records import LogWriter, RunOutcome, TaskRecord
from threadline.errors import InvalidArgument
from threadline.logs import get_logger

log = get_logger(__name__)

PLACEHOLDERS = frozenset({"prompt", "workspace", "task_id"})
#: Between SIGTERM and SIGKILL.
KILL_GRACE_S = 2.0
#: After the process exits, how long its output pipes may take to reach EOF.
DRAIN_S = 2.0
#: Longest line read whole; a longer one is logged in pieces.
LINE_LIMIT = 1 << 20


def _check_template(argv: Sequence[str]) -> None:
    if not argv:
        raise InvalidArgument("command runner needs a non-empty argv")
    for item in argv:
        try:
            fields = [name for _, name, _, _ in string.Formatter().parse(item) if name is not None]
        except ValueError as exc:
            raise InvalidArgument(f"command argv item {item!r}: {exc}") from exc
        unknown = set(fields) - PLACEHOLDERS
        if unknown:
            raise InvalidArgument(
                f"command argv item {item!r} uses unknown placeholders {sorted(unknown)}; "
                f"allowed: {sorted(PLACEHOLDERS)}"
            )


class CommandRunner:
    def __init__(self, argv: Sequence[str], *, timeout_s: float = 600, name: str = "command"):
        _check_template(argv)
        self.argv = tuple(argv)
        self.timeout_s = timeout_s
        self.name = name

    def command_for(self, task: TaskRecord) -> list[str]:
        values = {"prompt": task.prompt, "workspace": task.workspace, "task_id": task.id}
        return [item.format(**values) for item in self.argv]

    async def run(self, task: TaskRecord, log: LogWriter) -> RunOutcome:
        workspace = Path(task.workspace)
        await asyncio.to_thread(workspace.mkdir, parents=True, exist_ok=True)
        proc = await asyncio.create_subprocess_exec(
            *self.command_for(task),
            cwd=workspace,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            limit=LINE_LIMIT,
        )
        assert proc.stdout is not None and proc.stderr is not None
        pumps = [
            asyncio.create_task(_pump(proc.stdout, "stdout", log)),
            asyncio.create_task(_pump(proc.stderr, "stderr", log)),
        ]
        try:
            exited = asyncio.create_task(proc.wait())
            done, _ = await asyncio.wait([exited], timeout=self.timeout_s)
            if not done:
                exited.cancel()
                await _kill_group(proc)
                await _drain(proc, pumps)
                return RunOutcome(
                    "failed",
                    reason=f"timed out after {self.timeout_s:g}s",
                    exit_code=proc.returncode,
                )
            await _drain(proc, pumps)
        except BaseException:
            # Cancelled (or failed while logging): nothing of the group may outlive us.
            await _kill_group(proc)
            await _drain(proc, pumps)
            raise
        code = proc.returncode
        assert code is not None
        if code == 0:
            return RunOutcome("succeeded", exit_code=0)
        if code < 0:
            return RunOutcome("failed", reason=f"killed by signal {-code}", exit_code=code)
        return RunOutcome("failed", reason=f"exit code {code}", exit_code=code)


async def _pump(stream: asyncio.StreamReader, kind: str, log: LogWriter) -> None:
    while True:
        try:
            raw = await stream.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                await log({"type": kind, "line": exc.partial.decode("utf-8", "replace")})
            return
        except asyncio.LimitOverrunError as exc:
            raw = await stream.read(exc.consumed)
        await log({"type": kind, "line": raw.decode("utf-8", "replace").rstrip("\r\n")})


def _signal_group(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    # The group id is the leader's pid (start_new_session); it stays reserved while
    # any member lives, and once none does there is nothing left to signal.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM to the group, KILL_GRACE_S to exit, then SIGKILL to what is left."""
    _signal_group(proc, signal.SIGTERM)
    exited = asyncio.create_task(proc.wait())
    done, _ = await asyncio.wait([exited], timeout=KILL_GRACE_S)
    # The leader may be gone while children that ignored SIGTERM are not.
    _signal_group(proc, signal.SIGKILL)
    if not done:
        await exited


async def _drain(proc: asyncio.subprocess.Process, pumps: list[asyncio.Task[None]]) -> None:
    """Wait for the output to reach EOF; background children may hold the pipes open."""
    _, pending = await asyncio.wait(pumps, timeout=DRAIN_S)
    if pending:
        log.warning("command_runner.pipes_held_open", pid=proc.pid)
        _signal_group(proc, signal.SIGKILL)
        _, pending = await asyncio.wait(pending, timeout=DRAIN_S)
    for pump in pending:
        pump.cancel()
    results = await asyncio.gather(*pumps, return_exceptions=True)
    for result in results:
        if isinstance(result, Exception):
            log.warning("command_runner.log_failed", pid=proc.pid, error=repr(result))
