"""An OTLP/gRPC trace receiver for tests and benchmarks: what a process exports.

async with OtlpCollector() as collector:   # listens on 127.0.0.1:<port>
    ... THREADLINE_TRACING__OTLP_ENDPOINT=collector.endpoint ...
    collector.spans                        # [(service.name, span name), ...]
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import grpc.aio
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class _Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, spans: list[tuple[str, str]]) -> None:
        self.spans = spans

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            attributes = resource_spans.resource.attributes
            service = next(
                (a.value.string_value for a in attributes if a.key == "service.name"), ""
            )
            for scope in resource_spans.scope_spans:
                self.spans += [(service, span.name) for span in scope.spans]
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpCollector:
    """Keeps (service.name, span name) of every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str]] = []
        self._server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _Receiver(self.spans), self._server
        )
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> OtlpCollector:
        await self._server.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._server.stop(0)
