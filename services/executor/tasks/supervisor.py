"""The command runner's per-task supervisor: a small process between the executor
and the command, which lets nothing the command started outlive the task.

    python -P -m services.executor.tasks.supervisor --status-fd N --parent PID -- ARGV...

A process group is not enough: a child that calls setsid leaves the group, and
one that double-forks is reparented to init, out of reach. This process makes
itself a child subreaper (prctl PR_SET_CHILD_SUBREAPER), so an orphan anywhere
below it is reparented to it instead of to init: everything the command started
and is still running is then a descendant of this process, found by walking
parent pids in /proc, and every one of them is reaped here.

It runs the command in a session of its own (so a command's `kill 0` cannot hit
it), relays nothing (the command writes straight to the task's pipes) and
reports on fd N, one JSON object per line:

    {"event": "started", "pid": P}
    {"event": "spawn_failed", "error": "..."}
    {"event": "exited", "code": C}            the command itself; C < 0: killed by signal -C
    {"event": "killed", "line": "..."}        what it had to stop, for the task's log

Once the command exits, processes it left get LEFTOVER_GRACE_S to end by
themselves, then SIGTERM and, KILL_GRACE_S later, SIGKILL. SIGTERM to this
process (the runner's cancel or timeout, or the executor dying: PR_SET_PDEATHSIG)
does the same at once to the command and everything below it. fd N closes when
this process exits, which is after every descendant is dead and reaped.

Standard library only, and Linux only (/proc, prctl): it starts once per task.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

#: After the command exits, how long what it left running may take to end by itself.
LEFTOVER_GRACE_S = 1.0
#: Between SIGTERM and SIGKILL.
KILL_GRACE_S = 2.0
#: How long SIGKILL rounds go on while processes keep appearing (a fork loop).
KILL_ROUNDS_S = 3.0
#: How often the process tree is re-read while waiting for it to empty.
POLL_S = 0.05
#: Longest command line quoted in a log line, and how many processes one names.
CMDLINE_CHARS = 120
NAMED_PROCESSES = 20

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
#: Blocked and taken with sigtimedwait: no handler runs between two syscalls.
_WATCHED = _STOP_SIGNALS | {signal.SIGCHLD}


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def descendants(root: int) -> list[int]:
    """Live (not zombie) processes below `root`, parents before their children."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as stat:
                # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
                state, ppid = stat.read().rsplit(")", 1)[1].split()[:2]
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if state != "Z":
            children.setdefault(int(ppid), []).append(int(name))
    found: list[int] = []
    frontier = [root]
    while frontier:
        below = [pid for parent in frontier for pid in children.get(parent, [])]
        found.extend(below)
        frontier = below
    return found


def describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            text = cmdline.read().rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        text = "?"
    if len(text) > CMDLINE_CHARS:
        text = text[: CMDLINE_CHARS - 3] + "..."
    return f"{pid} ({text})"


class Status:
    """The report channel to the runner; a runner that went away is not an error."""

    def __init__(self, fd: int) -> None:
        # The command must not inherit it: its end means this process ended.
        os.set_inheritable(fd, False)
        self.fd = fd

    def send(self, event: str, **fields: Any) -> None:
        data = (json.dumps({"event": event, **fields}) + "\n").encode()
        with contextlib.suppress(OSError):
            os.write(self.fd, data)


#: What a command inherits from the executor's environment. Nothing else: the
#: executor's own settings carry its service token, database URLs and Redis
#: password, and a command a model asked for must not be able to call the
#: internal services or the stores as the executor.
_INHERITED = frozenset({"PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "TZ", "TMPDIR", "TERM"})


def command_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment a command runs with: the allowed variables and the locale."""
    return {
        key: value for key, value in environ.items() if key in _INHERITED or key.startswith("LC_")
    }


class Supervisor:
    def __init__(self, status: Status) -> None:
        self.status = status
        self.me = os.getpid()
        self.pid = 0
        #: The command's exit code once reaped (negative: the signal that killed it).
        self.code: int | None = None
        self.stop_requested = False

    def run(self, argv: Sequence[str]) -> None:
        try:
            self.pid = os.posix_spawnp(
                argv[0],
                list(argv),
                command_environment(os.environ),
                setsid=True,
                setsigmask=(),
                # Python ignores these; an ignored disposition would survive exec.
                setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
            )
        except OSError as exc:
            self.status.send("spawn_failed", error=str(exc))
            return
        self.status.send("started", pid=self.pid)
        while self.code is None and not self.stop_requested:
            self._pause(1.0)
        if self.code is not None:
            self.status.send("exited", code=self.code)
            self._let_leftovers_end()
        else:
            self._stop_all("stopped on request:")
            self._reap_rest()
            # None only if SIGKILL could not end it within KILL_ROUNDS_S.
            self.status.send("exited", code=self.code)
        self._reap_rest()

    def _let_leftovers_end(self) -> None:
        deadline = time.monotonic() + LEFTOVER_GRACE_S
        while descendants(self.me) and not self.stop_requested:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._pause(min(POLL_S, remaining))
        if descendants(self.me):
            self._stop_all("the command exited; stopped what it left running:")

    def _stop_all(self, what: str) -> None:
        """SIGTERM to every descendant, KILL_GRACE_S, then SIGKILL until none is left."""
        stopped = descendants(self.me)
        names = [describe(pid) for pid in stopped[:NAMED_PROCESSES]]
        _signal(stopped, signal.SIGTERM)
        # A stopped process acts on SIGTERM only once continued.
        _signal(stopped, signal.SIGCONT)
        deadline = time.monotonic() + KILL_GRACE_S
        while descendants(self.me) and time.monotonic() < deadline:
            self._pause(POLL_S)
        forced: list[int] = []
        deadline = time.monotonic() + KILL_ROUNDS_S
        while (left := descendants(self.me)) and time.monotonic() < deadline:
            forced.extend(pid for pid in left if pid not in forced)
            _signal(left, signal.SIGKILL)
            self._pause(POLL_S / 5)
        line = f"{what} {_listing(names, len(stopped))}{_forced(forced)}"
        self.status.send("killed", line=line)

    def _pause(self, timeout: float) -> None:
        """Wait up to `timeout` for a signal; reap whatever has exited."""
        info = signal.sigtimedwait(_WATCHED, timeout)
        if info is not None and info.si_signo in _STOP_SIGNALS:
            self.stop_requested = True
        self._reap()

    def _reap(self) -> bool:
        """Reap every child that has exited; whether any child is left."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return False
            if pid == 0:
                return True
            if pid == self.pid:
                self.code = os.waitstatus_to_exitcode(status)

    def _reap_rest(self) -> None:
        """Reap the zombies reparented here last; none may be left to init."""
        deadline = time.monotonic() + KILL_GRACE_S
        while self._reap() and time.monotonic() < deadline:
            signal.sigtimedwait({signal.SIGCHLD}, POLL_S)


def _listing(names: list[str], total: int) -> str:
    more = f" and {total - len(names)} more" if total > len(names) else ""
    return ", ".join(names) + more


def _forced(pids: list[int]) -> str:
    if not pids:
        return ""
    listed = ", ".join(map(str, pids[:NAMED_PROCESSES]))
    more = " and more" if len(pids) > NAMED_PROCESSES else ""
    return f" (SIGKILL needed for {listed}{more})"


def _signal(pids: Iterable[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def main(args: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="supervisor")
    parser.add_argument("--status-fd", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("argv", nargs="+")
    options = parser.parse_args(args)
    status = Status(options.status_fd)
    signal.pthread_sigmask(signal.SIG_BLOCK, _WATCHED)
    try:
        # The executor dying must stop the command too: SIGTERM, taken as a cancel.
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    except (OSError, AttributeError) as exc:
        status.send("spawn_failed", error=f"cannot supervise the command (prctl): {exc}")
        return 1
    if os.getppid() != options.parent:
        return 1  # the executor died before PR_SET_PDEATHSIG was set: nothing to run for
    Supervisor(status).run(options.argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
