"""What threadline's interceptors add to one RPC, beside a bare grpc.aio call.

    python -m bench.rpc_overhead [--calls 3000] [--rounds 2]

Two measurements in this process, each CPU time (process_time) per call:

- a unary round trip (client and server in this process, loopback) through a
  bare server and channel; with the same metadata added by a grpc.aio client
  interceptor (how threadline added it before) and by threadline's channel
  (threadline.outgoing); and as threadline calls: its channel and its one
  server interceptor (request context, metrics and the server span: made, not
  recorded, the default);
- the server interceptor alone, called on a stand-in handler with no network:
  what it costs an RPC by itself.

Windows of the variants alternate, `--rounds` times, so drift on a shared
machine hits all alike; ratios are to the bare call.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import grpc
import grpc.aio

from threadline.config import TracingSettings
from threadline.interceptors import ServerContextInterceptor
from threadline.outgoing import OutgoingChannel
from threadline.telemetry import tracing
from threadline.v1 import session_pb2

METHOD = "/bench.Rpc/Get"
Request = session_pb2.SessionsGetRequest
REQUEST = Request(tenant="bench", session_id="s-0123456789")


async def _echo(request: Any, context: Any) -> Any:
    return request


def _handler() -> grpc.RpcMethodHandler[Any, Any]:
    return grpc.unary_unary_rpc_method_handler(
        _echo,
        request_deserializer=Request.FromString,
        response_serializer=Request.SerializeToString,
    )


class _MetadataInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Adds the same metadata as threadline's channel, the grpc.aio interceptor way
    (as threadline did before threadline.outgoing): what the interceptor costs."""

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        for entry in _METADATA:
            metadata.add(entry.key, entry.value)
        new = grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )
        return await continuation(new, request)


def _bare(channel: grpc.aio.Channel) -> grpc.aio.Channel:
    return channel


async def round_trips(
    server_interceptors: list[grpc.aio.ServerInterceptor],
    channel_interceptors: list[grpc.aio.ClientInterceptor],
    calls: int,
    wrap: Callable[[grpc.aio.Channel], grpc.aio.Channel] = _bare,
) -> float:
    """CPU microseconds per unary call, both sides."""
    server = grpc.aio.server(interceptors=server_interceptors)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("bench.Rpc", {"Get": _handler()}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = wrap(
        grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=channel_interceptors)
    )
    call = channel.unary_unary(
        METHOD,
        request_serializer=Request.SerializeToString,
        response_deserializer=Request.FromString,
    )
    try:
        for _ in range(100):  # warm-up: connection, caches
            await call(REQUEST)
        started = time.process_time()
        for _ in range(calls):
            await call(REQUEST)
        return (time.process_time() - started) / calls * 1e6
    finally:
        await channel.close()
        await server.stop(None)


class _Entry(NamedTuple):
    key: str
    value: str


_METADATA = (
    _Entry("x-request-id", "0123456789abcdef"),
    _Entry("traceparent", f"00-{'1' * 32}-{'2' * 16}-01"),
)


class _Details:
    """The handler call details an interceptor reads."""

    method = METHOD
    invocation_metadata = _METADATA


class _Context:
    """The servicer context an interceptor reads."""

    def invocation_metadata(self) -> tuple[_Entry, ...]:
        return _METADATA

    def code(self) -> None:
        return None

    def details(self) -> None:
        return None

    def peer(self) -> str:
        return "ipv4:127.0.0.1:50000"


async def alone(interceptor: grpc.aio.ServerInterceptor, calls: int) -> float:
    """CPU microseconds one server interceptor adds per unary RPC, no network."""
    handler: grpc.RpcMethodHandler[Any, Any] = grpc.unary_unary_rpc_method_handler(_echo)

    async def continuation(details: Any) -> grpc.RpcMethodHandler[Any, Any]:
        return handler

    details: Any = _Details()
    context: Any = _Context()
    started = time.process_time()
    for _ in range(calls):
        wrapped = await interceptor.intercept_service(continuation, details)
        assert wrapped is not None and wrapped.unary_unary is not None
        await wrapped.unary_unary(REQUEST, context)
    return (time.process_time() - started) / calls * 1e6


async def main(calls: int, rounds: int) -> None:
    tracing.install(TracingSettings(), "bench")
    context: list[grpc.aio.ServerInterceptor] = [ServerContextInterceptor("bench")]
    trips: dict[str, Callable[[], Awaitable[float]]] = {
        "bare grpc.aio": lambda: round_trips([], [], calls),
        "metadata by interceptor": lambda: round_trips([], [_MetadataInterceptor()], calls),
        "metadata by the channel": lambda: round_trips([], [], calls, OutgoingChannel),
        "threadline (ids only)": lambda: round_trips(context, [], calls, OutgoingChannel),
    }
    singles: dict[str, Callable[[], Awaitable[float]]] = {
        "ServerContextInterceptor": lambda: alone(ServerContextInterceptor("bench"), calls * 5),
    }
    results: dict[str, list[float]] = {name: [] for name in trips | singles}
    for _ in range(rounds):
        for name, measure in (trips | singles).items():
            results[name].append(await measure())
    print(f"CPU us per unary call, {calls} calls x {rounds} rounds (median of rounds)")
    bare = sorted(results["bare grpc.aio"])[rounds // 2]
    for name in trips:
        value = sorted(results[name])[rounds // 2]
        print(f"  round trip, {name:<28}{value:8.1f}   {value / bare:5.2f}x bare")
    for name in singles:
        print(f"  server interceptor alone, {name:<26}{sorted(results[name])[rounds // 2]:8.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.calls, args.rounds))
