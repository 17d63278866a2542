"""What the chosen stack costs before threadline does anything.

    python -m bench.stack_floor

Two floors under bench.proxy_overhead's figures, measured on this machine:

- gRPC (grpcio asyncio): a bare servicer with no interceptors in its own
  process: unary round trip p50, and server CPU per streaming call and per
  streamed message with 64 calls at once;
- HTTP client: CPU to read one streamed 256-token answer from the fake upstream
  (SSE split, one JSON decode per event) with httpx and with aiohttp, 64 at once.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import grpc
import grpc.aio
import httpx
import orjson

from bench.processes import cpu_seconds, free_port, process, wait_http
from threadline.v1 import llm_pb2, llm_pb2_grpc

CALLS = 64
ROUNDS = 20
DELTA = "tok " * 9


class BareServicer(llm_pb2_grpc.LlmProxyServicer):
    async def ListModels(self, request: llm_pb2.ListModelsRequest, context: Any) -> Any:
        return llm_pb2.ListModelsResponse()

    async def Chat(self, request: llm_pb2.ChatRequest, context: Any) -> Any:
        return llm_pb2.ChatResponse()

    async def StreamChat(
        self, request: llm_pb2.ChatRequest, context: Any
    ) -> AsyncIterator[llm_pb2.ChatChunk]:
        for _ in range(request.max_tokens):
            yield llm_pb2.ChatChunk(delta=DELTA)


async def serve(port: int) -> None:
    server = grpc.aio.server()
    llm_pb2_grpc.add_LlmProxyServicer_to_server(BareServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def grpc_floor() -> None:
    port = free_port()
    server = (sys.executable, "-m", "bench.stack_floor", "--serve", str(port))
    async with (
        process(*server) as pid,
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
    ):
        stub = llm_pb2_grpc.LlmProxyStub(channel)
        # A bare server has no health service: wait for the call itself.
        await stub.ListModels(llm_pb2.ListModelsRequest(), wait_for_ready=True, timeout=10)
        trips = []
        for _ in range(550):
            started = time.perf_counter()
            await stub.ListModels(llm_pb2.ListModelsRequest())
            trips.append((time.perf_counter() - started) * 1000)
        print(f"gRPC unary round trip p50: {statistics.median(trips[50:]):.2f} ms")

        async def streams(messages: int) -> float:
            request = llm_pb2.ChatRequest(max_tokens=messages)

            async def one() -> None:
                async for _chunk in stub.StreamChat(request):
                    pass

            before = cpu_seconds(pid)
            for _ in range(ROUNDS):
                await asyncio.gather(*(one() for _ in range(CALLS)))
            return cpu_seconds(pid) - before

        await streams(1)  # warm-up
        one_message = await streams(1)
        many = await streams(100)
        calls = CALLS * ROUNDS
        per_call = one_message / calls
        per_message = (many - one_message) / (calls * 99)
        print(
            f"gRPC server CPU, {CALLS} calls at once: {per_call * 1e6:.0f} us a call, "
            f"{per_message * 1e6:.0f} us a streamed message"
        )


def count_tokens(pending: bytes, chunk: bytes) -> tuple[int, bytes]:
    *events, pending = (pending + chunk).split(b"\n\n")
    tokens = 0
    for event in events:
        if event.startswith(b"data: {") and orjson.loads(event[6:])["choices"]:
            tokens += 1
    return tokens, pending


async def http_floor() -> None:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    url = f"{base_url}/chat/completions"
    body = {"model": "fake-model", "stream": True, "messages": [{"role": "user", "content": "go"}]}
    fake = ("-m", "threadline.testing.fake_upstream", "--port", str(port), "--tokens", "256")
    async with process(sys.executable, *fake):
        await wait_http(f"{base_url}/models")
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
        async with (
            httpx.AsyncClient(limits=limits, timeout=60) as hx,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as ah,
        ):

            async def with_httpx() -> None:
                pending = b""
                async with hx.stream("POST", url, json=body) as response:
                    async for chunk in response.aiter_raw():
                        _, pending = count_tokens(pending, chunk)

            async def with_aiohttp() -> None:
                pending = b""
                async with ah.post(url, json=body) as response:
                    async for chunk in response.content.iter_any():
                        _, pending = count_tokens(pending, chunk)

            async def cpu_per_answer(once: Callable[[], Awaitable[None]]) -> float:
                await asyncio.gather(*(once() for _ in range(8)))  # warm-up
                before = time.process_time()
                for _ in range(ROUNDS // 2):
                    await asyncio.gather(*(once() for _ in range(CALLS)))
                return (time.process_time() - before) / (CALLS * ROUNDS // 2)

            # Alternate so both see the same machine.
            results: dict[str, list[float]] = {"httpx": [], "aiohttp": []}
            for _ in range(2):
                results["httpx"].append(await cpu_per_answer(with_httpx))
                results["aiohttp"].append(await cpu_per_answer(with_aiohttp))
            hx_ms = statistics.mean(results["httpx"]) * 1000
            ah_ms = statistics.mean(results["aiohttp"]) * 1000
            print(
                f"HTTP client CPU per 256-token answer, {CALLS} at once: httpx {hx_ms:.2f} ms, "
                f"aiohttp {ah_ms:.2f} ms ({hx_ms / ah_ms:.1f}x)"
            )


async def main() -> None:
    await grpc_floor()
    await http_floor()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    asyncio.run(serve(args.serve) if args.serve else main())
