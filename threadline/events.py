"""Lifecycle events: one publisher API, a Redis bus and an in-process bus.

On Redis every event is PUBLISHed as JSON (the proto JSON mapping, snake_case
field names) on `<namespace>.events.<type>`, so `redis-cli psubscribe
'threadline.events.*'` is readable, and XADDed to the capped stream
`<namespace>.events`. The namespace defaults to `threadline` on database 0 and
`threadline.db<N>` on database N: pub/sub channels are global to a Redis server,
and two stacks on one server must not see each other's events.

Publishing never fails or blocks a request: events go into a bounded buffer
drained by a background task that reconnects with backoff; when the buffer is
full the oldest event is dropped and counted. Subscribers read the stream, not
the channels: a subscriber whose connection breaks (Redis restarted) reconnects
and resumes after the last event it saw, so it misses nothing published
meanwhile that the stream still holds.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as aioredis
import structlog
from google.protobuf import json_format, struct_pb2, timestamp_pb2
from prometheus_client import Counter
from redis.exceptions import RedisError

from threadline.cancellation import cancel_and_wait
from threadline.logs import get_logger
from threadline.redis_client import connect_redis
from threadline.telemetry import tracing
from threadline.v1.events_pb2 import LifecycleEvent

DEFAULT_NAMESPACE = "threadline"
#: How long a subscriber's read waits for new events before it looks again.
_READ_BLOCK_MS = 1000
_READ_COUNT = 100

log = get_logger("threadline.events")
EVENTS_DROPPED = Counter(
    "threadline_events_dropped_total", "Lifecycle events dropped because the buffer was full"
)
EVENTS_PUBLISHED = Counter("threadline_events_published_total", "Lifecycle events published")


def _whole_numbers_as_ints(value: Any) -> Any:
    """`value` with every whole float an int: a Struct holds only doubles, and an
    attribute published as `port=47551` must read back as 47551, not 47551.0."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _whole_numbers_as_ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_numbers_as_ints(v) for v in value]
    return value


def to_dict(event: LifecycleEvent) -> dict[str, Any]:
    """The proto JSON mapping (snake_case names), integer attributes as integers."""
    data = json_format.MessageToDict(event, preserving_proto_field_name=True)
    if "attributes" in data:
        data["attributes"] = _whole_numbers_as_ints(data["attributes"])
    return data


def to_json(event: LifecycleEvent) -> str:
    return json.dumps(to_dict(event), separators=(", ", ": "))


def from_json(data: str | bytes) -> LifecycleEvent:
    return json_format.Parse(data, LifecycleEvent(), ignore_unknown_fields=True)


def attributes_of(event: LifecycleEvent) -> dict[str, Any]:
    attributes: dict[str, Any] = _whole_numbers_as_ints(json_format.MessageToDict(event.attributes))
    return attributes


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


@dataclass(frozen=True)
class EventKeys:
    """Where a stack's events go on Redis."""

    namespace: str

    @classmethod
    def on(cls, client: aioredis.Redis, namespace: str = "") -> EventKeys:
        if namespace:
            return cls(namespace)
        db = int(client.connection_pool.connection_kwargs.get("db") or 0)
        return cls(DEFAULT_NAMESPACE if db == 0 else f"{DEFAULT_NAMESPACE}.db{db}")

    def channel(self, type_: str) -> str:
        return f"{self.namespace}.events.{type_}"

    @property
    def stream(self) -> str:
        return f"{self.namespace}.events"


class _StreamSubscription:
    """Every event XADDed to the stream after the subscription opened, in order.

    A failed read (Redis restarting) is retried with backoff and resumes after the
    last entry seen; entries trimmed off the capped stream meanwhile are lost.
    """

    def __init__(self, client: aioredis.Redis, stream: str) -> None:
        self._client = client
        self._stream = stream
        self._last_id = "0-0"
        self._closed = False

    async def open(self) -> None:
        try:
            newest = await self._client.xrevrange(self._stream, count=1)
            self._last_id = str(newest[0][0]) if newest else "0-0"
        except (RedisError, OSError):
            # Redis is away: start from now (stream ids are millisecond timestamps).
            self._last_id = f"{int(time.time() * 1000)}-0"

    async def __aiter__(self) -> AsyncIterator[LifecycleEvent]:
        failures = 0
        while not self._closed:
            try:
                # RESP2 replies (the client's protocol): [[stream, [(id, fields), ...]]].
                batches: list[Any] = await self._client.xread(  # type: ignore[assignment]
                    {self._stream: self._last_id}, count=_READ_COUNT, block=_READ_BLOCK_MS
                )
            except (RedisError, OSError) as exc:
                failures += 1
                if failures == 1 or failures % 20 == 0:
                    log.warning("events.subscription_lost", error=str(exc), failures=failures)
                await asyncio.sleep(random.uniform(0, min(2.0, 0.1 * 2**failures)))
                continue
            if failures:
                log.info("events.subscription_resumed", after_failures=failures)
                failures = 0
            for _, entries in batches or ():
                for entry_id, fields in entries:
                    self._last_id = entry_id
                    try:
                        yield from_json(fields.get("event", ""))
                    except json_format.ParseError:
                        log.warning("events.unparseable", stream_id=str(entry_id))

    async def close(self) -> None:
        self._closed = True


class RedisEventBus:
    """Redis pub/sub + capped stream, behind a bounded buffer and a reconnecting pump."""

    def __init__(
        self,
        url: str,
        *,
        buffer_size: int = 10_000,
        stream_maxlen: int = 10_000,
        stream_max_age_s: float = 86_400.0,
        trim_every_s: float = 60.0,
        namespace: str = "",
    ) -> None:
        self._url = url
        self._client: aioredis.Redis = connect_redis(url, decode_responses=True)
        self.keys = EventKeys.on(self._client, namespace)
        self._buffer: collections.deque[LifecycleEvent] = collections.deque()
        self._buffer_size = buffer_size
        self._stream_maxlen = stream_maxlen
        self._stream_max_age_s = stream_max_age_s
        self._trim_every_s = trim_every_s
        self._trimmer: asyncio.Task[None] | None = None
        self._closing = False  # redis-py can swallow a cancel mid-command
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
        sub = _StreamSubscription(self._client, self.keys.stream)
        await sub.open()
        return sub

    async def start(self) -> None:
        if self._pump is None:
            self._pump = asyncio.create_task(self._run(), name="events-pump")
        if self._trimmer is None and self._stream_max_age_s > 0:
            self._trimmer = asyncio.create_task(self._trim_by_age(), name="events-trim")

    def _oldest_kept_id(self) -> str:
        # Stream ids start with their entry's Redis time in milliseconds.
        return str(int((time.time() - self._stream_max_age_s) * 1000))

    async def _trim_by_age(self) -> None:
        """Drop entries older than the age cap, also while nothing is published: the
        length cap alone keeps a quiet deployment's events (ids, tenants) forever."""
        while not self._closing:
            try:
                await self._client.xtrim(
                    self.keys.stream, minid=self._oldest_kept_id(), approximate=False
                )
            except (RedisError, OSError) as exc:
                log.debug("events.trim_failed", error=str(exc))
            await asyncio.sleep(self._trim_every_s)

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
            pipe.publish(self.keys.channel(event.type), payload)
            pipe.xadd(
                self.keys.stream, {"event": payload}, maxlen=self._stream_maxlen, approximate=True
            )
            if self._stream_max_age_s > 0:
                pipe.xtrim(self.keys.stream, minid=self._oldest_kept_id(), approximate=True)
            await pipe.execute()

    async def flush(self, timeout_s: float) -> bool:
        """Wait until the buffer is empty (True) or the timeout passes (False)."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._drained.wait()
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Send what is buffered (briefly), then stop. Safe to call twice."""
        if self._pump is not None:
            if not await self.flush(2.0):
                log.warning("events.unsent_at_close", pending=len(self._buffer))
            await cancel_and_wait(self._pump)
            self._pump = None
        if self._trimmer is not None:
            self._closing = True
            await cancel_and_wait(self._trimmer)
            self._trimmer = None
        await self._client.aclose()


def make_bus(
    redis_url: str | None,
    *,
    buffer_size: int,
    stream_maxlen: int,
    stream_max_age_s: float = 86_400.0,
    namespace: str = "",
) -> EventBus:
    if redis_url:
        return RedisEventBus(
            redis_url,
            buffer_size=buffer_size,
            stream_maxlen=stream_maxlen,
            stream_max_age_s=stream_max_age_s,
            namespace=namespace,
        )
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
        given = {k: v for k, v in attributes.items() if v is not None}
        attrs = struct_pb2.Struct()
        attrs.update(given)
        trace_id, _span_id = tracing.current_ids()
        event = LifecycleEvent(
            id=uuid.uuid4().hex,
            time=now,
            type=type_,
            service=self.service,
            tenant=tenant or str(ctx.get("tenant", "")),
            session_id=session_id or str(ctx.get("session_id", "")),
            trace_id=trace_id,
            request_id=str(ctx.get("request_id", "")),
            attributes=attrs,
        )
        self.bus.publish(event)
        for observer in _observers:
            try:
                observer(event, given)
            except Exception:
                log.exception("events.observer_failed", event_type=type_)
        # Attributes go under one key: names like "type" or "event" must not clash with
        # the log call's own arguments (publishing never fails a request).
        log.info("event.published", event_type=type_, attributes=given)
        return event


#: Called with each event this process publishes and its attributes as given
#: (metrics derived from events, threadline.telemetry.event_metrics).
Observer = Callable[[LifecycleEvent, Mapping[str, Any]], None]
_observers: list[Observer] = []


def observe(observer: Observer) -> None:
    """Call `observer` for every event published in this process from now on (once)."""
    if observer not in _observers:
        _observers.append(observer)
