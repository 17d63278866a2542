"""Job queues: which replica runs a queued memory job.

The queue carries job ids; the job records live in the memory store. In one
process an asyncio queue does. With Redis, jobs go on a stream read through a
consumer group: each job is delivered to one replica, acknowledged when done,
and a job its replica stopped touching (it died) is claimed by another after
`claim_idle_s`. A replica working a long job touches it to keep it.

A Redis restart without persistence loses the stream and its group: the group
is created again at the next read (NOGROUP), and the jobs the store still has
unfinished are queued again (`requeue_missing`), so none stays QUEUED forever.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from threadline.logs import get_logger

log = get_logger(__name__)


async def _nothing() -> None:
    return None


@dataclass(frozen=True)
class Delivery:
    job_id: str
    #: Done with it (succeeded, failed or skipped): it is not delivered again.
    ack: Callable[[], Awaitable[None]] = _nothing
    #: Still working on it: keeps another replica from claiming it.
    touch: Callable[[], Awaitable[None]] = _nothing
    #: Delivered again after its first replica stopped touching it.
    reclaimed: bool = False


class QueueClosed(Exception):
    """`get` on a queue that was closed: the worker asking stops."""


#: Called when a queue finds it lost its jobs (Redis restarted).
ResetHook = Callable[[], Awaitable[None]]


class JobQueue(Protocol):
    async def put(self, job_id: str) -> None: ...

    async def get(self) -> Delivery:
        """The next job for this replica; waits for one (QueueClosed once closed)."""

    async def requeue_missing(self, job_ids: Sequence[str]) -> list[str]:
        """Queue those of these unfinished jobs that the queue has lost; which ones."""

    def when_reset(self, hook: ResetHook) -> None:
        """Have `hook` called when the queue finds it lost its jobs."""

    async def close(self) -> None: ...


class LocalJobQueue:
    """An asyncio queue: it loses jobs only with its process, so only the first
    `requeue_missing` (at start) has anything to queue again."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._recovered = False

    async def requeue_missing(self, job_ids: Sequence[str]) -> list[str]:
        if self._recovered:
            return []
        self._recovered = True
        for job_id in job_ids:
            self._queue.put_nowait(job_id)
        return list(job_ids)

    def when_reset(self, hook: ResetHook) -> None:
        return None

    async def put(self, job_id: str) -> None:
        self._queue.put_nowait(job_id)

    async def get(self) -> Delivery:
        return Delivery(await self._queue.get())

    async def close(self) -> None:
        return None


class RedisJobQueue:
    def __init__(
        self,
        client: aioredis.Redis,
        *,
        consumer: str,
        claim_idle_s: float,
        stream: str = "threadline:memory:jobs",
        group: str = "memory",
    ) -> None:
        self._client = client
        self._consumer = consumer
        self._claim_idle_ms = int(claim_idle_s * 1000)
        self._stream = stream
        self._group = group
        self._group_ready = False
        self._next_claim = 0.0
        self._reset_hooks: list[ResetHook] = []
        # Checked between reads: a worker's cancellation can be swallowed inside
        # the Redis client (threadline/cancellation.py), this cannot.
        self._closed = False

    async def put(self, job_id: str) -> None:
        await self._ensure_group()
        await self._client.xadd(self._stream, {"job_id": job_id})

    async def get(self) -> Delivery:
        await self._ensure_group()
        while not self._closed:
            try:
                delivery = await self._next()
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self._recover()
                continue
            if delivery is not None:
                return delivery
        raise QueueClosed(self._stream)

    async def _next(self) -> Delivery | None:
        claimed = await self._claim_abandoned()
        if claimed is not None:
            return claimed
        # Short blocks so abandoned jobs are looked for while the stream is quiet.
        reply: Any = await self._client.xreadgroup(
            self._group, self._consumer, {self._stream: ">"}, count=1, block=500
        )
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                return self._delivery(entry_id, fields, reclaimed=False)
        return None

    async def _recover(self) -> None:
        """The stream or its group is gone (Redis restarted): make them again and have
        the jobs still unfinished queued again."""
        log.warning("memory.queue_lost", stream=self._stream)
        self._group_ready = False
        await self._ensure_group()
        for hook in self._reset_hooks:
            await hook()

    def when_reset(self, hook: ResetHook) -> None:
        self._reset_hooks.append(hook)

    async def requeue_missing(self, job_ids: Sequence[str]) -> list[str]:
        entries: Any = await self._client.xrange(self._stream)
        held = {_text(fields.get(b"job_id", b"")) for _, fields in entries or [] if fields}
        missing = [job_id for job_id in job_ids if job_id not in held]
        for job_id in missing:
            await self.put(job_id)
        return missing

    async def close(self) -> None:
        self._closed = True

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            # From the start of the stream: jobs queued before the group existed count.
            await self._client.xgroup_create(self._stream, self._group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def _claim_abandoned(self) -> Delivery | None:
        now = time.monotonic()
        if now < self._next_claim:
            return None
        self._next_claim = now + min(self._claim_idle_ms / 4000, 5.0)
        reply = await self._client.xautoclaim(
            self._stream,
            self._group,
            self._consumer,
            min_idle_time=self._claim_idle_ms,
            start_id="0-0",
            count=1,
        )
        for entry_id, fields in reply[1]:
            if fields:  # an entry deleted meanwhile has no fields
                log.info("memory.job_reclaimed", entry=_text(entry_id))
                return self._delivery(entry_id, fields, reclaimed=True)
        return None

    def _delivery(
        self, entry_id: bytes | str, fields: dict[bytes, bytes], *, reclaimed: bool
    ) -> Delivery:
        async def ack() -> None:
            await self._client.xack(self._stream, self._group, entry_id)
            await self._client.xdel(self._stream, entry_id)

        async def touch() -> None:
            # Claiming our own entry again resets its idle time.
            await self._client.xclaim(
                self._stream, self._group, self._consumer, 0, [entry_id], justid=True
            )

        job_id = _text(fields.get(b"job_id", b""))
        return Delivery(job_id, ack=ack, touch=touch, reclaimed=reclaimed)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
