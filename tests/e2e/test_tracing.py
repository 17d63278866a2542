"""Traces: a turn through the five services is one trace, with a span per RPC (server
and client), per model attempt and per store operation; logs and events carry its id."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, format_trace_id

from tests.conftest import ACME_KEY, make_settings
from tests.spans import named, spans
from tests.waiting import eventually
from threadline.client import GatewayClient
from threadline.config import TracingSettings
from threadline.stack import Stack, start_stack
from threadline.telemetry import tracing
from threadline.testing.fake_upstream import FakeUpstream, Script
from threadline.v1.events_pb2 import LifecycleEvent

__all__ = ["spans"]  # the fixture


def server(finished: Sequence[ReadableSpan], method: str) -> ReadableSpan:
    found = [s for s in named(finished, method) if s.kind == SpanKind.SERVER]
    assert len(found) == 1, f"{method}: {[s.name for s in finished]}"
    return found[0]


def parent_of(finished: Sequence[ReadableSpan], span: ReadableSpan) -> ReadableSpan:
    assert span.parent is not None, f"{span.name} has no parent"
    parents = [s for s in finished if s.context.span_id == span.parent.span_id]
    assert len(parents) == 1, f"{span.name}: parent not recorded"
    return parents[0]


def called_by(finished: Sequence[ReadableSpan], callee: ReadableSpan) -> ReadableSpan:
    """The server span that made the call `callee` answers (through its client span)."""
    client = parent_of(finished, callee)
    assert client.kind == SpanKind.CLIENT and client.name == callee.name
    return parent_of(finished, client)


async def _turn_spans(
    exporter: InMemorySpanExporter, gateway: GatewayClient, text: str
) -> tuple[list[ReadableSpan], str]:
    session = await gateway.create_session()
    exporter.clear()
    events = [e async for e in gateway.converse(session.id, text)]
    assert events[-1].WhichOneof("event") == "done"

    async def converse_ended() -> bool:
        return any(s.name.endswith("Gateway/Converse") for s in exporter.get_finished_spans())

    await eventually(converse_ended, timeout=10)
    converse = server(exporter.get_finished_spans(), "/threadline.v1.Gateway/Converse")
    trace_id = converse.context.trace_id

    async def complete() -> bool:
        # Session's server span for the answer's append ends just after the turn's
        # reply; a client span ends once its call is done, a moment after the last
        # message (the gateway's caller's too).
        mine = [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]
        appends = named(mine, "/threadline.v1.Sessions/Append")
        assert converse.parent is not None
        callers = [s for s in mine if s.context.span_id == converse.parent.span_id]
        return len(appends) >= 4 and bool(callers)  # 2 calls, 2 sides

    await eventually(complete, timeout=10)
    finished = [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]
    return finished, format_trace_id(trace_id)


async def test_a_turn_is_one_trace_from_the_gateway_to_every_service(
    spans: InMemorySpanExporter,
    stack: Stack,
    gateway: GatewayClient,
    fake_upstream: FakeUpstream,
) -> None:
    subscription = await stack.bus.subscribe()
    fake_upstream.default = Script(text="Hello there.")

    finished, trace_id = await _turn_spans(spans, gateway, "Hi!")

    converse = server(finished, "/threadline.v1.Gateway/Converse")
    run_turn = server(finished, "/threadline.v1.Executor/RunTurn")
    stream_chat = server(finished, "/threadline.v1.LlmProxy/StreamChat")
    assert called_by(finished, run_turn) is converse
    assert called_by(finished, stream_chat) is run_turn
    assert called_by(finished, server(finished, "/threadline.v1.Memory/Recall")) is run_turn
    assert called_by(finished, server(finished, "/threadline.v1.Sessions/BuildContext")) is run_turn
    appends = [
        s for s in named(finished, "/threadline.v1.Sessions/Append") if s.kind == SpanKind.SERVER
    ]
    assert [called_by(finished, a) for a in appends] == [run_turn, run_turn]
    # The caller's own span (GatewayClient) is the root: the whole turn is its trace.
    assert parent_of(finished, converse).kind == SpanKind.CLIENT

    (attempt,) = named(finished, "llm.attempt")
    assert parent_of(finished, attempt) is stream_chat
    assert attempt.attributes is not None
    assert attempt.attributes["threadline.upstream"] == "fake"
    assert attempt.attributes["gen_ai.request.model"] == "fake-model"
    assert attempt.attributes["threadline.attempt.outcome"] == "ok"
    output_tokens = attempt.attributes["gen_ai.usage.output_tokens"]
    assert isinstance(output_tokens, int) and output_tokens > 0
    assert attempt.status.status_code != StatusCode.ERROR

    store_appends = named(finished, "store.append")
    assert {parent_of(finished, s).name for s in store_appends} == {
        "/threadline.v1.Sessions/Append"
    }
    assert store_appends[0].attributes is not None
    assert store_appends[0].attributes["db.system"] == "sqlite"

    # The request id the services already shared rides on every server span.
    request_ids = {
        s.attributes.get("threadline.request_id")
        for s in finished
        if s.kind == SpanKind.SERVER and s.attributes is not None
    }
    assert len(request_ids) == 1 and None not in request_ids

    async def completed() -> LifecycleEvent:
        async for event in subscription:
            if event.type == "turn.completed":
                return event
        raise AssertionError("subscription ended")

    event = await asyncio.wait_for(completed(), 10)
    await subscription.close()
    assert event.trace_id == trace_id
    assert event.request_id in request_ids


async def test_a_failed_attempt_is_an_error_span_beside_the_one_that_answered(
    spans: InMemorySpanExporter,
    stack: Stack,
    gateway: GatewayClient,
    fake_upstream: FakeUpstream,
) -> None:
    fake_upstream.enqueue(Script.error(503, "overloaded"), Script(text="Second time lucky."))

    finished, _ = await _turn_spans(spans, gateway, "Hi!")

    stream_chat = server(finished, "/threadline.v1.LlmProxy/StreamChat")
    attempts = sorted(named(finished, "llm.attempt"), key=lambda s: s.start_time or 0)
    assert [parent_of(finished, a) for a in attempts] == [stream_chat, stream_chat]
    failed, answered = (a.attributes or {} for a in attempts)
    assert (failed["threadline.attempt"], answered["threadline.attempt"]) == (1, 2)
    assert failed["threadline.attempt.outcome"] == "failed"
    assert attempts[0].status.status_code == StatusCode.ERROR
    assert failed["threadline.attempt.reason"] == "http_503"
    assert attempts[0].status.description == "failed: http_503"
    assert answered["threadline.attempt.outcome"] == "ok"
    assert attempts[1].status.status_code != StatusCode.ERROR


async def test_with_tracing_switched_off_a_turn_makes_no_spans(
    spans: InMemorySpanExporter, tmp_path: Path, fake_upstream: FakeUpstream, redis_url: str
) -> None:
    settings = make_settings(tmp_path, fake_upstream.base_url, redis_url=redis_url)
    off = settings.model_copy(update={"tracing": TracingSettings(enabled=False)})
    stack = await start_stack(off, ephemeral_ports=True)
    try:
        async with GatewayClient(stack.address("gateway"), api_key=ACME_KEY) as gateway:
            session = await gateway.create_session()
            events = [e async for e in gateway.converse(session.id, "Hi!")]
    finally:
        await stack.stop(1.0)
        tracing.install(TracingSettings(), "threadline-tests")  # on again for other tests

    assert events[-1].WhichOneof("event") == "done"
    assert spans.get_finished_spans() == ()


async def test_a_memory_job_is_a_trace_of_its_own_named_by_its_events(
    stack: Stack, gateway: GatewayClient, fake_upstream: FakeUpstream
) -> None:
    # Longer than the tail a compaction keeps (memory.compact_retained_tokens).
    fake_upstream.default = Script(text="An answer that goes on for a while. " * 60)
    session = await gateway.create_session()
    for text in ("first question", "second question", "third question"):
        [e async for e in gateway.converse(session.id, text)]
    fake_upstream.default = Script(
        tool_calls=[("write_summary", json.dumps({"summary": "Three questions asked."}))]
    )
    subscription = await stack.bus.subscribe()

    job = await gateway.compact_session(session.id, wait=True)

    async def compaction_events() -> list[LifecycleEvent]:
        found = []
        async for event in subscription:
            if event.type.startswith("compact."):
                found.append(event)
            if event.type in ("compact.done", "compact.failed"):
                return found
        raise AssertionError("subscription ended")

    events = await asyncio.wait_for(compaction_events(), 10)
    await subscription.close()
    assert [e.type for e in events] == ["compact.start", "compact.done"], job
    assert len(events[0].trace_id) == 32
    assert events[0].trace_id == events[1].trace_id
