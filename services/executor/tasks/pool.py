"""The task pool: a bounded queue in front of a fixed number of workers.

Each worker takes the oldest queued task, runs it on its runner in a child
asyncio task (so one task can be cancelled without touching the worker), and
records the outcome. The worker is the only writer of a running task's record;
cancel() and stop() ask it to finish a task a certain way and wait for it.
Every transition is persisted before its event is published, so a restart
finds each task where the last executor left it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from services.executor.tasks.records import TERMINAL, Runner, RunOutcome, TaskRecord, TaskStatus
from services.executor.tasks.store import TaskStore
from threadline.errors import ResourceExhausted, Unavailable
from threadline.events import EventPublisher
from threadline.logs import get_logger

log = get_logger(__name__)

#: How long cancel() waits for a running task's runner to clean up and stop.
CANCEL_WAIT_S = 10.0
#: A watcher re-reads the store at least this often, for tasks another executor runs.
WATCH_POLL_S = 1.0


@dataclass
class _Running:
    task: TaskRecord
    run: asyncio.Task[RunOutcome] | None = None
    #: Set by cancel() or stop(): how the worker must end the task.
    end_as: tuple[TaskStatus, str] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


class TaskPool:
    def __init__(
        self,
        store: TaskStore,
        runners: Mapping[str, Runner],
        events: EventPublisher,
        *,
        max_concurrency: int = 2,
        max_queue: int = 100,
        prices: Mapping[str, tuple[float, float]] = {},
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        self._store = store
        self._runners = dict(runners)
        self._events = events
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self._prices = dict(prices)
        self._queued: collections.OrderedDict[str, TaskRecord] = collections.OrderedDict()
        self._reserved = 0
        self._running: dict[str, _Running] = {}
        self._wakeup = asyncio.Condition()
        self._workers: list[asyncio.Task[None]] = []
        self._started = False
        self._stopping = False
        self._stopped = asyncio.Event()
        # Set (and dropped) whenever a task's log or status changes; watchers wait on it.
        self._signals: dict[str, asyncio.Event] = {}

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def queued(self) -> int:
        return len(self._queued)

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Recover what the last executor left, then start the workers."""
        if self._started:
            raise RuntimeError("task pool already started")
        self._started = True
        for task in await self._store.by_status("running"):
            # Its runner died with the last process; nothing can resume it here.
            await self._finish(task, "failed", "executor restarted")
        recovered = await self._store.by_status("queued")
        for task in recovered:
            self._queued[task.id] = task
        self._workers = [
            asyncio.create_task(self._work(), name=f"task-worker-{i}")
            for i in range(self.max_concurrency)
        ]
        log.info("task_pool.started", workers=self.max_concurrency, requeued=len(recovered))

    async def stop(self, grace_s: float = 5) -> None:
        """Stop taking work; give running tasks grace_s, then cancel them as failed."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        async with self._wakeup:
            self._wakeup.notify_all()
        runs = [entry.run for entry in self._running.values() if entry.run is not None]
        if runs:
            log.info("task_pool.draining", running=len(runs), grace_s=grace_s)
            await asyncio.wait(runs, timeout=grace_s)
        for entry in self._running.values():
            if entry.end_as is None:
                entry.end_as = ("failed", "executor stopped")
            if entry.run is not None:
                entry.run.cancel()
        # Each worker records its task's end, then exits.
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        self._stopped.set()
        log.info("task_pool.stopped", left_queued=len(self._queued))

    # -- API ------------------------------------------------------------------------

    async def submit(self, task: TaskRecord) -> TaskRecord:
        if self._stopping:
            raise Unavailable("task pool is stopping")
        if len(self._queued) + self._reserved >= self.max_queue:
            raise ResourceExhausted(
                f"task queue is full ({self.max_queue} queued)",
                retry_after_s=1.0,
                details={"max_queue": str(self.max_queue)},
            )
        task.status = "queued"
        # Held across the store write, so concurrent submits cannot overfill the queue.
        self._reserved += 1
        try:
            await self._store.create(task)
        finally:
            self._reserved -= 1
        self._emit("task.queued", task)
        async with self._wakeup:
            self._queued[task.id] = task
            self._wakeup.notify()
        return task

    async def cancel(self, tenant: str, task_id: str) -> TaskRecord:
        stored = await self._store.get(tenant, task_id)
        if stored.status in TERMINAL:
            return stored
        queued = self._queued.pop(task_id, None)
        if queued is not None:
            await self._finish(queued, "cancelled", "cancelled by request")
            return queued
        entry = self._running.get(task_id)
        if entry is None:
            if stored.status == "queued":
                # Stored but not (yet) in this pool's queue: not started anywhere here.
                await self._finish(stored, "cancelled", "cancelled by request")
            # Running on another executor: that one owns it.
            return stored
        if entry.end_as is None:
            entry.end_as = ("cancelled", "cancelled by request")
        if entry.run is not None:
            entry.run.cancel()
        # asyncio.timeout, not wait_for, which can swallow a cancellation in Python 3.11.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CANCEL_WAIT_S):
                await entry.done.wait()
        return entry.task

    async def watch(self, tenant: str, task_id: str) -> AsyncIterator[tuple[int, str]]:
        """The task's log from the start, then live lines; ends once it is terminal."""
        await self._store.get(tenant, task_id)
        after = -1
        while True:
            # Taken before reading, so a change made after the read wakes us.
            signal = self._signals.setdefault(task_id, asyncio.Event())
            lines = await self._store.read_log(task_id, after)
            for seq, line in lines:
                yield seq, line
                after = seq
            if lines:
                continue
            if (await self._store.get(tenant, task_id)).status in TERMINAL:
                # The result line is written before the terminal status: drain it.
                for seq, line in await self._store.read_log(task_id, after):
                    yield seq, line
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(WATCH_POLL_S):
                    await signal.wait()

    # -- workers ------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            entry = await self._next()
            if entry is None:
                return
            try:
                await self._execute(entry)
            except Exception:
                # The store or the bus failed mid-task; this worker carries on.
                log.exception("task_pool.worker_error", task_id=entry.task.id)
            finally:
                self._running.pop(entry.task.id, None)
                entry.done.set()

    async def _next(self) -> _Running | None:
        async with self._wakeup:
            await self._wakeup.wait_for(lambda: self._stopping or bool(self._queued))
            if self._stopping:
                return None
            _, task = self._queued.popitem(last=False)
            # Registered before the first await, so cancel() always finds it somewhere.
            entry = _Running(task)
            self._running[task.id] = entry
            return entry

    async def _execute(self, entry: _Running) -> None:
        task = entry.task
        runner = self._runners.get(task.runner)
        if runner is None:
            await self._finish(task, "failed", f"unknown runner {task.runner!r}")
            return
        task.status = "running"
        task.started_at = time.time()
        await self._store.update(task)
        self._emit("task.started", task)
        self._notify(task.id)

        async def write(line: dict[str, Any]) -> None:
            await self._store.append_log(task.id, line)
            self._notify(task.id)

        entry.run = asyncio.create_task(runner.run(task, write), name=f"task-run-{task.id}")
        if entry.end_as is not None:
            entry.run.cancel()
        try:
            # asyncio.wait, not await: the run's cancellation must not look like ours.
            await asyncio.wait([entry.run])
        except asyncio.CancelledError:
            entry.run.cancel()
            await asyncio.wait([entry.run])
            await self._finish(task, "failed", "executor stopped")
            raise
        run = entry.run
        if entry.end_as is not None:
            status, reason = entry.end_as
            if not run.cancelled() and run.exception() is None:
                self._record_usage(task, run.result())
            await self._finish(task, status, reason)
        elif run.cancelled():
            await self._finish(task, "failed", "runner cancelled")
        elif (exc := run.exception()) is not None:
            log.warning("task.runner_error", task_id=task.id, error=repr(exc))
            await self._finish(task, "failed", str(exc) or type(exc).__name__)
        else:
            outcome = run.result()
            self._record_usage(task, outcome)
            await self._finish(task, outcome.status, outcome.reason)

    def _record_usage(self, task: TaskRecord, outcome: RunOutcome) -> None:
        task.model = outcome.model or task.model
        task.tokens_in = outcome.tokens_in
        task.tokens_out = outcome.tokens_out
        task.exit_code = outcome.exit_code
        price_in, price_out = self._prices.get(task.model, (0.0, 0.0))
        task.cost = task.tokens_in / 1000 * price_in + task.tokens_out / 1000 * price_out

    async def _finish(self, task: TaskRecord, status: TaskStatus, reason: str) -> None:
        task.status = status
        task.reason = reason
        task.finished_at = time.time()
        # The result line goes first: a watcher that sees the terminal status has it.
        await self._store.append_log(
            task.id, {"type": "result", "status": status, "reason": reason}
        )
        await self._store.update(task)
        self._emit(
            f"task.{status}",
            task,
            status=status,
            reason=reason,
            tokens_in=task.tokens_in,
            tokens_out=task.tokens_out,
            cost=task.cost,
            duration_s=task.duration_s,
        )
        self._notify(task.id)

    def _emit(self, type_: str, task: TaskRecord, **attributes: Any) -> None:
        self._events.emit(
            type_,
            tenant=task.tenant,
            task_id=task.id,
            agent_type=task.agent_type,
            runner=task.runner,
            **attributes,
        )

    def _notify(self, task_id: str) -> None:
        signal = self._signals.pop(task_id, None)
        if signal is not None:
            signal.set()
