"""Lifecycle events: one publisher API, a Redis bus and an in-process bus.

On Redis every event is PUBLISHed as JSON (the proto JSON mapping, snake_case
field names) on `threadline.events.<type>`, so `redis-cli psubscribe
'threadline.events.*'` is readable, and XADDed to the capped stream
`threadline.events` for replay. Publishing never fails or blocks a request:
events go into a bounded buffer drained by a background task that reconnects
with backoff; when the buffer is full the oldest event is dropped and counted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import uuid
from collections.abc import AsyncIterator
from typing import Any, Protocol

import redis.asyncio as aioredis
import structlog
from google.protobuf import json_format, struct_pb2, timestamp_pb2
from prometheus_client import Counter
from redis.exceptions import RedisError

from threadline.logs import get_logger
from threadline.v1.events_pb2 import LifecycleEvent

CHANNEL_PREFIX = "threadline.events."
STREAM_KEY = "threadline.events"

log = get_logger("threadline.events")
EVENTS_DROPPED = Counter(
    "threadline_events_dropped_total", "Lifecycle events dropped because the buffer was full"
)
EVENTS_PUBLISHED = Counter("threadline_events_published_total", "Lifecycle events published")


def to_json(event: LifecycleEvent) -> str:
    return json_format.MessageToJson(event, preserving_proto_field_name=True, indent=None)


def from_json(data: str | bytes) -> LifecycleEvent:
    return json_format.Parse(data, LifecycleEvent(), ignore_unknown_fields=True)


def attributes_of(event: LifecycleEvent) -> dict[str, Any]:
    return json_format.MessageToDict(event.attributes)


class Subscription(Protocol):
    def __aiter__(self) -> AsyncIterator[LifecycleEvent]: ...

    async def close(self) -> None: ...


class EventBus(Protocol):
    @property
    def dropped(self) -> int: ...

    def publish(self, event: LifecycleEvent) -> None:
        """Queue an event; never blocks, never raises."""

    async def subscribe(self) -> Subscription:
        """Every event published from now on (until closed)."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class _QueueSubscription:
    def __init__(self, bus: InProcessEventBus, maxsize: int) -> None:
        self._bus = bus
        self.queue: asyncio.Queue[LifecycleEvent] = asyncio.Queue(maxsize)

    async def __aiter__(self) -> AsyncIterator[LifecycleEvent]:
        while True:
            yield await self.queue.get()

    async def close(self) -> None:
        self._bus.unsubscribe(self)


class InProcessEventBus:
    """Fan-out inside one process, for single-process mode without Redis."""

    def __init__(self, subscriber_buffer: int = 10_000) -> None:
        self._subscribers: set[_QueueSubscription] = set()
        self._buffer = subscriber_buffer
        self._dropped = 0

    @property
    def dropped(self) -> int:
        return self._dropped

    def publish(self, event: LifecycleEvent) -> None:
        EVENTS_PUBLISHED.inc()
        for sub in tuple(self._subscribers):
            try:
                sub.queue.put_nowait(event)
            except asyncio.QueueFull:
                # A slow watcher loses events rather than slowing every request.
                self._dropped += 1
                EVENTS_DROPPED.inc()

    async def subscribe(self) -> Subscription:
        sub = _QueueSubscription(self, self._buffer)
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: _QueueSubscription) -> None:
        self._subscribers.discard(sub)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._subscribers.clear()


class _RedisSubscription:
    def __init__(self, client: aioredis.Redis) -> None:
        self._pubsub = client.pubsub(ignore_subscribe_messages=True)

    async def open(self) -> None:
        await self._pubsub.psubscribe(CHANNEL_PREFIX + "*")

    async def __aiter__(self) -> AsyncIterator[LifecycleEvent]:
        while True:
            message = await self._pubsub.get_message(timeout=1.0)
            if message is None or message.get("type") != "pmessage":
                continue
            try:
                yield from_json(message["data"])
            except json_format.ParseError:
                log.warning("events.unparseable", channel=str(message.get("channel")))

    async def close(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]


class RedisEventBus:
    """Redis pub/sub + capped stream, behind a bounded buffer and a reconnecting pump."""

    def __init__(self, url: str, *, buffer_size: int = 10_000, stream_maxlen: int = 10_000) -> None:
        self._url = url
        self._client: aioredis.Redis = aioredis.from_url(url, decode_responses=True)
        self._buffer: collections.deque[LifecycleEvent] = collections.deque()
        self._buffer_size = buffer_size
        self._stream_maxlen = stream_maxlen
        self._ready = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._pump: asyncio.Task[None] | None = None
        self._dropped = 0

    @property
    def dropped(self) -> int:
        return self._dropped

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def publish(self, event: LifecycleEvent) -> None:
        if len(self._buffer) >= self._buffer_size:
            self._buffer.popleft()
            self._dropped += 1
            EVENTS_DROPPED.inc()
        self._buffer.append(event)
        self._drained.clear()
        self._ready.set()

    async def subscribe(self) -> Subscription:
        sub = _RedisSubscription(self._client)
        await sub.open()
        return sub

    async def start(self) -> None:
        if self._pump is None:
            self._pump = asyncio.create_task(self._run(), name="events-pump")

    async def _run(self) -> None:
        failures = 0
        while True:
            await self._ready.wait()
            if not self._buffer:
                self._ready.clear()
                continue
            event = self._buffer[0]
            try:
                await self._send(event)
            except (RedisError, OSError) as exc:
                failures += 1
                delay = random.uniform(0, min(5.0, 0.1 * 2**failures))
                if failures == 1 or failures % 20 == 0:
                    log.warning(
                        "events.redis_unreachable", error=str(exc), pending=len(self._buffer)
                    )
                await asyncio.sleep(delay)
                continue
            if failures:
                log.info("events.redis_reconnected", after_failures=failures)
                failures = 0
            # The event may have been dropped while we were sending; only pop what we sent.
            if self._buffer and self._buffer[0] is event:
                self._buffer.popleft()
            if not self._buffer:
                self._drained.set()
            EVENTS_PUBLISHED.inc()

    async def _send(self, event: LifecycleEvent) -> None:
        payload = to_json(event)
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.publish(CHANNEL_PREFIX + event.type, payload)
            pipe.xadd(STREAM_KEY, {"event": payload}, maxlen=self._stream_maxlen, approximate=True)
            await pipe.execute()

    async def flush(self, timeout_s: float) -> bool:
        """Wait until the buffer is empty (True) or the timeout passes (False)."""
        try:
            await asyncio.wait_for(self._drained.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Send what is buffered (briefly), then stop. Safe to call twice."""
        if self._pump is not None:
            if not await self.flush(2.0):
                log.warning("events.unsent_at_close", pending=len(self._buffer))
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
            self._pump = None
        await self._client.aclose()


def make_bus(redis_url: str | None, *, buffer_size: int, stream_maxlen: int) -> EventBus:
    if redis_url:
        return RedisEventBus(redis_url, buffer_size=buffer_size, stream_maxlen=stream_maxlen)
    return InProcessEventBus(subscriber_buffer=buffer_size)


class EventPublisher:
    """What services call: `events.emit("turn.completed", tenant=..., latency_ms=...)`."""

    def __init__(self, bus: EventBus, service: str) -> None:
        self.bus = bus
        self.service = service

    def emit(
        self, type_: str, *, tenant: str = "", session_id: str = "", **attributes: Any
    ) -> LifecycleEvent:
        now = timestamp_pb2.Timestamp()
        now.GetCurrentTime()
        ctx = structlog.contextvars.get_contextvars()
        attrs = struct_pb2.Struct()
        attrs.update({k: v for k, v in attributes.items() if v is not None})
        event = LifecycleEvent(
            id=uuid.uuid4().hex,
            time=now,
            type=type_,
            service=self.service,
            tenant=tenant or str(ctx.get("tenant", "")),
            session_id=session_id or str(ctx.get("session_id", "")),
            trace_id=str(ctx.get("request_id", "")),
            attributes=attrs,
        )
        self.bus.publish(event)
        # Attributes go under one key: names like "type" or "event" must not clash with
        # the log call's own arguments (publishing never fails a request).
        log.info("event.published", event_type=type_, attributes=json_format.MessageToDict(attrs))
        return event
