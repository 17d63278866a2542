"""A grpc.aio channel that changes how calls are made and passes everything else on.

Threadline wraps its channels twice (threadline.channels): to add every call's
metadata (threadline.outgoing) and to serve calls in process when it can
(threadline.in_process). Both replace only the unary and server-streaming
methods, the only kinds threadline calls; the rest is this class.
"""

from __future__ import annotations

from typing import Any, Protocol, cast

import grpc
import grpc.aio


class Invoke(Protocol):
    """How a wrapper makes one call of `inner` (the wrapped channel's method)."""

    def __call__(
        self,
        inner: Any,
        request: Any,
        *,
        timeout: float | None,
        metadata: Any,
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
        compression: grpc.Compression | None,
    ) -> Any: ...


class _Method:
    """A unary-request method of the wrapped channel, called through `invoke`."""

    def __init__(self, inner: Any, invoke: Invoke) -> None:
        self._inner = inner
        self._invoke = invoke

    def __call__(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return self._invoke(
            self._inner,
            request,
            timeout=timeout,
            metadata=metadata,
            credentials=credentials,
            wait_for_ready=wait_for_ready,
            compression=compression,
        )


class WrappedChannel(grpc.aio.Channel):
    """Passes everything to `channel`; a subclass's `invoke` makes its unary and
    server-streaming calls, given `method` (the full method name)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel

    def invoke_for(self, method: str, streaming: bool, serialize: Any, deserialize: Any) -> Invoke:
        """How calls of `method` are made; `serialize` and `deserialize` are its
        request serialiser and response parser."""
        raise NotImplementedError

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
        invoke = self.invoke_for(method, False, request_serializer, response_deserializer)
        return cast(grpc.aio.UnaryUnaryMultiCallable[Any, Any], _Method(inner, invoke))

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
        invoke = self.invoke_for(method, True, request_serializer, response_deserializer)
        return cast(grpc.aio.UnaryStreamMultiCallable[Any, Any], _Method(inner, invoke))

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

    async def __aenter__(self) -> WrappedChannel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._channel.close(None)
