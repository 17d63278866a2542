"""Spans leave a process over OTLP/gRPC when tracing.otlp_endpoint is set."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc.aio
import pytest

from tests.ports import free_ports
from tests.processes import threadline_environ, wait_healthy
from tests.waiting import eventually
from threadline.testing.otlp_collector import OtlpCollector
from threadline.v1 import session_pb2, session_pb2_grpc

pytestmark = pytest.mark.slow


async def test_a_service_exports_its_spans_to_the_configured_collector(tmp_path: Path) -> None:
    (session_port,) = free_ports(1)
    address = f"127.0.0.1:{session_port}"
    async with OtlpCollector() as collector:
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
                THREADLINE_TRACING__OTLP_ENDPOINT=collector.endpoint,
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
