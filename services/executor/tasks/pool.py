"""The task pool: a bounded queue in front of a fixed number of workers.

Each worker takes the oldest queued task, runs it on its runner in a child
asyncio task (so one task can be cancelled without touching the worker), and
records the outcome. The worker is the only writer of a running task's record;
cancel() and stop() ask it to finish a task a certain way and wait for it.
Every transition is persisted before its event is published, so a restart
finds each task where the last executor left it.

Executor replicas may share one store. Each task names its owner, the replica
that queued or runs it, and each replica heartbeats into the store. Every write
two replicas might race on is conditional on the task's stored status and owner
(`TaskStore.update_if`), so exactly one wins: a task is claimed to run once, and
a replica writes another's task only after taking it over. A replica that stops
heartbeating is dead: a live one fails the tasks it was running and runs the ones
it had queued. A cancel that reaches a replica which does not run the task is
recorded on the task; the owner's heartbeat loop sees it and cancels the run.
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
from threadline.cancellation import cancel_and_wait
from threadline.errors import NotFound, ResourceExhausted, Unavailable
from threadline.events import EventPublisher
from threadline.logs import get_logger

log = get_logger(__name__)

#: How long cancel() waits for a running task's runner to clean up and stop.
CANCEL_WAIT_S = 10.0
#: A watcher re-reads the store at least this often, for tasks another executor runs.
WATCH_POLL_S = 1.0
CANCELLED_BY_REQUEST = "cancelled by request"
#: Its cause, as events name it.
CANCEL_REQUESTED = "cancel_requested"


@dataclass(frozen=True)
class ReplicaTimings:
    """How replicas sharing a store keep track of each other (tests shorten them)."""

    #: How often a replica says it is alive and reads cancel requests for its tasks.
    heartbeat_s: float = 1.0
    #: A replica not heard from for this long is dead: its tasks are taken over.
    dead_after_s: float = 15.0
    #: How often a replica looks for tasks of dead replicas.
    sweep_s: float = 5.0
    #: How often a cancel waiting for another replica re-reads the task.
    cancel_poll_s: float = 0.2


@dataclass
class _Running:
    task: TaskRecord
    run: asyncio.Task[RunOutcome] | None = None
    #: Set by cancel() or stop(): how the worker must end the task (status, reason, cause).
    end_as: tuple[TaskStatus, str, str] | None = None
    #: Another replica took the task over: this one must not write its record again.
    taken: bool = False
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
        timings: ReplicaTimings = ReplicaTimings(),
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        self._store = store
        self._runners = dict(runners)
        self._events = events
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self._prices = dict(prices)
        self._timings = timings
        #: This replica's name among those sharing the store; set by start().
        self.replica = ""
        self._queued: collections.OrderedDict[str, TaskRecord] = collections.OrderedDict()
        self._reserved = 0
        self._running: dict[str, _Running] = {}
        self._wakeup = asyncio.Condition()
        self._workers: list[asyncio.Task[None]] = []
        self._loops: list[asyncio.Task[None]] = []
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

    async def start(self, replica: str) -> None:
        """Recover what this replica's last process left, then start the workers.

        `replica` names this executor among those sharing the store: the same after
        a restart, different from every other replica. Other replicas' tasks are left
        to them while they heartbeat, and taken over by the sweep when they stop.
        """
        if self._started:
            raise RuntimeError("task pool already started")
        self._started = True
        self.replica = replica
        # First: a replica's tasks never exist in the store before its heartbeat does.
        await self._store.heartbeat(replica, self._timings.dead_after_s)
        for task in await self._store.by_status("running"):
            if task.owner == replica:
                # Its runner died with the last process; nothing can resume it here.
                await self._finish(task, "failed", "executor restarted", "executor_restarted")
        recovered = [t for t in await self._store.by_status("queued") if t.owner == replica]
        for task in recovered:
            self._queued[task.id] = task
        self._workers = [
            asyncio.create_task(self._work(), name=f"task-worker-{i}")
            for i in range(self.max_concurrency)
        ]
        self._loops = [
            asyncio.create_task(self._heartbeats(), name="task-heartbeats"),
            asyncio.create_task(self._sweeps(), name="task-sweeps"),
        ]
        log.info(
            "task_pool.started",
            replica=replica,
            workers=self.max_concurrency,
            requeued=len(recovered),
        )

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
                entry.end_as = ("failed", "executor stopped", "executor_stopped")
            if entry.run is not None:
                entry.run.cancel()
        # Each worker records its task's end, then exits.
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        # Heartbeats went on through the grace period: a cancel from another replica
        # still reached the runs, and no replica took them for dead.
        await asyncio.gather(*(cancel_and_wait(loop) for loop in self._loops))
        if self._started:
            await self._sign_off()
        self._stopped.set()
        log.info("task_pool.stopped", left_queued=len(self._queued))

    async def _sign_off(self) -> None:
        """Tell the other replicas this one is gone: one takes its queued tasks now,
        not once its heartbeat expires."""
        try:
            await self._store.heartbeat(self.replica, 0)
        except Exception:
            log.warning("task_pool.sign_off_failed", replica=self.replica, exc_info=True)

    # -- API ------------------------------------------------------------------------

    async def submit(self, task: TaskRecord) -> TaskRecord:
        if not self._started or self._stopping:
            raise Unavailable("task pool is not running")
        if len(self._queued) + self._reserved >= self.max_queue:
            raise ResourceExhausted(
                f"task queue is full ({self.max_queue} queued)",
                retry_after_s=1.0,
                details={"max_queue": str(self.max_queue)},
            )
        task.status = "queued"
        task.owner = self.replica
        # Held across the store write, so concurrent submits cannot overfill the queue.
        self._reserved += 1
        try:
            await self._store.create(task)
        finally:
            self._reserved -= 1
        self._emit("task.queued", task)
        await self._enqueue(task)
        return task

    async def cancel(self, tenant: str, task_id: str) -> TaskRecord:
        """Cancel the task wherever it is; the record, terminal if it ended in time."""
        stored = await self._store.get(tenant, task_id)
        if stored.terminal:
            return stored
        entry = self._running.get(task_id)
        if entry is not None:
            await self._cancel_here(entry)
            return await self._store.get(tenant, task_id)
        queued = self._queued.pop(task_id, None)
        if queued is not None and await self._finish(
            queued, "cancelled", CANCELLED_BY_REQUEST, CANCEL_REQUESTED
        ):
            return queued
        return await self._cancel_elsewhere(tenant, task_id)

    async def _cancel_here(self, entry: _Running) -> None:
        """Cancel a run of this replica and wait for its worker to record the end."""
        if entry.end_as is None:
            entry.end_as = ("cancelled", CANCELLED_BY_REQUEST, CANCEL_REQUESTED)
        if entry.run is not None:
            entry.run.cancel()
        # asyncio.timeout, not wait_for, which can swallow a cancellation in Python 3.11.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CANCEL_WAIT_S):
                await entry.done.wait()

    async def _cancel_elsewhere(self, tenant: str, task_id: str) -> TaskRecord:
        """Cancel a task another replica owns: take it over while it is still queued,
        or ask its owner to stop the run; poll until it ends, up to CANCEL_WAIT_S."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CANCEL_WAIT_S):
                while True:
                    task = await self._store.get(tenant, task_id)
                    if task.terminal:
                        return task
                    if task.status == "queued":
                        if await self._take_over(task) and await self._finish(
                            task, "cancelled", CANCELLED_BY_REQUEST, CANCEL_REQUESTED
                        ):
                            return task
                    elif task.cancel_requested_at is None:
                        task.cancel_requested_at = time.time()
                        # Lost only to the task's end or a takeover: the next read says which.
                        await self._store.update_if(task, if_status="running", if_owner=task.owner)
                    await asyncio.sleep(self._timings.cancel_poll_s)
        return await self._store.get(tenant, task_id)

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

    # -- replicas -----------------------------------------------------------------

    async def _enqueue(self, task: TaskRecord) -> None:
        async with self._wakeup:
            self._queued[task.id] = task
            self._wakeup.notify()

    async def _take_over(self, task: TaskRecord) -> bool:
        """Make this replica the task's owner, unless another changed it first."""
        previous, task.owner = task.owner, self.replica
        if await self._store.update_if(task, if_status=task.status, if_owner=previous):
            return True
        task.owner = previous
        return False

    async def _heartbeats(self) -> None:
        """Say this replica is alive; end the runs it was asked to cancel or lost."""
        while True:
            try:
                await self._store.heartbeat(self.replica, self._timings.dead_after_s)
                await self._check_running()
            except Exception:
                # The store is away: other replicas take over once dead_after_s passes.
                log.warning("task_pool.heartbeat_failed", replica=self.replica, exc_info=True)
            await asyncio.sleep(self._timings.heartbeat_s)

    async def _check_running(self) -> None:
        for entry in list(self._running.values()):
            if entry.run is None or entry.run.done() or entry.end_as is not None:
                continue
            try:
                stored = await self._store.get(entry.task.tenant, entry.task.id)
            except NotFound:
                # Failed by a replica that thought this one dead, then deleted: the
                # run has no record to write to any more.
                log.warning("task_pool.task_deleted", task_id=entry.task.id)
                entry.taken = True
                entry.run.cancel()
                continue
            if stored.owner != self.replica:
                # Failed by a replica that thought this one dead: the record is theirs now.
                log.warning("task_pool.task_taken", task_id=stored.id, by=stored.owner)
                entry.taken = True
                entry.run.cancel()
            elif stored.cancel_requested_at is not None:
                log.info("task_pool.cancel_requested", task_id=stored.id)
                entry.end_as = ("cancelled", CANCELLED_BY_REQUEST, CANCEL_REQUESTED)
                entry.run.cancel()

    async def _sweeps(self) -> None:
        while True:
            try:
                await self._sweep()
            except Exception:
                log.warning("task_pool.sweep_failed", replica=self.replica, exc_info=True)
            await asyncio.sleep(self._timings.sweep_s)

    async def _sweep(self) -> None:
        """Take over the tasks dead replicas queued; fail the ones they were running."""
        # Never itself: a slow heartbeat write must not make a replica fail its own runs.
        live = await self._store.live_replicas() | {self.replica}
        # Queued first: a replica cut off from the store but still working finds its
        # queued tasks gone before its runs are failed and free its workers.
        for task in await self._store.by_status("queued"):
            dead = task.owner
            if dead not in live and not self._stopping and await self._take_over(task):
                log.info("task_pool.task_taken_over", replica=dead, task_id=task.id)
                await self._enqueue(task)
        for task in await self._store.by_status("running"):
            dead = task.owner
            if dead not in live and await self._take_over(task):
                log.warning("task_pool.replica_dead", replica=dead, task_id=task.id)
                name = f" {dead}" if dead else ""
                reason = f"its executor replica{name} stopped"
                await self._finish(task, "failed", reason, "replica_stopped")

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
            await self._finish(task, "failed", f"unknown runner {task.runner!r}", "unknown_runner")
            return
        if not await self._claim(task):
            return

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
            if not entry.taken:
                await self._finish(task, "failed", "executor stopped", "executor_stopped")
            raise
        if not entry.taken:
            await self._record_end(entry, entry.run)

    async def _claim(self, task: TaskRecord) -> bool:
        """Move the task from queued to running, unless another replica cancelled it or
        took it over first: then it is theirs, and this replica drops it."""
        task.status = "running"
        task.started_at = time.time()
        if not await self._store.update_if(task, if_status="queued", if_owner=self.replica):
            log.info("task_pool.claim_lost", task_id=task.id)
            return False
        self._emit("task.started", task)
        self._notify(task.id)
        return True

    async def _record_end(self, entry: _Running, run: asyncio.Task[RunOutcome]) -> None:
        task = entry.task
        if entry.end_as is not None:
            status, reason, cause = entry.end_as
            if not run.cancelled() and run.exception() is None:
                self._record_usage(task, run.result())
            await self._finish(task, status, reason, cause)
        elif run.cancelled():
            await self._finish(task, "failed", "runner cancelled", "runner_cancelled")
        elif (exc := run.exception()) is not None:
            log.warning("task.runner_error", task_id=task.id, error=repr(exc))
            await self._finish(task, "failed", str(exc) or type(exc).__name__, "runner_error")
        else:
            outcome = run.result()
            self._record_usage(task, outcome)
            await self._finish(task, outcome.status, outcome.reason, outcome.cause)

    def _record_usage(self, task: TaskRecord, outcome: RunOutcome) -> None:
        task.model = outcome.model or task.model
        task.tokens_in = outcome.tokens_in
        task.tokens_out = outcome.tokens_out
        task.exit_code = outcome.exit_code
        price_in, price_out = self._prices.get(task.model, (0.0, 0.0))
        task.cost = task.tokens_in / 1000 * price_in + task.tokens_out / 1000 * price_out

    async def _finish(
        self, task: TaskRecord, status: TaskStatus, reason: str, cause: str = ""
    ) -> bool:
        """Record the task's end, if the store still holds it as this replica last wrote
        it; False, with nothing published, if another replica got there first. The
        event carries `cause`, the rule's name, never `reason`: that may quote the
        model or the command's output, and stays in the record and the log."""
        was = task.status
        task.status = status
        task.reason = reason
        task.finished_at = time.time()
        # The result line goes first: a watcher that sees the terminal status has it.
        await self._store.append_log(
            task.id, {"type": "result", "status": status, "reason": reason}
        )
        if not await self._store.update_if(task, if_status=was, if_owner=task.owner):
            log.warning("task_pool.finish_lost", task_id=task.id, status=status)
            return False
        self._emit(
            f"task.{status}",
            task,
            status=status,
            cause=cause or None,
            tokens_in=task.tokens_in,
            tokens_out=task.tokens_out,
            cost=task.cost,
            duration_s=task.duration_s,
        )
        self._notify(task.id)
        return True

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
