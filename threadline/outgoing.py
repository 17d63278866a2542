"""What every call one service makes to another carries, added by its channel.

Three metadata entries: the request id (one id through a turn, see
`threadline.interceptors`), the W3C trace context (`threadline.telemetry.tracing`)
and the service token (`threadline.service_auth`). The channel adds them to each
call itself rather than through grpc.aio client interceptors: grpc.aio runs every
intercepted call in a task of its own and builds its details again per
interceptor, which cost a turn's dozen calls more CPU than the calls' own
metadata (`python -m bench.rpc_overhead`).
"""

from __future__ import annotations

import uuid
from types import TracebackType
from typing import Any, TypeVar

import grpc
import grpc.aio
import structlog

from threadline.interceptors import REQUEST_ID_KEY
from threadline.service_auth import TOKEN_KEY
from threadline.telemetry import tracing

Req = TypeVar("Req")
Resp = TypeVar("Resp")
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


class _UnaryUnary(grpc.aio.UnaryUnaryMultiCallable[Req, Resp]):
    def __init__(self, inner: Any, outgoing: _Outgoing) -> None:
        self._inner = inner
        self._outgoing = outgoing

    def __call__(
        self,
        request: Req,
        *,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> grpc.aio.UnaryUnaryCall[Req, Resp]:
        sent, span = self._outgoing.metadata(metadata)
        call: grpc.aio.UnaryUnaryCall[Req, Resp] = self._inner(
            request,
            timeout=timeout,
            metadata=sent,
            credentials=credentials,
            wait_for_ready=wait_for_ready,
            compression=compression,
        )
        if span is not None:
            call.add_done_callback(span.end_with)
        return call


class _UnaryStream(grpc.aio.UnaryStreamMultiCallable[Req, Resp]):
    def __init__(self, inner: Any, outgoing: _Outgoing) -> None:
        self._inner = inner
        self._outgoing = outgoing

    def __call__(
        self,
        request: Req,
        *,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> grpc.aio.UnaryStreamCall[Req, Resp]:
        sent, span = self._outgoing.metadata(metadata)
        call: grpc.aio.UnaryStreamCall[Req, Resp] = self._inner(
            request,
            timeout=timeout,
            metadata=sent,
            credentials=credentials,
            wait_for_ready=wait_for_ready,
            compression=compression,
        )
        if span is not None:
            call.add_done_callback(span.end_with)
        return call


class OutgoingChannel(grpc.aio.Channel):
    """A channel whose unary and server-streaming calls carry the request id, the
    trace context and the service token. Client-streaming calls (threadline makes
    none) go out as they are."""

    def __init__(self, channel: grpc.aio.Channel, token: str | None = None) -> None:
        self._channel = channel
        self._token = token

    def unary_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool = False,
    ) -> grpc.aio.UnaryUnaryMultiCallable[Any, Any]:
        inner = self._channel.unary_unary(  # type: ignore[call-arg]
            method, request_serializer, response_deserializer, _registered_method
        )
        return _UnaryUnary(inner, _Outgoing(method, self._token))

    def unary_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool = False,
    ) -> grpc.aio.UnaryStreamMultiCallable[Any, Any]:
        inner = self._channel.unary_stream(  # type: ignore[call-arg]
            method, request_serializer, response_deserializer, _registered_method
        )
        return _UnaryStream(inner, _Outgoing(method, self._token))

    def stream_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool = False,
    ) -> grpc.aio.StreamUnaryMultiCallable[Any, Any]:
        return self._channel.stream_unary(  # type: ignore[call-arg]
            method, request_serializer, response_deserializer, _registered_method
        )

    def stream_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool = False,
    ) -> grpc.aio.StreamStreamMultiCallable[Any, Any]:
        return self._channel.stream_stream(  # type: ignore[call-arg]
            method, request_serializer, response_deserializer, _registered_method
        )

    async def close(self, grace: float | None = None) -> None:
        await self._channel.close(grace)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._channel.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._channel.channel_ready()

    async def __aenter__(self) -> OutgoingChannel:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        await self._channel.close(None)
