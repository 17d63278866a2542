"""Spans nobody records (the default: no exporter) are made as bare ids, and still join
the caller's trace: logs, events and the next service's spans carry its trace id."""

from __future__ import annotations

from collections.abc import Iterator

import grpc.aio
import pytest
from opentelemetry import trace

from threadline.config import TracingSettings
from threadline.telemetry import tracing

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
METHOD = "/threadline.v1.Sessions/Get"


@pytest.fixture
def ids_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tracing installed by threadline, with nothing recording spans."""
    tracing.install(TracingSettings(), "threadline-tests")
    if not tracing._own_provider:
        pytest.skip("another tracer provider was installed first")
    monkeypatch.setattr(tracing._ROOT, "recording", False)
    yield


def sent_traceparent() -> str:
    metadata = grpc.aio.Metadata()
    assert tracing.client_span("/threadline.v1.Memory/Recall", metadata) is None
    (value,) = metadata.get_all(tracing.TRACEPARENT_KEY)
    assert isinstance(value, str)
    return value


def test_a_callers_unsampled_trace_is_joined_and_passed_on(ids_only: None) -> None:
    caller = {"traceparent": f"00-{TRACE}-{CALLER_SPAN}-00", "tracestate": "vendor=1"}
    with tracing.server_span(METHOD, caller) as span:
        assert not span.is_recording()
        assert trace.get_current_span() is span
        trace_id, span_id = tracing.current_ids()
        assert trace_id == TRACE and span_id not in ("", CALLER_SPAN)
        # The next call goes on in the same trace, under this span.
        assert sent_traceparent() == f"00-{TRACE}-{span_id}-00"
        assert span.get_span_context().trace_state.get("vendor") == "1"
        # Children of a span nobody records are not made at all.
        assert tracing.start_child("store.get") is trace.INVALID_SPAN
    assert not trace.get_current_span().get_span_context().is_valid


@pytest.mark.parametrize(
    "traceparent",
    [None, "garbage", f"00-{'0' * 32}-{CALLER_SPAN}-00", f"00-{TRACE}-{CALLER_SPAN}-zz"],
)
def test_without_a_valid_caller_trace_a_new_one_starts(
    ids_only: None, traceparent: str | None
) -> None:
    metadata = {} if traceparent is None else {"traceparent": traceparent}
    with tracing.server_span(METHOD, metadata):
        trace_id, span_id = tracing.current_ids()
    assert len(trace_id) == 32 and trace_id not in (TRACE, "0" * 32)
    assert len(span_id) == 16


def test_a_call_made_outside_any_span_starts_a_trace(ids_only: None) -> None:
    first, second = sent_traceparent(), sent_traceparent()
    assert first.startswith("00-") and first.endswith("-00")
    assert first.split("-")[1] != second.split("-")[1]


def test_health_probes_get_no_span(ids_only: None) -> None:
    with tracing.server_span("/grpc.health.v1.Health/Check", {}) as span:
        assert span is trace.INVALID_SPAN
