"""gRPC interceptors: request context for logs, and the domain error boundary.

Server side, every RPC runs with rpc method, request id, tenant and session
bound in structlog's contextvars, and any `ThreadlineError` that escapes a
servicer becomes its gRPC status (see `threadline.status`). Anything else is a
bug: it is logged with its traceback and the caller gets INTERNAL with the
request id to quote. The same wrapper counts each RPC for Prometheus (status code,
duration, in flight) and puts the request id, tenant and session on the RPC's
server span (threadline.telemetry). Client side, the request id travels to the
next service with every call (threadline.outgoing).
"""

from __future__ import annotations

import asyncio
import inspect
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
import structlog
from opentelemetry.trace import Span

from threadline import errors
from threadline.logs import clip, get_logger
from threadline.status import abort_with, domain_error
from threadline.telemetry import metrics, tracing

REQUEST_ID_KEY = "x-request-id"
log = get_logger("threadline.rpc")


def _request_fields(request: object) -> dict[str, str]:
    """Tenant and session of a request, for the log context, when it names them.

    Bound before any check of the request (the API key's included), so clipped:
    every line of the RPC repeats them.
    """
    fields: dict[str, str] = {}
    for name in ("tenant", "session_id"):
        value = getattr(request, name, None)
        if isinstance(value, str) and value:
            fields[name] = clip(value)
    return fields


async def _fail(context: grpc.aio.ServicerContext[Any, Any], exc: Exception) -> None:
    error = domain_error(exc)
    if error is not None:
        log.info("rpc.error", code=error.code, error=error.message, cause=type(exc).__name__)
        await abort_with(context, error)
    request_id = structlog.contextvars.get_contextvars().get("request_id", "")
    log.error("rpc.internal_error", exc_info=exc)
    await abort_with(context, errors.Internal(f"internal error (request id {request_id})"))


class _Series:
    """One method's metrics: in flight from arrival, then its status code and duration.

    The label children are looked up once per method (a `labels()` call per RPC
    cost more than the counting itself)."""

    def __init__(self, service: str, method: str) -> None:
        self.labels = (service, method)
        self.in_flight = metrics.RPC_IN_FLIGHT.labels(service, method)
        self.seconds = metrics.RPC_SECONDS.labels(service, method)
        self.handled: dict[grpc.StatusCode, Any] = {}

    def start(self) -> float:
        self.in_flight.inc()
        return time.perf_counter()

    def end(
        self,
        started: float,
        context: grpc.aio.ServicerContext[Any, Any],
        error: BaseException | None,
    ) -> grpc.StatusCode:
        if isinstance(error, asyncio.CancelledError | GeneratorExit):
            code = grpc.StatusCode.CANCELLED
        elif isinstance(error, grpc.aio.AbortError) or error is None:
            # An abort (domain errors included, see _fail) left its code on the context.
            code = context.code() or grpc.StatusCode.OK
        else:
            code = grpc.StatusCode.UNKNOWN
        counter = self.handled.get(code)
        if counter is None:
            name = code.name if isinstance(code, grpc.StatusCode) else str(code)
            counter = self.handled[code] = metrics.RPC_HANDLED.labels(*self.labels, name)
        self.in_flight.dec()
        counter.inc()
        self.seconds.observe(time.perf_counter() - started)
        return code


Context = grpc.aio.ServicerContext[Any, Any]


class _Rpc:
    """One method's calls as the interceptor wraps them: the request context bound,
    a server span, metrics, and the error boundary."""

    def __init__(
        self, method: str, metadata: dict[str, Any], request_id: str, series: _Series
    ) -> None:
        self.method = method
        self.metadata = metadata
        self.request_id = request_id
        self.series = series

    def bind(self, request: object, span: Span) -> None:
        fields = _request_fields(request)
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(
            rpc_method=self.method, request_id=self.request_id, **fields
        )
        if span.is_recording():
            span.set_attributes(
                {"threadline.request_id": self.request_id}
                | {f"threadline.{key}": value for key, value in fields.items()}
            )

    def end(
        self, span: Span, started: float, context: Context, error: BaseException | None
    ) -> None:
        code = self.series.end(started, context, error)
        tracing.rpc_ended(span, code, context.details() or "")

    def unary(self, inner: Any) -> Callable[[object, Context], Awaitable[Any]]:
        async def unary(request: object, context: Context) -> Any:
            with tracing.server_span(self.method, self.metadata) as span:
                self.bind(request, span)
                started, error = self.series.start(), None
                try:
                    return await inner(request, context)
                except (asyncio.CancelledError, grpc.aio.AbortError) as exc:
                    error = exc
                    raise
                except Exception as exc:
                    error = grpc.aio.AbortError()
                    await _fail(context, exc)
                finally:
                    self.end(span, started, context, error)

        return unary

    def stream(self, inner: Any) -> Callable[[object, Context], AsyncIterator[Any]]:
        async def stream(request: object, context: Context) -> AsyncIterator[Any]:
            with tracing.server_span(self.method, self.metadata) as span:
                self.bind(request, span)
                started, error = self.series.start(), None
                try:
                    async for item in inner(request, context):
                        yield item
                except (asyncio.CancelledError, grpc.aio.AbortError, GeneratorExit) as exc:
                    error = exc
                    raise
                except Exception as exc:
                    error = grpc.aio.AbortError()
                    await _fail(context, exc)
                finally:
                    self.end(span, started, context, error)

        return stream


class ServerContextInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, service: str = "") -> None:
        #: The `service` label of this server's RPC metrics.
        self.service = service
        self._series: dict[str, _Series] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method: str = handler_call_details.method
        metadata = dict(handler_call_details.invocation_metadata or ())
        # Clipped here, not only in the log: it also travels on to the next service.
        request_id = clip(str(metadata.get(REQUEST_ID_KEY) or uuid.uuid4().hex))

        series = self._series.get(method)
        if series is None:
            series = self._series[method] = _Series(self.service, method)
        rpc = _Rpc(method, metadata, request_id, series)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                rpc.unary(handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            return grpc.unary_stream_rpc_method_handler(
                rpc.stream(handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        # Health Watch and reflection write through the context; they raise no domain errors.
        return handler
