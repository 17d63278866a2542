"""What every call one service makes to another carries, added by its channel.

Three metadata entries: the request id (one id through a turn, see
`threadline.interceptors`), the W3C trace context (`threadline.telemetry.tracing`)
and the service token (`threadline.service_auth`). The channel adds them to each
call itself rather than through grpc.aio client interceptors, which pass every
call through each interceptor in turn, building its details again each time:
with five of them (request id, service token, OpenTelemetry's) and OpenTelemetry's
server interceptor a unary call cost 1.53x a bare one; as made now, 1.35x
(`python -m bench.rpc_overhead`).
"""

from __future__ import annotations

import uuid
from typing import Any

import grpc
import grpc.aio
import structlog

from threadline.interceptors import REQUEST_ID_KEY
from threadline.service_auth import TOKEN_KEY
from threadline.telemetry import tracing
from threadline.wrapped_channel import Invoke, WrappedChannel

Metadata = grpc.aio.Metadata


class _Outgoing:
    """The metadata of calls to one method, and their client spans when recorded."""

    def __init__(self, method: str, token: str | None) -> None:
        self.method = method
        self.token = token

    def metadata(self, extra: Any) -> tuple[Metadata, tracing.ClientSpan | None]:
        metadata = Metadata(*extra) if extra else Metadata()
        if not metadata.get_all(REQUEST_ID_KEY):
            request_id = structlog.contextvars.get_contextvars().get("request_id")
            metadata.add(REQUEST_ID_KEY, str(request_id or uuid.uuid4().hex))
        if self.token:
            metadata.add(TOKEN_KEY, self.token)
        span = tracing.client_span(self.method, metadata)
        return metadata, span


class OutgoingChannel(WrappedChannel):
    """A channel whose unary and server-streaming calls carry the request id, the
    trace context and the service token. Client-streaming calls (threadline makes
    none) go out as they are."""

    def __init__(self, channel: grpc.aio.Channel, token: str | None = None) -> None:
        super().__init__(channel)
        self._token = token

    def invoke_for(self, method: str, streaming: bool, serialize: Any, deserialize: Any) -> Invoke:
        outgoing = _Outgoing(method, self._token)

        def invoke(inner: Any, request: Any, *, metadata: Any, **options: Any) -> Any:
            sent, span = outgoing.metadata(metadata)
            call = inner(request, metadata=sent, **options)
            if span is not None:
                call.add_done_callback(span.end_with)
            return call

        return invoke
