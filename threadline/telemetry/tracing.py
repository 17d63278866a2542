"""OpenTelemetry tracing: one tracer provider per process, W3C trace context on every call.

The gRPC instrumentation of opentelemetry-instrumentation-grpc makes a server span
for each RPC a service answers (joining the caller's `traceparent`) and a client
span for each call it makes (sending `traceparent` on), so a turn is one trace from
the gateway through the executor to session, memory and llm_proxy. Services add
their own spans inside (a model attempt, a store operation) with `child_span`.

Spans are always made, exported or not: the trace id is what joins a log line, an
event and a caller's trace, so it must exist when no collector is configured.
Export (OTLP over gRPC, batched) starts only when `tracing.otlp_endpoint` is set;
until spans go somewhere they are not recorded (ids only: `_Sampler`), which saves
most of their cost (bench/telemetry_overhead.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import grpc.aio
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from threadline.config import TracingSettings

_TRACER = trace.get_tracer("threadline")
#: False once a process installed tracing switched off: its servers and channels get
#: no tracing interceptors (channels made before, or by clients, keep theirs).
_enabled = True
#: Endpoints already exported to, so a second stack in one process adds no second exporter.
_exporting: set[str] = set()
_UNTRACED_PREFIXES = ("/grpc.health.", "/grpc.reflection.")


def _traced(details: grpc.HandlerCallDetails) -> bool:
    """Not probes and reflection: a span per kubelet probe would bury the turns. (The
    library's own service_prefix filter costs more than a span: it normalises paths.)"""
    return not details.method.startswith(_UNTRACED_PREFIXES)


Attributes = Mapping[str, AttributeValue]


class _Sampler(Sampler):
    """Which new traces are recorded: `ratio` of them while spans go somewhere (an
    exporter, or a processor added with `add_processor`), none while they go nowhere,
    since recording then costs CPU for nothing; ids are made either way. A caller's
    decision (the sampled flag of its traceparent) is followed by ParentBased."""

    def __init__(self) -> None:
        self.ratio = 1.0
        self.recording = False
        self._kept = TraceIdRatioBased(1.0)

    def set(self, ratio: float, recording: bool) -> None:
        self.ratio, self.recording = ratio, recording
        self._kept = TraceIdRatioBased(ratio)

    def should_sample(self, *args: Any, **kwargs: Any) -> SamplingResult:
        chosen = self._kept if self.recording else ALWAYS_OFF
        return chosen.should_sample(*args, **kwargs)

    def get_description(self) -> str:
        return f"threadline(ratio={self.ratio}, recording={self.recording})"


_ROOT = _Sampler()


def add_processor(processor: SpanProcessor) -> None:
    """Send spans to `processor` too (an in-memory exporter, an embedding application's
    own): new traces are recorded from now on, at `tracing.sample_ratio`."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        raise RuntimeError("tracing is not installed (tracing.install)")
    provider.add_span_processor(processor)
    _ROOT.set(_ROOT.ratio, recording=True)


def install(settings: TracingSettings, service_name: str) -> TracerProvider | None:
    """The process's tracer provider, made on the first call; later calls only add export.

    A provider someone else installed first (a test's in-memory exporter, an
    application embedding threadline) is kept and used. With tracing switched off
    nothing is installed (spans are the API's no-ops) and None is returned.
    """
    global _enabled
    _enabled = settings.enabled
    if not settings.enabled:
        return None
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        provider = current
    else:
        provider = TracerProvider(
            resource=Resource.create({"service.name": settings.service_name or service_name}),
            sampler=ParentBased(_ROOT),
        )
        trace.set_tracer_provider(provider)
    endpoint = settings.otlp_endpoint
    if endpoint and endpoint not in _exporting:
        # Imported here: the exporter pulls in its own gRPC stubs, needed only when exporting.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=endpoint, insecure=settings.otlp_insecure)
        provider.add_span_processor(BatchSpanProcessor(exporter))
        _exporting.add(endpoint)
    _ROOT.set(settings.sample_ratio, recording=_ROOT.recording or bool(_exporting))
    return provider


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """A server span per RPC (health and reflection excepted), in the caller's trace."""
    if not _enabled:
        return []
    interceptor: grpc.aio.ServerInterceptor = aio_server_interceptor(filter_=_traced)  # type: ignore[no-untyped-call]
    return [interceptor]


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """A client span per call, and `traceparent` in its metadata."""
    if not _enabled:
        return []
    interceptors: list[grpc.aio.ClientInterceptor] = aio_client_interceptors()  # type: ignore[no-untyped-call]
    return interceptors


def current_ids() -> tuple[str, str]:
    """Trace id and span id (hex) of the current span; empty strings outside any."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return "", ""
    return trace.format_trace_id(context.trace_id), trace.format_span_id(context.span_id)


def annotate(attributes: Attributes) -> None:
    """Attributes on the current span (the RPC's server span inside a servicer)."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes(attributes)


@contextlib.contextmanager
def child_span(name: str, attributes: Attributes | None = None) -> Iterator[Span]:
    """A span under the current one that is not made current itself.

    Safe around an async generator's yields: making it current there would leak it
    into the caller's code between items, and detach it in another context.
    An exception marks it failed; a cancellation only says so.
    """
    span = start_child(name, attributes)
    try:
        yield span
    except BaseException as exc:
        if isinstance(exc, Exception):
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:256]))
        else:
            span.set_attribute("threadline.cancelled", True)
        raise
    finally:
        span.end()


@contextlib.contextmanager
def new_trace(name: str, attributes: Attributes | None = None) -> Iterator[Span]:
    """A trace of its own for work no request started (a memory job), current while
    the block runs, so the logs and events it writes carry its trace id.

    Only around awaits in one coroutine, never across an async generator's yields.
    """
    if not _enabled:
        yield trace.INVALID_SPAN
        return
    with _TRACER.start_as_current_span(
        name, context=Context(), kind=SpanKind.INTERNAL, attributes=attributes
    ) as span:
        yield span


def fail(span: Span, description: str) -> None:
    """Mark `span` failed with a short description (no request content)."""
    span.set_status(Status(StatusCode.ERROR, description[:256]))


def start_child(name: str, attributes: Attributes | None = None) -> Span:
    """A span under the current one, not made current, for the caller to `end()`: for
    spans whose start and end are seen in different places (one per model attempt).
    Outside any span, none (a no-op span)."""
    # Outside any trace (a background loop's heartbeat, a poll) a span would start a
    # trace of one span every few seconds, burying the turns in a trace viewer.
    if not _enabled or not trace.get_current_span().get_span_context().is_valid:
        return trace.INVALID_SPAN
    return _TRACER.start_span(name, kind=SpanKind.INTERNAL, attributes=attributes)
