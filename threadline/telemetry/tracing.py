"""OpenTelemetry tracing: one tracer provider per process, W3C trace context on every call.

Each RPC a service answers has a server span (joining the caller's `traceparent`;
`server_span`, made by the request context interceptor), and each call a service
makes sends `traceparent` on, with a client span of its own when spans are
recorded (`client_span`, used by `threadline.outgoing`), so a turn is one trace
from the gateway through the executor to session, memory and llm_proxy.
Services add their own spans inside (a model attempt, a store operation) with
`child_span`.

Spans are always made, exported or not: the trace id is what joins a log line, an
event and a caller's trace, so it must exist when no collector is configured.
Export (OTLP over gRPC, batched) starts only when `tracing.otlp_endpoint` is set;
until spans go somewhere they are not recorded (ids only: `_Sampler`), which saves
most of their cost (bench/telemetry_overhead.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import grpc.aio
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import (
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from threadline.config import TracingSettings

_TRACER = trace.get_tracer("threadline")
_IDS = RandomIdGenerator()
#: False once a process installed tracing switched off: its servers and channels get
#: no tracing interceptors (channels made before, or by clients, keep theirs).
_enabled = True
#: True once install() made the process's provider: its sampler is known (ParentBased
#: over `_ROOT`), so spans it would not record can be made as bare ids (`_ids_only`).
_own_provider = False
#: Endpoints already exported to, so a second stack in one process adds no second exporter.
_exporting: set[str] = set()
_UNTRACED_PREFIXES = ("/grpc.health.", "/grpc.reflection.")
TRACEPARENT_KEY = "traceparent"
_TRACESTATE_KEY = "tracestate"


#: Server spans with these codes are errors (the server failed, not the caller).
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
_PROPAGATOR = TraceContextTextMapPropagator()


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
    global _enabled, _own_provider
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
        _own_provider = True
    endpoint = settings.otlp_endpoint
    if endpoint and endpoint not in _exporting:
        # Imported here: the exporter pulls in its own gRPC stubs, needed only when exporting.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=endpoint, insecure=settings.otlp_insecure)
        provider.add_span_processor(BatchSpanProcessor(exporter))
        _exporting.add(endpoint)
    _ROOT.set(settings.sample_ratio, recording=_ROOT.recording or bool(_exporting))
    return provider


@contextlib.contextmanager
def server_span(method: str, metadata: Mapping[str, str | bytes]) -> Iterator[Span]:
    """The server span of an RPC to `method`, current while the block runs: in the
    caller's trace when its metadata carries one (`traceparent`), else a new one.

    Health and reflection get none: a span per kubelet probe would bury the turns.
    Made by the request context interceptor (threadline.interceptors), not by an
    interceptor of its own: each grpc.aio server interceptor costs every RPC a stage.
    """
    if not _enabled or method.startswith(_UNTRACED_PREFIXES):
        yield trace.INVALID_SPAN
        return
    caller = _remote_parent(metadata)
    if _ids_only(caller):
        with _current(_unrecorded(caller)) as span:
            yield span
        return
    parent = _PROPAGATOR.extract(metadata) if caller is not None else None
    service, _, name = method.lstrip("/").partition("/")
    with _TRACER.start_as_current_span(
        method,
        context=parent,
        kind=SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        yield span


def _ids_only(parent: SpanContext | None) -> bool:
    """Would a span under `parent` (None: a new trace) go unrecorded? Then it is made
    as bare ids (`_unrecorded`): the SDK's span costs a sampler call, attributes and
    an object each time, and a turn makes dozens. Known only for the provider made
    here, whose sampler follows the parent's sampled flag, else the ratio."""
    if not _own_provider:
        return False
    if parent is None:
        return not _ROOT.recording
    return not parent.trace_flags.sampled


def _unrecorded(parent: SpanContext | None) -> Span:
    """A span that is only ids: the parent's trace (or a new one), a new span id."""
    return trace.NonRecordingSpan(
        SpanContext(
            trace_id=parent.trace_id if parent is not None else _IDS.generate_trace_id(),
            span_id=_IDS.generate_span_id(),
            is_remote=False,
            trace_flags=TraceFlags(TraceFlags.DEFAULT),
            trace_state=parent.trace_state if parent is not None else None,
        )
    )


@contextlib.contextmanager
def _current(span: Span) -> Iterator[Span]:
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        yield span
    finally:
        otel_context.detach(token)


def _remote_parent(metadata: Mapping[str, str | bytes]) -> SpanContext | None:
    """The caller's span from its `traceparent` (W3C, version 00), if valid."""
    value = metadata.get(TRACEPARENT_KEY)
    if not isinstance(value, str):
        return None
    parts = value.split("-")
    if len(parts) != 4 or parts[0] != "00" or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None
    if not trace_id or not span_id or len(parts[3]) != 2:
        return None
    state = metadata.get(_TRACESTATE_KEY)
    return SpanContext(
        trace_id,
        span_id,
        is_remote=True,
        trace_flags=TraceFlags(flags),
        trace_state=TraceState.from_header([state]) if isinstance(state, str) else None,
    )


def rpc_ended(span: Span, code: grpc.StatusCode, details: str = "") -> None:
    """The status an RPC ended with, on its server span."""
    if not span.is_recording():
        return
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code in _SERVER_ERRORS:
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details}"[:256]))


#: Client spans being ended (a task the loop holds only weakly must be held here).
_ending: set[asyncio.Future[None]] = set()


class ClientSpan:
    """A recorded call's client span, ended (with the call's status) when the call is."""

    def __init__(self, span: Span) -> None:
        self.span = span

    def end_with(self, call: grpc.aio.Call) -> None:
        # A done callback cannot await the call's status, though it is there.
        task = asyncio.ensure_future(self._end(call))
        _ending.add(task)
        task.add_done_callback(_ending.discard)

    async def _end(self, call: grpc.aio.Call) -> None:
        code = await call.code()
        self.span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code != grpc.StatusCode.OK:
            self.span.set_status(Status(StatusCode.ERROR, f"{code.name}: {await call.details()}"))
        self.span.end()


def client_span(method: str, metadata: grpc.aio.Metadata) -> ClientSpan | None:
    """Put the trace context of a call to `method` in its `metadata`; the call's client
    span when it is recorded (the caller ends it with the call).

    A caller whose own span is not recorded (ids only, the default) passes that
    span's ids on, with no span of the call's own: nothing would record it. With
    no span current, or a recorded one, the call gets a client span, as the
    provider's sampler decides: a new trace, or a child of the caller's.
    """
    if not _enabled:
        return None
    current = trace.get_current_span().get_span_context()
    if current.is_valid and not current.trace_flags.sampled:
        _inject(current, metadata)
        return None
    if not current.is_valid and _ids_only(None):
        _inject(_unrecorded(None).get_span_context(), metadata)
        return None
    service, _, name = method.lstrip("/").partition("/")
    span = _TRACER.start_span(
        method,
        kind=SpanKind.CLIENT,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
    )
    _inject(span.get_span_context(), metadata)
    return ClientSpan(span) if span.is_recording() else None


def _inject(context: trace.SpanContext, metadata: grpc.aio.Metadata) -> None:
    """W3C trace context, as the propagator writes it (version 00)."""
    metadata.add(
        TRACEPARENT_KEY,
        f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}",
    )
    if context.trace_state:
        metadata.add(_TRACESTATE_KEY, context.trace_state.to_header())


def current_ids() -> tuple[str, str]:
    """Trace id and span id (hex) of the current span; empty strings outside any."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return "", ""
    return trace.format_trace_id(context.trace_id), trace.format_span_id(context.span_id)


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
    if _ids_only(None):
        with _current(_unrecorded(None)) as span:
            yield span
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
    current = trace.get_current_span()
    if not _enabled or not current.get_span_context().is_valid:
        return trace.INVALID_SPAN
    if _own_provider and not current.is_recording():
        return trace.INVALID_SPAN  # it would not be recorded either (ParentBased)
    return _TRACER.start_span(name, kind=SpanKind.INTERNAL, attributes=attributes)
