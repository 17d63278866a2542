"""Client side of inter-service gRPC: channels, and calls that raise domain errors.

`unary(...)` and `streaming(...)` turn a failed call into the typed
`ThreadlineError` the callee raised (see `threadline.status`), so domain code
in one service handles another's errors without touching grpc.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import grpc
import grpc.aio

from threadline.interceptors import client_interceptors
from threadline.status import from_rpc_error

T = TypeVar("T")

_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
]


def connect(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=_OPTIONS, interceptors=client_interceptors())


async def unary(call: Awaitable[T]) -> T:
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from None


async def streaming(call: grpc.aio.UnaryStreamCall[Any, T]) -> AsyncIterator[T]:
    """Items of a server stream; leaving early (break, cancel) cancels the call upstream."""
    try:
        async for item in call:
            yield item
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from None
    finally:
        call.cancel()
