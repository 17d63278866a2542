"""Memory jobs: queued, run one session at a time across replicas, recorded, announced.

A job is a record in the memory store plus an id on the job queue. A worker
takes the next id, takes the session's lease (waiting while another replica
works the session), and runs the job under a timeout. A job is idempotent by
(kind, session, head): if one of its kind already succeeded on the session's
current head, a redelivered or duplicate job takes that result instead of
calling the model again. Whatever happens, the record is finished, the event
published and the delivery acknowledged; a failing job never stops a worker,
and the idle scan survives a failing session.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

from google.protobuf.timestamp_pb2 import Timestamp

from services.memory import triggers
from services.memory.compaction import Compactor, is_refusal
from services.memory.consolidation import Consolidator, JobResult
from services.memory.extraction import Extractor
from services.memory.pacing import work_timeout
from services.memory.queue import Delivery, JobQueue, QueueClosed
from services.memory.sessions import SessionReader
from services.memory.store import Activity, MemoryStore, now_us
from threadline import errors
from threadline.cancellation import cancel_and_wait
from threadline.events import EventPublisher
from threadline.leases import HeldLease, Leases
from threadline.logs import get_logger
from threadline.telemetry import metrics, tracing
from threadline.v1 import memory_pb2

log = get_logger(__name__)

JobKind = Literal["consolidate", "extract", "compact"]
KINDS: tuple[JobKind, ...] = ("consolidate", "extract", "compact")

#: Event type prefix per kind: <prefix>.started/done/failed (compaction: compact.start).
_EVENTS: dict[str, tuple[str, str, str]] = {
    "consolidate": (
        "memory.consolidation.started",
        "memory.consolidation.done",
        "memory.consolidation.failed",
    ),
    "extract": (
        "memory.extraction.started",
        "memory.extraction.done",
        "memory.extraction.failed",
    ),
    "compact": ("compact.start", "compact.done", "compact.failed"),
}
_FINISHED = (memory_pb2.JOB_STATE_SUCCEEDED, memory_pb2.JOB_STATE_FAILED)
#: How often a waiting caller looks for a job another replica finishes: first, at most.
_WAIT_POLL_FIRST_S = 0.2
_WAIT_POLL_MAX_S = 2.0


@dataclass(frozen=True)
class JobSettings:
    thresholds: triggers.Thresholds
    idle_consolidate_s: float
    job_timeout_s: float
    workers: int
    compaction_workers: int
    scan_interval_s: float
    lease_ttl_s: float
    claim_idle_s: float
    #: Turns do not start a kind again for this long after its job failed.
    failed_job_pause_s: float = 0.0

    @property
    def queued_patience_s(self) -> float:
        """How long a job may stay queued before its waiter gives up: by then a dead
        replica's job was taken over and a lost one queued again, if any replica lives."""
        return self.claim_idle_s + self.scan_interval_s


def _timestamp(us: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromMicroseconds(us)
    return stamp


@dataclass
class MemoryJobs:
    store: MemoryStore
    sessions: SessionReader
    #: Consolidation and extraction; compaction has a queue (and workers) of its own
    #: so that a turn waiting for one never queues behind background work.
    queue: JobQueue
    compactions: JobQueue
    leases: Leases
    events: EventPublisher
    consolidator: Consolidator
    extractor: Extractor
    compactor: Compactor
    settings: JobSettings
    #: This replica's name, on the jobs it runs and their events.
    worker: str
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _finished: dict[str, asyncio.Event] = field(default_factory=dict)
    _stopping: bool = False

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        # An in-process queue forgot everything with the last process; a Redis one
        # forgets with a Redis restart: the store's unfinished jobs are the truth.
        await self.requeue_unfinished()
        for queue in {id(q): q for q in (self.queue, self.compactions)}.values():
            queue.when_reset(self.requeue_unfinished)
        for index in range(self.settings.workers):
            work = self._work(self.queue)
            self._tasks.append(asyncio.create_task(work, name=f"memory-worker-{index}"))
        for index in range(self.settings.compaction_workers):
            work = self._work(self.compactions)
            self._tasks.append(asyncio.create_task(work, name=f"memory-compactor-{index}"))
        self._tasks.append(asyncio.create_task(self._scan_forever(), name="memory-idle-scan"))

    async def stop(self) -> None:
        self._stopping = True
        for queue in {id(q): q for q in (self.queue, self.compactions)}.values():
            await queue.close()
        await asyncio.gather(*(cancel_and_wait(task) for task in self._tasks))
        self._tasks.clear()

    # -- submitting --------------------------------------------------------------

    async def submit(
        self, tenant: str, session_id: str, kind: JobKind, trigger: str, model: str = ""
    ) -> memory_pb2.Job:
        """Queue a job, or return the one of this kind already queued or running."""
        active = await self.store.active_job(tenant, session_id, kind)
        if active is not None:
            return active
        if kind == "compact":
            await self.compactor.check(tenant, session_id)
        else:
            await self.sessions.get(tenant, session_id)  # NOT_FOUND now, not in the job
        job = memory_pb2.Job(
            id="job_" + uuid.uuid4().hex,
            kind=kind,
            tenant=tenant,
            session_id=session_id,
            state=memory_pb2.JOB_STATE_QUEUED,
            trigger=trigger,
            created_at=_timestamp(now_us()),
            model=model,
        )
        # Another replica may have submitted since the look above: the store keeps
        # one active job of a kind per session and returns it, which is queued already.
        active = await self.store.put_job_if_none_active(job)
        if active.id != job.id:
            return active
        await self._queue_for(kind).put(job.id)
        metrics.MEMORY_JOBS_QUEUED.labels(kind).inc()
        return job

    async def wait(self, job_id: str, timeout_s: float) -> memory_pb2.Job:
        """The job once finished (another replica may run it); DEADLINE_EXCEEDED after
        timeout, UNAVAILABLE when no replica takes it up within the queued patience."""
        began = time.monotonic()
        deadline = began + timeout_s
        event = self._finished.setdefault(job_id, asyncio.Event())
        # A job finished here sets the event; one finished by another replica is only
        # seen in the store, so look again, less often the longer the job takes (many
        # waiting callers must not turn into a stream of store reads).
        poll_s = _WAIT_POLL_FIRST_S
        try:
            while True:
                job = await self.job(job_id)
                if job is None:
                    # Stored before anyone waits for it: gone means erased with its
                    # session, and a waiter hears what GetJob would answer.
                    raise errors.NotFound(f"memory job {job_id!r} not found")
                if job.state in _FINISHED:
                    return job
                self._check_waited(job_id, job, time.monotonic() - began, deadline)
                remaining = deadline - time.monotonic()
                # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a
                # cancellation that meets its own timeout, and a cancelled waiter that
                # keeps waiting holds the server's shutdown until its deadline.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(remaining, poll_s)):
                        await event.wait()
                poll_s = min(poll_s * 2, _WAIT_POLL_MAX_S)
        finally:
            self._finished.pop(job_id, None)

    def _check_waited(
        self, job_id: str, job: memory_pb2.Job | None, waited_s: float, deadline: float
    ) -> None:
        """Give up on a job that is taking longer than a caller should wait, saying why."""
        queued = job is not None and job.state == memory_pb2.JOB_STATE_QUEUED
        if queued and waited_s > self.settings.queued_patience_s:
            raise errors.Unavailable(
                f"memory job {job_id} has waited {waited_s:.0f} s without a memory replica "
                "taking it: memory is down or overloaded; retry later",
                retry_after_s=self.settings.scan_interval_s,
                details={"job_id": job_id, "reason": "job_not_taken"},
            )
        if time.monotonic() >= deadline:
            raise errors.DeadlineExceeded(
                f"memory job {job_id} is still running after {waited_s:.0f} s; "
                "GetMemoryJob tells when it ends",
                details={"job_id": job_id},
            )

    async def job(self, job_id: str) -> memory_pb2.Job | None:
        return await self.store.job(job_id)

    async def record_activity(
        self, request: memory_pb2.RecordActivityRequest
    ) -> memory_pb2.RecordActivityResponse:
        tenant, session_id = request.tenant, request.session_id
        activity = Activity(
            tenant,
            session_id,
            request.model,
            request.prompt_tokens,
            request.context_window_tokens,
            now_us(),
        )
        await self.store.record_activity(activity)
        response = memory_pb2.RecordActivityResponse(
            compact_due=triggers.compaction_due(self.settings.thresholds, activity)
        )
        thresholds = self.settings.thresholds
        window = request.context_window_tokens
        # A kind whose job is already queued or running is not looked at again: while
        # jobs rest (turns keep coming) the span they have not covered keeps growing,
        # and reading it on every turn made a turn's cost grow with the session.
        due: list[JobKind] = []
        if thresholds.consolidate_fraction > 0 and window > 0:
            due.append("consolidate")
        if thresholds.extract_threshold > 0:
            due.append("extract")
        started: dict[JobKind, memory_pb2.Job] = {}
        resting: list[JobKind] = []
        for kind in due:
            active = await self.store.active_job(tenant, session_id, kind)
            if active is not None:
                started[kind] = active
            elif await self._failed_lately(tenant, session_id, kind):
                resting.append(kind)
        unchecked = [kind for kind in due if kind not in started and kind not in resting]
        if unchecked:
            started |= await self._submit_due(request, unchecked)
        response.started.extend(started[kind] for kind in due if kind in started)
        return response

    async def _failed_lately(self, tenant: str, session_id: str, kind: JobKind) -> bool:
        """Did the session's last job of `kind` fail less than the pause ago?"""
        pause_s = self.settings.failed_job_pause_s
        if not pause_s:
            return False
        last = await self.store.latest_job(tenant, session_id, kind)
        if last is None or last.state != memory_pb2.JOB_STATE_FAILED:
            return False
        return last.finished_at.ToMicroseconds() > now_us() - int(pause_s * 1_000_000)

    async def _submit_due(
        self, request: memory_pb2.RecordActivityRequest, kinds: list[JobKind]
    ) -> dict[JobKind, memory_pb2.Job]:
        """Jobs of `kinds` whose trigger the session's new messages have reached, queued."""
        tenant, session_id = request.tenant, request.session_id
        thresholds = self.settings.thresholds
        started: dict[JobKind, memory_pb2.Job] = {}
        memory = await self.store.get(tenant, session_id)
        offsets = {"consolidate": memory.offset, "extract": memory.extract_offset}
        detail = await self.sessions.get(
            tenant,
            session_id,
            include_messages=True,
            from_seq=min(offsets[kind] for kind in kinds),
        )
        window = request.context_window_tokens
        if "consolidate" in kinds and triggers.consolidation_due(
            thresholds, memory, detail.messages, window
        ):
            started["consolidate"] = await self.submit(tenant, session_id, "consolidate", "tokens")
        if "extract" in kinds and triggers.extraction_due(thresholds, memory, detail.messages):
            started["extract"] = await self.submit(tenant, session_id, "extract", "tokens")
        return started

    async def compact_due(self, tenant: str, session_id: str) -> bool:
        activity = await self.store.activity(tenant, session_id)
        return triggers.compaction_due(self.settings.thresholds, activity)

    # -- the idle scan -----------------------------------------------------------

    async def scan_idle(self) -> list[memory_pb2.Job]:
        """Queue consolidation for sessions idle past idle_consolidate_s with new messages."""
        if self.settings.idle_consolidate_s <= 0:
            return []
        cutoff = now_us() - int(self.settings.idle_consolidate_s * 1_000_000)
        started: list[memory_pb2.Job] = []
        for activity in await self.store.idle_since(cutoff):
            try:
                pending = await self.consolidator.pending(activity.tenant, activity.session_id)
                if pending:
                    started.append(
                        await self.submit(
                            activity.tenant, activity.session_id, "consolidate", "idle"
                        )
                    )
            except errors.NotFound:
                pass  # deleted since: nothing to consolidate, ever
            except Exception:
                # One broken session must not stop the scan of the others.
                log.exception("memory.idle_check_failed", session_id=activity.session_id)
                continue
            await self.store.mark_idle_checked(
                activity.tenant, activity.session_id, activity.last_active
            )
        return started

    async def _scan_forever(self) -> None:
        while not self._stopping:
            try:
                await self.scan_idle()
                await self.requeue_unfinished()
            except Exception:
                log.exception("memory.idle_scan_failed")
            await asyncio.sleep(self.settings.scan_interval_s)

    async def requeue_unfinished(self) -> None:
        """Queue again every unfinished job its queue has lost, so none waits forever."""
        unfinished = await self.store.unfinished_jobs()
        for queue in {id(q): q for q in (self.queue, self.compactions)}.values():
            ids = [job_id for job_id, kind in unfinished if self._queue_for(kind) is queue]
            requeued = await queue.requeue_missing(ids)
            if requeued:
                log.warning("memory.jobs_requeued", count=len(requeued), job_ids=requeued[:20])

    # -- running -----------------------------------------------------------------

    def _queue_for(self, kind: str) -> JobQueue:
        return self.compactions if kind == "compact" else self.queue

    async def _work(self, queue: JobQueue) -> None:
        while not self._stopping:
            try:
                delivery = await queue.get()
            except QueueClosed:
                return
            except Exception:
                log.exception("memory.queue_read_failed")
                await asyncio.sleep(1.0)
                continue
            try:
                await self.handle(delivery)
            except Exception:
                log.exception("memory.job_crashed", job_id=delivery.job_id)

    async def handle(self, delivery: Delivery) -> None:
        job = await self.store.job(delivery.job_id)
        if job is None or job.state in _FINISHED:
            await delivery.ack()
            return
        if delivery.reclaimed:
            log.info("memory.job_taken_over", job_id=job.id, session_id=job.session_id)
        lease = await self._lease(job, delivery.touch)
        if lease is None:
            # Someone else has worked the session all along: queue it behind them.
            await self._queue_for(job.kind).put(job.id)
            await delivery.ack()
            return
        keeper = asyncio.create_task(self._keep(delivery.touch), name=f"touch-{job.id}")
        try:
            # Read again under the lease: a job queued twice (a requeue racing its
            # submit) may have been run by another replica while this one waited.
            job = await self.store.job(job.id) or job
            if job.state not in _FINISHED:
                attributes = {"threadline.job_id": job.id, "threadline.job_kind": job.kind}
                with tracing.new_trace("memory.job", attributes):
                    await self._run(job)
        finally:
            await cancel_and_wait(keeper)
            await lease.release()
        # Not reached when cancelled (shutdown): the job stays unacknowledged, to be
        # taken over by another replica or run again at the next start.
        await delivery.ack()
        event = self._finished.get(job.id)
        if event is not None:
            event.set()

    async def _lease(
        self, job: memory_pb2.Job, touch: Callable[[], Awaitable[None]]
    ) -> HeldLease | None:
        name = f"{job.tenant}:{job.session_id}"
        deadline = time.monotonic() + self.settings.lease_ttl_s * 2
        next_touch = time.monotonic() + self.settings.claim_idle_s / 3
        while True:
            held = await self.leases.acquire(name)
            if held is not None or time.monotonic() > deadline:
                return held
            if time.monotonic() > next_touch:
                await touch()
                next_touch = time.monotonic() + self.settings.claim_idle_s / 3
            await asyncio.sleep(0.05)

    async def _keep(self, touch: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(self.settings.claim_idle_s / 3)
            try:
                await touch()
            except Exception:
                log.warning("memory.job_touch_failed", exc_info=True)

    async def _run(self, job: memory_pb2.Job) -> None:
        tenant, session_id, kind = job.tenant, job.session_id, job.kind
        started_type, done_type, failed_type = _EVENTS[kind]
        result = JobResult()
        started = time.perf_counter()
        try:
            head = (await self.sessions.get(tenant, session_id)).session.head
            earlier = await self.store.succeeded_job(tenant, session_id, kind, head)
            if earlier is not None:
                # Already done on this very head (a redelivery, or a duplicate request).
                self._copy_result(job, earlier)
                job.state = memory_pb2.JOB_STATE_SUCCEEDED
                job.finished_at.CopyFrom(_timestamp(now_us()))
                await self.store.put_job(job)
                return
            job.head = head
            job.worker = self.worker
            job.state = memory_pb2.JOB_STATE_RUNNING
            await self.store.put_job(job)
            self.events.emit(started_type, tenant=tenant, session_id=session_id, **self._attrs(job))
            async with work_timeout(self.settings.job_timeout_s):
                await self._domain(kind).run(tenant, session_id, job.model, result)
        except Exception as exc:
            error = self._describe(exc)
            if kind == "consolidate":
                failures = await self._suppress(
                    self.consolidator.failed(tenant, session_id, result)
                )
            elif kind == "compact" and job.head and not is_refusal(exc):
                failures = await self._suppress(
                    self.store.count_failure(tenant, session_id, "compact", job.head)
                )
            else:
                failures = None
            self._finish(job, result, started, memory_pb2.JOB_STATE_FAILED, error)
            await self.store.put_job(job)
            self.events.emit(
                failed_type,
                tenant=tenant,
                session_id=session_id,
                # A class, not the message: the message may quote an upstream's error,
                # and that the conversation. The job record keeps the message.
                reason=_failure_class(exc),
                failures=failures,
                **self._attrs(job),
            )
            if not isinstance(exc, errors.ThreadlineError | TimeoutError):
                log.exception("memory.job_failed", job_id=job.id)
            return
        if kind == "consolidate":
            await self.store.reset_failures(tenant, session_id, "consolidate")
        self._finish(job, result, started, memory_pb2.JOB_STATE_SUCCEEDED, "")
        await self.store.put_job(job)
        self.events.emit(
            done_type,
            tenant=tenant,
            session_id=session_id,
            skipped=result.skipped or None,
            **result.extra,
            **self._attrs(job),
        )

    def _domain(self, kind: str) -> Consolidator | Extractor | Compactor:
        if kind == "consolidate":
            return self.consolidator
        return self.extractor if kind == "extract" else self.compactor

    @staticmethod
    async def _suppress(work: Awaitable[int]) -> int | None:
        try:
            return await work
        except Exception:
            log.exception("memory.failure_bookkeeping_failed")
            return None

    def _finish(
        self,
        job: memory_pb2.Job,
        result: JobResult,
        started: float,
        state: memory_pb2.JobState.ValueType,
        error: str,
    ) -> None:
        job.state = state
        job.error = error
        job.tokens_in = result.tokens_in
        job.tokens_out = result.tokens_out
        job.offset = result.offset
        job.items = result.items
        job.new_session_id = result.new_session_id
        job.archived = result.archived
        job.duration_ms = int((time.perf_counter() - started) * 1000)
        job.finished_at.CopyFrom(_timestamp(now_us()))

    def _copy_result(self, job: memory_pb2.Job, earlier: memory_pb2.Job) -> None:
        # Nothing is done again (items stay 0); a compaction names the session it made.
        job.head = earlier.head
        job.offset = earlier.offset
        job.new_session_id = earlier.new_session_id

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, TimeoutError):
            return f"timed out after {self.settings.job_timeout_s:g}s"
        if isinstance(exc, errors.ThreadlineError):
            return exc.message
        return f"{type(exc).__name__}: {exc}"

    @staticmethod
    def _attrs(job: memory_pb2.Job) -> dict[str, object]:
        attrs: dict[str, object] = {
            "job_id": job.id,
            "trigger": job.trigger,
            "worker": job.worker,
        }
        if job.state in _FINISHED:
            attrs.update(
                tokens_in=job.tokens_in,
                tokens_out=job.tokens_out,
                duration_ms=job.duration_ms,
            )
            if job.kind == "compact" and job.new_session_id:
                attrs["new_session_id"] = job.new_session_id
            elif job.kind != "compact":
                attrs["offset"] = job.offset
                attrs["messages" if job.kind == "consolidate" else "items"] = job.items
            if job.archived:
                attrs["archived"] = True
        return attrs


def _failure_class(exc: BaseException) -> str:
    """What a failed job's event says about why: the error's code ("UNAVAILABLE"),
    "timeout", or the exception's type."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, errors.ThreadlineError):
        return exc.code
    return type(exc).__name__
