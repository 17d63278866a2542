"""The `command` runner: an external CLI agent, run from an argv template.

The argv never goes through a shell: a prompt is one argument, whatever it
contains. The command runs in the task's workspace under a supervisor process of
its own (`supervisor.py`), because agents spawn shells, compilers and servers,
some of which leave the process group (setsid) or double-fork: the supervisor is
their subreaper, so it finds and kills every one of them, when the command ends
and on a cancel or timeout, and reaps them before the runner returns.

The supervisor reports the command's own exit on a status pipe, so the outcome
is the command's: exit 0 is `succeeded` even if it left a daemon behind (killed,
and said so in the log), and a timeout is the command itself running too long.
No wait here is unbounded: a pipe some process still holds open is given up on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import string
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from services.executor.tasks import supervisor
from services.executor.tasks.records import LogWriter, RunOutcome, TaskRecord
from threadline.errors import InvalidArgument
from threadline.logs import get_logger

log = get_logger(__name__)

PLACEHOLDERS = frozenset({"prompt", "workspace", "task_id"})
#: How long the supervisor may take to stop everything once asked (SIGTERM, then
#: SIGKILL rounds), before the runner kills it and the command's group itself.
STOP_WAIT_S = supervisor.KILL_GRACE_S + supervisor.KILL_ROUNDS_S + 1.0
#: Once the command has exited, how long the supervisor may take over its leftovers.
SETTLE_WAIT_S = supervisor.LEFTOVER_GRACE_S + STOP_WAIT_S
#: Once the supervisor has ended, how long the output pipes may take to reach EOF.
DRAIN_S = 2.0
#: Longest line read whole; a longer one is logged in pieces.
LINE_LIMIT = 1 << 20

#: Cleanups that outlive a second cancel of their run: referenced until done.
_cleanups: set[asyncio.Task[None]] = set()


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
        child = await Supervised.start(self.command_for(task), workspace, log)
        try:
            outcome = await self._outcome(child)
            await child.close()
        except BaseException:
            # Cancelled (or failed while logging): nothing it started may outlive us.
            # Shielded: a second cancel must not cut the cleanup short.
            cleanup = asyncio.create_task(child.stop_and_close())
            _cleanups.add(cleanup)
            cleanup.add_done_callback(_cleanups.discard)
            await asyncio.shield(cleanup)
            raise
        return outcome

    async def _outcome(self, child: Supervised) -> RunOutcome:
        await asyncio.wait([child.exited], timeout=self.timeout_s)
        if not child.exited.done():
            await child.stop()
            return RunOutcome(
                "failed",
                reason=f"timed out after {self.timeout_s:g}s",
                exit_code=child.code(),
                cause="timeout",
            )
        await child.settle()
        code = child.code()
        if child.spawn_error:
            return RunOutcome(
                "failed", reason=f"cannot start the command: {child.spawn_error}", cause="spawn"
            )
        if code is None:
            return RunOutcome(
                "failed", reason="the command's supervisor ended unexpectedly", cause="supervisor"
            )
        if code == 0:
            return RunOutcome("succeeded", exit_code=0)
        if code < 0:
            return RunOutcome(
                "failed", reason=f"killed by signal {-code}", exit_code=code, cause="signal"
            )
        return RunOutcome("failed", reason=f"exit code {code}", exit_code=code, cause="exit_code")


class Supervised:
    """A command running under its supervisor process, seen from the executor.

    The status pipe reaches EOF only when the supervisor exits, after everything
    the command started is dead and reaped: `ended` is that moment.
    """

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        status: asyncio.StreamReader,
        status_pipe: asyncio.BaseTransport,
        output: LogWriter,
    ) -> None:
        assert proc.stdout is not None and proc.stderr is not None
        self.proc = proc
        self._status = status
        self._status_pipe = status_pipe
        #: The command's own exit code; None if the supervisor ended without one.
        self.exited: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self.ended = asyncio.Event()
        self.command_pid = 0
        self.spawn_error = ""
        self._readers = [
            asyncio.create_task(_pump(proc.stdout, "stdout", output)),
            asyncio.create_task(_pump(proc.stderr, "stderr", output)),
            asyncio.create_task(self._follow(output)),
        ]

    @classmethod
    async def start(cls, argv: Sequence[str], workspace: Path, output: LogWriter) -> Supervised:
        read_fd, write_fd = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                # -P: the workspace (the cwd) must not shadow the modules it imports.
                "-P",
                "-m",
                supervisor.__name__,
                f"--status-fd={write_fd}",
                f"--parent={os.getpid()}",
                "--",
                *argv,
                cwd=workspace,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                # Out of the executor's group: a Ctrl-C meant for it is its to handle.
                start_new_session=True,
                limit=LINE_LIMIT,
                pass_fds=(write_fd,),
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        status = asyncio.StreamReader(limit=LINE_LIMIT)
        status_file = os.fdopen(read_fd, "rb", buffering=0)
        try:
            pipe, _ = await asyncio.get_running_loop().connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(status), status_file
            )
        except BaseException:
            status_file.close()
            # Cancelled this early: the supervisor stops the command by itself.
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            raise
        return cls(proc, status, pipe, output)

    def code(self) -> int | None:
        return self.exited.result() if self.exited.done() else None

    async def _follow(self, output: LogWriter) -> None:
        try:
            while line := await self._status.readline():
                try:
                    await self._on_status(json.loads(line), output)
                except Exception:
                    # Only the pipe's end may set `ended`: stop() relies on it.
                    log.warning("command_runner.status_failed", pid=self.proc.pid, exc_info=True)
        finally:
            if not self.exited.done():
                self.exited.set_result(None)
            self.ended.set()

    async def _on_status(self, report: dict[str, Any], output: LogWriter) -> None:
        event = report.get("event")
        if event == "started":
            self.command_pid = int(report["pid"])
        elif event == "spawn_failed":
            self.spawn_error = str(report["error"])
        elif event == "exited" and not self.exited.done():
            self.exited.set_result(report["code"])
        elif event == "killed":
            await output({"type": "cleanup", "line": report["line"]})

    async def settle(self) -> None:
        """The command has exited: give the supervisor time to stop what it left."""
        if not await _within(self.ended.wait(), SETTLE_WAIT_S):
            await self.stop()

    async def stop(self) -> None:
        """Have the supervisor stop the command and everything it started."""
        if self.ended.is_set():
            return
        self._signal_supervisor(signal.SIGTERM)
        if await _within(self.ended.wait(), STOP_WAIT_S):
            return
        # A supervisor that does not answer: kill it and the command's group, which
        # is as far as the executor can reach without it.
        log.warning("command_runner.supervisor_stuck", pid=self.proc.pid)
        self._signal_supervisor(signal.SIGKILL)
        if self.command_pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.command_pid, signal.SIGKILL)

    def _signal_supervisor(self, sig: signal.Signals) -> None:
        # Not Process.send_signal: its poll() could reap the pid behind asyncio's back.
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)

    async def close(self) -> None:
        """Read the output to its end, or give up on it after DRAIN_S; then the
        supervisor's exit, which by now is (or is about to be) there."""
        _, pending = await asyncio.wait(self._readers, timeout=DRAIN_S)
        if pending:
            log.warning("command_runner.pipes_held_open", pid=self.proc.pid)
            for reader in pending:
                reader.cancel()
            self._status_pipe.close()
        results = await asyncio.gather(*self._readers, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                log.warning("command_runner.log_failed", pid=self.proc.pid, error=repr(result))
        # Until asyncio has seen the supervisor exit too: its transport closes then.
        await _within(self.proc.wait(), DRAIN_S)

    async def stop_and_close(self) -> None:
        await self.stop()
        await self.close()


async def _within(waiting: Coroutine[Any, Any, Any], timeout_s: float) -> bool:
    """Whether `waiting` finished within timeout_s (it is cancelled if not)."""
    try:
        async with asyncio.timeout(timeout_s):
            await waiting
    except TimeoutError:
        return False
    return True


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
