"""Lifecycle events on real Redis and in process: what subscribers see, and what
happens when Redis is away."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import structlog
from opentelemetry.trace import format_trace_id

from tests.ports import free_ports
from tests.redis_server import start_redis, stop_redis
from tests.waiting import eventually
from threadline.config import TracingSettings
from threadline.events import (
    EventKeys,
    EventPublisher,
    InProcessEventBus,
    RedisEventBus,
    Subscription,
    attributes_of,
    from_json,
    make_bus,
    to_json,
)
from threadline.telemetry import tracing
from threadline.v1.events_pb2 import LifecycleEvent

UNREACHABLE = "redis://127.0.0.1:1/0"


def _event(
    type_: str = "turn.completed",
    *,
    event_id: str = "",
    session_id: str = "",
    tenant: str = "",
    trace_id: str = "",
) -> LifecycleEvent:
    return LifecycleEvent(
        type=type_, id=event_id, session_id=session_id, tenant=tenant, trace_id=trace_id
    )


async def _stream_ids(client: aioredis.Redis) -> list[str]:
    """Ids of the events in the replay stream, oldest first."""
    entries = await client.xrange(EventKeys.on(client).stream)
    assert entries is not None
    return [from_json(fields["event"]).id for _, fields in entries if fields]


async def _next(events: AsyncIterator[LifecycleEvent], timeout_s: float = 5.0) -> LifecycleEvent:
    return await asyncio.wait_for(anext(events), timeout_s)


def _open(sub: Subscription) -> AsyncGenerator[LifecycleEvent, None]:
    events = aiter(sub)
    assert isinstance(events, AsyncGenerator)
    return events


@pytest.fixture
async def bus(redis_url: str, redis_client: aioredis.Redis) -> AsyncIterator[RedisEventBus]:
    running = RedisEventBus(redis_url, buffer_size=100, stream_maxlen=50)
    await running.start()
    yield running
    await running.close()


async def test_publish_reaches_raw_redis_subscriber_as_snake_case_json(
    bus: RedisEventBus, redis_client: aioredis.Redis
) -> None:
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(bus.keys.channel("turn.completed"))
    try:
        bus.publish(_event(session_id="ses_1", tenant="acme", trace_id="req-1"))
        assert await bus.flush(5.0)

        message = None
        deadline = time.monotonic() + 5
        while message is None and time.monotonic() < deadline:
            message = await pubsub.get_message(timeout=1.0)
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]

    assert message is not None
    assert message["channel"] == bus.keys.channel("turn.completed")
    assert message["channel"].endswith(".events.turn.completed")
    payload = json.loads(message["data"])
    assert payload["type"] == "turn.completed"
    assert payload["session_id"] == "ses_1"
    assert payload["trace_id"] == "req-1"
    assert payload["tenant"] == "acme"


async def test_publish_appends_to_the_replay_stream(
    bus: RedisEventBus, redis_client: aioredis.Redis
) -> None:
    for i in range(3):
        bus.publish(_event(event_id=f"e{i}"))
    assert await bus.flush(5.0)

    assert await _stream_ids(redis_client) == ["e0", "e1", "e2"]


async def test_events_past_the_age_cap_leave_the_stream_while_nothing_is_published(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    bus = RedisEventBus(redis_url, stream_max_age_s=1.0, trim_every_s=0.1)
    await bus.start()
    try:
        for i in range(3):
            bus.publish(_event(event_id=f"old{i}", session_id="ses_quiet"))
        assert await bus.flush(5.0)

        # Nothing is published from here on, and the length cap (10,000) is far.
        async def emptied() -> bool:
            return await _stream_ids(redis_client) == []

        await eventually(emptied, timeout=10)
    finally:
        await bus.close()


async def test_replay_stream_is_capped(redis_url: str, redis_client: aioredis.Redis) -> None:
    bus = RedisEventBus(redis_url, buffer_size=1000, stream_maxlen=10)
    await bus.start()
    try:
        for i in range(600):
            bus.publish(_event(event_id=f"e{i}"))
        assert await bus.flush(10.0)
    finally:
        await bus.close()

    ids = await _stream_ids(redis_client)

    # Trimming is approximate (whole stream nodes of 100 entries), never below the cap.
    assert 10 <= len(ids) <= 200
    assert ids[-1] == "e599"
    assert ids == [f"e{i}" for i in range(600 - len(ids), 600)]


async def test_subscribe_yields_events_published_after_it(
    bus: RedisEventBus, redis_client: aioredis.Redis
) -> None:
    bus.publish(_event("session.created", event_id="before"))
    assert await bus.flush(5.0)

    sub = await bus.subscribe()
    events = _open(sub)
    try:
        bus.publish(_event("session.created", event_id="after-1", session_id="ses_9"))
        bus.publish(_event("turn.started", event_id="after-2"))
        first = await _next(events)
        second = await _next(events)
    finally:
        await events.aclose()
        await sub.close()

    assert (first.id, first.type, first.session_id) == ("after-1", "session.created", "ses_9")
    assert (second.id, second.type) == ("after-2", "turn.started")


async def test_in_process_bus_fans_out_to_every_subscriber() -> None:
    bus = InProcessEventBus()
    first, second = await bus.subscribe(), await bus.subscribe()
    a, b = _open(first), _open(second)
    try:
        bus.publish(_event(event_id="e1"))
        bus.publish(_event(event_id="e2"))

        assert [(await _next(a)).id, (await _next(a)).id] == ["e1", "e2"]
        assert [(await _next(b)).id, (await _next(b)).id] == ["e1", "e2"]

        await first.close()
        bus.publish(_event(event_id="e3"))
        assert (await _next(b)).id == "e3"
    finally:
        await a.aclose()
        await b.aclose()
        await second.close()
        await bus.close()


async def test_in_process_slow_subscriber_loses_events_instead_of_blocking() -> None:
    bus = InProcessEventBus(subscriber_buffer=2)
    sub = await bus.subscribe()
    events = _open(sub)
    try:
        for i in range(5):
            bus.publish(_event(event_id=f"e{i}"))

        assert bus.dropped == 3
        assert [(await _next(events)).id, (await _next(events)).id] == ["e0", "e1"]
    finally:
        await events.aclose()
        await sub.close()
        await bus.close()


async def test_make_bus_picks_redis_only_when_configured(redis_url: str) -> None:
    in_process = make_bus(None, buffer_size=10, stream_maxlen=10)
    on_redis = make_bus(redis_url, buffer_size=10, stream_maxlen=10)
    try:
        assert isinstance(in_process, InProcessEventBus)
        assert isinstance(on_redis, RedisEventBus)
    finally:
        await in_process.close()
        await on_redis.close()


async def test_unreachable_redis_never_blocks_or_raises_and_drops_oldest() -> None:
    bus = RedisEventBus(UNREACHABLE, buffer_size=5)
    await bus.start()
    try:
        began = time.perf_counter()
        for i in range(8):
            bus.publish(_event(event_id=f"e{i}"))
        publish_s = time.perf_counter() - began

        assert publish_s < 0.1
        assert bus.pending == 5
        assert bus.dropped == 3
    finally:
        began = time.perf_counter()
        await bus.close()
        close_s = time.perf_counter() - began

    assert close_s < 3.0
    await bus.close()  # safe to call twice


def test_the_namespace_follows_the_database_unless_configured() -> None:
    def keys(url: str, namespace: str = "") -> EventKeys:
        return EventKeys.on(aioredis.from_url(url), namespace)

    assert keys("redis://127.0.0.1:6379").channel("turn.completed") == (
        "threadline.events.turn.completed"
    )
    assert keys("redis://127.0.0.1:6379/0").stream == "threadline.events"
    assert keys("redis://127.0.0.1:6379/3").stream == "threadline.db3.events"
    assert keys("redis://127.0.0.1:6379/3", "blue").channel("x") == "blue.events.x"


async def test_stacks_on_other_databases_do_not_see_each_others_events(redis_url: str) -> None:
    base = redis_url.rsplit("/", 1)[0]
    first = RedisEventBus(f"{base}/1", buffer_size=10)
    second = RedisEventBus(f"{base}/2", buffer_size=10)
    await first.start()
    await second.start()
    raw = aioredis.from_url(f"{base}/1", decode_responses=True)
    pubsub = raw.pubsub(ignore_subscribe_messages=True)
    await pubsub.psubscribe(first.keys.channel("*"))
    sub = await first.subscribe()
    events = _open(sub)
    try:
        second.publish(_event(event_id="other-stack"))
        first.publish(_event(event_id="this-stack"))
        assert await second.flush(5.0) and await first.flush(5.0)
        assert (await _next(events)).id == "this-stack"
        message = None
        while message is None:
            message = await pubsub.get_message(timeout=5.0)
        assert from_json(message["data"]).id == "this-stack"
    finally:
        await events.aclose()
        await sub.close()
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await raw.aclose()
        await first.close()
        await second.close()


async def _start_redis(directory: Path, port: int) -> subprocess.Popen[bytes]:
    server, _ = await asyncio.to_thread(start_redis, directory, port)
    return server


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server on PATH")
async def test_events_buffered_while_redis_is_away_are_delivered_when_it_comes_back(
    tmp_path: Path,
) -> None:
    (port,) = free_ports(1)
    url = f"redis://127.0.0.1:{port}/0"
    bus = RedisEventBus(url, buffer_size=3)
    await bus.start()
    server: subprocess.Popen[bytes] | None = None
    try:
        for i in range(5):
            bus.publish(_event(event_id=f"e{i}"))
        assert bus.pending == 3

        server = await _start_redis(tmp_path, port)
        assert await bus.flush(10.0), "buffered events were not sent after Redis came back"

        reader = aioredis.from_url(url, decode_responses=True)
        try:
            ids = await _stream_ids(reader)
        finally:
            await reader.aclose()
    finally:
        await bus.close()
        if server is not None:
            stop_redis(server)

    # The two oldest were dropped when the buffer filled; the rest arrive in order.
    assert ids == ["e2", "e3", "e4"]
    assert bus.dropped == 2


async def test_emit_fills_identity_and_context() -> None:
    bus = InProcessEventBus()
    sub = await bus.subscribe()
    events = _open(sub)
    publisher = EventPublisher(bus, "executor")
    try:
        with structlog.contextvars.bound_contextvars(
            tenant="acme", session_id="ses_ctx", request_id="req-42"
        ):
            emitted = publisher.emit("turn.completed", latency_ms=120, model="m", error=None)
        received = await _next(events)
    finally:
        await events.aclose()
        await sub.close()
        await bus.close()

    assert received == emitted
    assert len(received.id) == 32
    assert received.type == "turn.completed"
    assert received.service == "executor"
    assert (received.tenant, received.session_id) == ("acme", "ses_ctx")
    # The request id is the x-request-id; the trace id is empty outside any span.
    assert (received.request_id, received.trace_id) == ("req-42", "")
    age_s = (datetime.now(UTC) - received.time.ToDatetime(tzinfo=UTC)).total_seconds()
    assert 0 <= age_s < 5
    # None values are left out rather than sent as null.
    assert attributes_of(received) == {"latency_ms": 120, "model": "m"}


async def test_emit_explicit_tenant_and_session_win_over_context() -> None:
    bus = InProcessEventBus()
    publisher = EventPublisher(bus, "session")
    with structlog.contextvars.bound_contextvars(tenant="acme", session_id="ses_ctx"):
        event = publisher.emit("session.created", tenant="other", session_id="ses_given")
    await bus.close()

    assert (event.tenant, event.session_id) == ("other", "ses_given")


async def test_emit_without_context_leaves_fields_empty() -> None:
    bus = InProcessEventBus()
    with structlog.contextvars.bound_contextvars():
        structlog.contextvars.clear_contextvars()
        event = EventPublisher(bus, "gateway").emit("service.started")
    await bus.close()

    assert (event.tenant, event.session_id, event.trace_id) == ("", "", "")
    assert attributes_of(event) == {}


async def test_emit_ids_are_unique() -> None:
    bus = InProcessEventBus()
    publisher = EventPublisher(bus, "gateway")
    ids = {publisher.emit("x").id for _ in range(100)}
    await bus.close()

    assert len(ids) == 100


async def test_emit_accepts_any_attribute_name() -> None:
    bus = InProcessEventBus()
    publisher = EventPublisher(bus, "executor")
    try:
        event = publisher.emit("tool.called", type="function", event="x")
    finally:
        await bus.close()

    assert attributes_of(event) == {"type": "function", "event": "x"}


def test_json_round_trip() -> None:
    event = EventPublisher(InProcessEventBus(), "llm_proxy").emit(
        "llm.retry",
        tenant="acme",
        session_id="ses_1",
        attempt=2,
        reason="http_503",
        nested={"a": [1, "b"]},
        ok=True,
    )

    text = to_json(event)
    decoded = from_json(text)

    assert decoded == event
    assert "\n" not in text  # one line per event for redis-cli and log pipes
    assert json.loads(text)["session_id"] == "ses_1"
    # A Struct holds doubles; integers are still written as integers.
    assert json.loads(text)["attributes"]["attempt"] == 2
    assert '"attempt": 2,' in text or '"attempt": 2}' in text
    assert attributes_of(decoded) == {
        "attempt": 2,
        "reason": "http_503",
        "nested": {"a": [1, "b"]},
        "ok": True,
    }


def test_from_json_ignores_unknown_fields() -> None:
    decoded = from_json('{"type": "turn.started", "added_in_a_later_version": 1}')

    assert decoded.type == "turn.started"


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server on PATH")
async def test_a_subscriber_resumes_after_redis_restarts_and_misses_nothing(
    tmp_path: Path,
) -> None:
    (port,) = free_ports(1)
    server = await _start_redis(tmp_path, port)
    bus = RedisEventBus(f"redis://127.0.0.1:{port}/0", buffer_size=100)
    await bus.start()
    sub = await bus.subscribe()
    events = _open(sub)
    try:
        bus.publish(_event(event_id="before"))
        assert (await _next(events)).id == "before"

        server.kill()
        await asyncio.to_thread(server.wait)
        # Published while Redis is down: buffered by the publisher, then sent.
        bus.publish(_event(event_id="during-1"))
        bus.publish(_event(event_id="during-2"))
        server = await _start_redis(tmp_path, port)
        bus.publish(_event(event_id="after"))

        seen = [(await _next(events, timeout_s=15.0)).id for _ in range(3)]
    finally:
        await events.aclose()
        await sub.close()
        await bus.close()
        stop_redis(server)

    assert seen == ["during-1", "during-2", "after"]


async def test_an_event_carries_the_trace_of_the_span_that_published_it() -> None:
    provider = tracing.install(TracingSettings(), "threadline-tests")
    assert provider is not None
    tracer = provider.get_tracer("test")
    bus = InProcessEventBus()
    with tracer.start_as_current_span("turn") as span:
        event = EventPublisher(bus, "executor").emit("service.started", port=47551)
    await bus.close()

    assert event.trace_id == format_trace_id(span.get_span_context().trace_id)
    assert json.loads(to_json(event))["attributes"] == {"port": 47551}
    assert '"port": 47551}' in to_json(event)
