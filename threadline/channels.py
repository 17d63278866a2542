"""Client side of inter-service gRPC: channels, and calls that raise domain errors.

`unary(...)` and `streaming(...)` turn a failed call into the typed
`ThreadlineError` the callee raised (see `threadline.status`), so domain code
in one service handles another's errors without touching grpc.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import grpc.aio

from threadline.in_process import MAX_MESSAGE_BYTES, InProcessChannel
from threadline.outgoing import OutgoingChannel
from threadline.status import from_rpc_error

T = TypeVar("T")

#: Calls that are safe to send again after UNAVAILABLE (a replica died or was not
#: reachable): reads, appends (the request id makes a repeat a no-op) and memory
#: jobs (one active job per session, so a repeat joins the first). Turns and
#: model calls are not here: a second model call is not the same call.
_RETRIED = {
    "threadline.v1.Sessions": ["Get", "List", "Append", "BuildContext", "Export", "Calibrate"],
    "threadline.v1.Memory": ["Recall", "GetJob", "Consolidate", "Extract", "Compact"],
}

#: Round robin over every address a target resolves to (each replica behind a
#: headless Service, or an `ipv4:` list), so a new replica takes calls as soon
#: as its connection is up rather than when a sticky connection ends.
_SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [{"service": service, "method": method} for method in methods],
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.1s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
        for service, methods in _RETRIED.items()
    ],
}

_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.service_config", json.dumps(_SERVICE_CONFIG)),
    # A replica that was down is tried again within a second, not after grpc's
    # default backoff, which grows to two minutes.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    # A dns:/// name is looked up again when a connection ends (servers end them
    # after 30 s); gRPC would otherwise wait 30 s between lookups on top of that.
    ("grpc.dns_min_time_between_resolutions_ms", 5_000),
]


@dataclass(frozen=True)
class ChannelSecurity:
    """How a channel proves itself and checks its server (threadline.transport builds it)."""

    #: TLS credentials; None is plaintext.
    credentials: grpc.ChannelCredentials | None = None
    #: Service token sent with every call (threadline.service_auth); None sends none.
    token: str | None = None
    #: Name the server's certificate must carry instead of the address's host.
    server_name: str = ""
    #: Calls to a service this process serves skip the network (threadline.in_process).
    in_process: bool = False


def connect(address: str, security: ChannelSecurity | None = None) -> grpc.aio.Channel:
    """A channel to `address`: host:port, dns:///host:port, or ipv4:host:port,host:port,...

    Plaintext without `security`, or with `security` that holds no credentials.
    """
    security = security or ChannelSecurity()
    options = list(_OPTIONS)
    if security.server_name:
        options.append(("grpc.ssl_target_name_override", security.server_name))
    if security.credentials is None:
        channel = grpc.aio.insecure_channel(address, options=options)
    else:
        channel = grpc.aio.secure_channel(address, security.credentials, options=options)
    if security.in_process:
        channel = InProcessChannel(channel, address)
    # Request id, trace context and service token ride on every call (threadline.outgoing).
    return OutgoingChannel(channel, security.token)


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
