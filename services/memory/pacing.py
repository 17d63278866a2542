"""Background jobs give way to turns: while turns run, each step is followed by a rest.

Consolidation and extraction are never urgent, and every step of theirs (the
session read, the model call, the store write) costs CPU in the session
service, llm_proxy and memory, and time on the model server: what a user's
turn needs. Like PostgreSQL's autovacuum cost delay, a job rests after each
step for `(1 / duty_cycle - 1)` times as long as the step took (at 0.1, nine
times as long), so its work is spread thin rather than done in bursts. Steps
slow down when the system is busy, so the rests grow with the load. With no
turn for a while (no Recall served here for `quiet_after_s`) nothing is waiting
and jobs do not rest.

A resting job holds its session's lease, so one rest is at most `max_rest_s`: a
compaction of the same session (a turn waits for it) is never held up long.
Compaction has workers of its own and never rests. Rests do not count towards
the job's timeout (`work_timeout`): that is there to catch hung work.

Time is read from an injected monotonic clock and rests taken through an
injected sleep, so the arithmetic can be tested without waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field

#: The running job's timeout, which its rests push back.
_TIMEOUT: ContextVar[asyncio.Timeout | None] = ContextVar("memory_job_timeout", default=None)


#: A monotonic clock in seconds, like `time.monotonic`.
Clock = Callable[[], float]


@contextlib.asynccontextmanager
async def work_timeout(seconds: float) -> AsyncIterator[asyncio.Timeout]:
    """`asyncio.timeout(seconds)` over a job's work: its rests are not counted."""
    async with asyncio.timeout(seconds) as timeout:
        token = _TIMEOUT.set(timeout)
        try:
            yield timeout
        finally:
            _TIMEOUT.reset(token)


class TurnActivity:
    """When this replica last served a turn (its Recall)."""

    def __init__(self, quiet_after_s: float = 5.0, clock: Clock = time.monotonic) -> None:
        self.quiet_after_s = quiet_after_s
        self._clock = clock
        self._last = float("-inf")

    def seen(self) -> None:
        self._last = self._clock()

    def busy(self) -> bool:
        return self._clock() - self._last < self.quiet_after_s


@dataclass(frozen=True)
class Pacer:
    #: Share of a job's time spent working while turns run, in (0, 1]; 1 never rests.
    duty_cycle: float = 1.0
    #: Longest single rest (the job holds its session's lease meanwhile).
    max_rest_s: float = 1.0
    #: Whether turns are running now; without one, always.
    busy: Callable[[], bool] = field(default=lambda: True, compare=False)
    sleep: Callable[[float], Awaitable[None]] = field(default=asyncio.sleep, compare=False)
    clock: Clock = field(default=time.monotonic, compare=False)

    def begin(self) -> PacedJob:
        """Start timing one job's first step."""
        return PacedJob(self)


class PacedJob:
    def __init__(self, pacer: Pacer) -> None:
        self._pacer = pacer
        self._since = pacer.clock()

    async def rest(self) -> None:
        """Rest for the work done since the job began or last rested, if turns run."""
        pacer = self._pacer
        if pacer.duty_cycle < 1 and pacer.busy():
            worked = pacer.clock() - self._since
            pause = min(worked * (1 / pacer.duty_cycle - 1), pacer.max_rest_s)
            timeout = _TIMEOUT.get()
            if timeout is not None and (deadline := timeout.when()) is not None:
                timeout.reschedule(deadline + pause)
            await pacer.sleep(pause)
        self._since = pacer.clock()
