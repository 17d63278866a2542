"""Spans leave a process over OTLP/gRPC when tracing.otlp_endpoint is set."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import grpc.aio
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.ports import free_ports
from tests.processes import threadline_environ, wait_healthy
from tests.waiting import eventually
from threadline.v1 import session_pb2, session_pb2_grpc

pytestmark = pytest.mark.slow


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver: keeps (service.name, span name) of what it is sent."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str]] = []

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            attributes = resource_spans.resource.attributes
            service = next(a.value.string_value for a in attributes if a.key == "service.name")
            for scope in resource_spans.scope_spans:
                self.spans += [(service, span.name) for span in scope.spans]
        return trace_service_pb2.ExportTraceServiceResponse()


async def test_a_service_exports_its_spans_to_the_configured_collector(tmp_path: Path) -> None:
    collector = Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)  # type: ignore[no-untyped-call]
    collector_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    (session_port,) = free_ports(1)
    address = f"127.0.0.1:{session_port}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "threadline.cli",
        "serve",
        "session",
        env=threadline_environ(
            THREADLINE_DATA_DIR=str(tmp_path),
            THREADLINE_LOG_LEVEL="warning",
            THREADLINE_ADDRESSES__SESSION=address,
            THREADLINE_TRACING__OTLP_ENDPOINT=f"http://127.0.0.1:{collector_port}",
        ),
    )
    try:
        await wait_healthy(address)
        async with grpc.aio.insecure_channel(address) as channel:
            await session_pb2_grpc.SessionsStub(channel).Create(
                session_pb2.SessionsCreateRequest(tenant="acme")
            )
        # Spans are sent in batches, and what is left when the process stops.
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)

        def exported() -> bool:
            return ("threadline-session", "/threadline.v1.Sessions/Create") in collector.spans

        await eventually(exported, timeout=10)
        assert ("threadline-session", "store.create") in collector.spans
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await server.stop(0)
