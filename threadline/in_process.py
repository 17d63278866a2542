"""Calls between services that share a process (`threadline up`), without the network.

Inside one process, gRPC's loopback cost a turn most of its CPU: every call was
framed in HTTP/2, sent through TCP and run through grpc.aio's callbacks on both
sides (docs/operations.md, "Capacity"). A service this process serves takes its
peers' calls here instead, and each call still behaves as one over gRPC:

- the request and the response are serialised and parsed as on the wire, so
  neither side holds a message the other may change, and the 16 MiB limit holds;
- the server's interceptors run (request context, metrics, server span, caller
  checks) and the handler runs in a task of its own, in a fresh context;
- a deadline cancels the handler and fails the call DEADLINE_EXCEEDED, a caller
  that cancels (or leaves a stream) cancels the handler, and a server that stops
  refuses new calls and cancels the rest after its grace period;
- failures reach the caller as the `grpc.aio.AioRpcError` gRPC would raise, with
  the same code, message and trailing metadata (rich error details included).

Only peers built for it use this (`ChannelSecurity.in_process`, set when TLS is
off: with TLS on, calls go over TLS as configured, in one process or not), and
only while a server of this process is registered under the peer's address; any
other call goes over the channel as before.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Sequence
from typing import Any, NamedTuple, TypeAlias, cast

import grpc
import grpc.aio

from threadline.wrapped_channel import Invoke, WrappedChannel

#: The largest message a call may carry, either way: over gRPC (the channels' and
#: servers' limit) and in process alike.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
Metadatum = tuple[str, str | bytes]
# A string: grpc's classes are generic only in its type stubs.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"

_servers: dict[str, LocalServer] = {}


def register(address: str, server: LocalServer) -> None:
    """Serve calls to `address` made in this process by in-process peers."""
    _servers[address] = server


def unregister(address: str, server: LocalServer) -> None:
    if _servers.get(address) is server:
        del _servers[address]


class _Details(NamedTuple):
    method: str
    invocation_metadata: tuple[Metadatum, ...]


class _Status(Exception):
    """How a call ended, when not OK."""

    def __init__(
        self, code: grpc.StatusCode, details: str, trailing: Sequence[Metadatum] = ()
    ) -> None:
        super().__init__(details)
        self.code, self.details, self.trailing = code, details, tuple(trailing)

    def rpc_error(self) -> grpc.aio.AioRpcError:
        return grpc.aio.AioRpcError(
            self.code, grpc.aio.Metadata(), grpc.aio.Metadata(*self.trailing), self.details
        )


class _Context:
    """The servicer context an in-process call's handler sees."""

    def __init__(self, metadata: tuple[Metadatum, ...], deadline: float | None) -> None:
        self._metadata = metadata
        self._deadline = deadline
        self._code: grpc.StatusCode | None = None
        self._details: str | None = None
        self._trailing: tuple[Metadatum, ...] = ()

    def invocation_metadata(self) -> tuple[Metadatum, ...]:
        return self._metadata

    def peer(self) -> str:
        return "in-process"

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - asyncio.get_running_loop().time())

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> None:
        self._code, self._details = code, details
        self._trailing = tuple(trailing_metadata or ())
        raise grpc.aio.AbortError()

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str | None:
        return self._details

    def set_trailing_metadata(self, trailing_metadata: Any) -> None:
        self._trailing = tuple(trailing_metadata)

    @property
    def trailing(self) -> tuple[Metadatum, ...]:
        return self._trailing

    def status(self) -> _Status | None:
        """The call's end, as the handler set it (None: OK)."""
        if self._code is None or self._code == grpc.StatusCode.OK:
            return None
        return _Status(self._code, self._details or "", self._trailing)


def _checked(message: bytes, direction: str) -> bytes:
    if len(message) > MAX_MESSAGE_BYTES:
        raise _Status(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{direction} message larger than max ({len(message)} vs. {MAX_MESSAGE_BYTES})",
        )
    return message


class LocalServer:
    """The handlers of one service's server, callable in its process."""

    def __init__(self, interceptors: Sequence[grpc.aio.ServerInterceptor]) -> None:
        self._interceptors = tuple(interceptors)
        self._methods: dict[str, Handler] = {}
        self._accepting = True
        self._calls: set[asyncio.Task[Any]] = set()

    # The two registration calls of generated `add_*Servicer_to_server` functions.
    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        """Generic handlers are served over gRPC only (health, reflection)."""

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Handler]) -> None:
        for name, handler in handlers.items():
            self._methods[f"/{service}/{name}"] = handler

    @property
    def accepting(self) -> bool:
        return self._accepting

    def start(self, call: Awaitable[Any]) -> asyncio.Task[Any]:
        """Run a call's server side in a task of its own, in a fresh context (as grpc
        runs a handler: nothing of the caller's context leaks into it)."""
        task = asyncio.get_running_loop().create_task(
            cast(Any, call), context=contextvars.Context()
        )
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)
        return task

    async def handler(self, method: str, metadata: tuple[Metadatum, ...]) -> Handler:
        """The method's handler as the server's interceptors wrap it."""
        details = cast(grpc.HandlerCallDetails, _Details(method, metadata))

        async def resolve(index: int, details: grpc.HandlerCallDetails) -> Handler | None:
            if index == len(self._interceptors):
                return self._methods.get(details.method)
            return await self._interceptors[index].intercept_service(
                lambda d: resolve(index + 1, d), details
            )

        handler = await resolve(0, details)
        if handler is None:
            raise _Status(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        return handler

    async def stop(self, grace_s: float | None) -> None:
        """Refuse new calls; cancel the running ones after `grace_s` (None: now)."""
        self._accepting = False
        running = set(self._calls)
        if running and grace_s:
            await asyncio.wait(running, timeout=grace_s)
        self.cancel_all()
        if running:
            await asyncio.wait(running)

    def cancel_all(self) -> None:
        for task in list(self._calls):
            task.cancel()


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else asyncio.get_running_loop().time() + timeout


async def _within(deadline: float | None, work: Awaitable[Any]) -> Any:
    """`work`, failed DEADLINE_EXCEEDED (and cancelled) at `deadline`."""
    if deadline is None:
        return await work
    try:
        async with asyncio.timeout_at(deadline):
            return await work
    except TimeoutError:
        raise _Status(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None


def _failure(exc: BaseException, context: _Context) -> _Status:
    if isinstance(exc, _Status):
        return exc
    if isinstance(exc, grpc.aio.AbortError):
        return context.status() or _Status(grpc.StatusCode.UNKNOWN, "aborted")
    return _Status(grpc.StatusCode.UNKNOWN, f"Unexpected {type(exc).__name__}: {exc}")


class _Call:
    """The caller's side of an in-process call: what grpc.aio's call objects offer."""

    def __init__(self, task: asyncio.Task[Any], context: _Context) -> None:
        self._task = task
        self._context = context

    def cancel(self) -> bool:
        return self._task.cancel()

    def cancelled(self) -> bool:
        return self._task.cancelled()

    def done(self) -> bool:
        return self._task.done()

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self._task.add_done_callback(lambda _: callback(self))

    def time_remaining(self) -> float | None:
        return None

    def _status(self) -> _Status | None:
        if self._task.cancelled():
            return _Status(grpc.StatusCode.CANCELLED, "Locally cancelled by application!")
        exc = self._task.exception()
        return exc if isinstance(exc, _Status) else None

    async def code(self) -> grpc.StatusCode:
        await asyncio.wait([self._task])
        status = self._status()
        return grpc.StatusCode.OK if status is None else status.code

    async def details(self) -> str:
        await asyncio.wait([self._task])
        status = self._status()
        return "" if status is None else status.details

    async def initial_metadata(self) -> grpc.aio.Metadata:
        return grpc.aio.Metadata()

    async def trailing_metadata(self) -> grpc.aio.Metadata:
        await asyncio.wait([self._task])
        status = self._status()
        trailing = status.trailing if status is not None else self._context.trailing
        return grpc.aio.Metadata(*trailing)

    async def wait_for_connection(self) -> None:
        return None


class _UnaryCall(_Call):
    def __init__(
        self, task: asyncio.Task[bytes], context: _Context, deserialize: Callable[[bytes], Any]
    ) -> None:
        super().__init__(task, context)
        self._deserialize = deserialize

    def __await__(self) -> Generator[Any, None, Any]:
        return self._response().__await__()

    async def _response(self) -> Any:
        try:
            return self._deserialize(await self._task)
        except _Status as status:
            raise status.rpc_error() from None
        except asyncio.CancelledError:
            if self._task.cancelled() and not _current_task_cancelling():
                raise _Status(
                    grpc.StatusCode.CANCELLED, "Locally cancelled by application!"
                ).rpc_error() from None
            raise


def _current_task_cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


_END = object()


class _StreamCall(_Call):
    def __init__(
        self,
        task: asyncio.Task[None],
        context: _Context,
        responses: asyncio.Queue[Any],
        deserialize: Callable[[bytes], Any],
    ) -> None:
        super().__init__(task, context)
        self._responses = responses
        self._deserialize = deserialize

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        while True:
            try:
                item = await self._responses.get()
            except asyncio.CancelledError:
                self.cancel()  # as grpc.aio: a reader cancelled cancels its call
                raise
            if item is _END:
                break
            yield self._deserialize(item)
        await asyncio.wait([self._task])
        status = self._status()
        if status is not None:
            raise status.rpc_error()

    async def read(self) -> Any:
        item = await self._responses.get()
        if item is _END:
            await asyncio.wait([self._task])
            status = self._status()
            if status is not None:
                raise status.rpc_error()
            return grpc.aio.EOF
        return self._deserialize(item)


class _Serving:
    """The server side of one in-process call, up to its handler's behaviour."""

    def __init__(
        self,
        server: LocalServer,
        method: str,
        request: bytes,
        metadata: tuple[Metadatum, ...],
        timeout: float | None,
    ) -> None:
        self.server, self.method, self.request, self.metadata = server, method, request, metadata
        self.deadline = _deadline(timeout)
        self.context = _Context(metadata, self.deadline)

    def start(self, call: Awaitable[Any]) -> asyncio.Task[Any]:
        return self.server.start(call)

    async def begin(self, kind: str) -> tuple[Any, Any]:
        """The handler (as interceptors wrap it) and the parsed request."""
        handler: Any = await self.server.handler(self.method, self.metadata)
        if getattr(handler, kind) is None:
            raise _Status(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        return handler, handler.request_deserializer(_checked(self.request, "Sent"))

    async def run(self, work: Callable[[], Awaitable[Any]]) -> Any:
        """`work`'s result, or the call's status as an exception (_Status)."""
        try:
            result = await work()
            failed = self.context.status()
            if failed is not None:
                raise failed
            return result
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise _failure(exc, self.context) from None


def start_unary(serving: _Serving, deserialize: Callable[[bytes], Any]) -> _UnaryCall:

    async def serve() -> bytes:
        handler, parsed = await serving.begin("unary_unary")
        response = await _within(serving.deadline, handler.unary_unary(parsed, serving.context))
        return _checked(handler.response_serializer(response), "Received")

    return _UnaryCall(serving.start(serving.run(serve)), serving.context, deserialize)


def start_stream(serving: _Serving, deserialize: Callable[[bytes], Any]) -> _StreamCall:
    # Unbounded: what a handler sends ahead of its reader is one answer at most.
    responses: asyncio.Queue[Any] = asyncio.Queue()

    async def relay(handler: Any, parsed: Any) -> None:
        stream = handler.unary_stream(parsed, serving.context)
        try:
            async for item in stream:
                await responses.put(_checked(handler.response_serializer(item), "Received"))
        finally:
            await stream.aclose()

    async def serve() -> None:
        handler, parsed = await serving.begin("unary_stream")
        await _within(serving.deadline, relay(handler, parsed))

    async def served() -> None:
        try:
            await serving.run(serve)
        finally:
            # The reader is told the stream ended, however it ended (its status is
            # the task's).
            responses.put_nowait(_END)

    return _StreamCall(serving.start(served()), serving.context, responses, deserialize)


def local_server(address: str) -> LocalServer | None:
    """The server of this process registered under `address`, while it takes calls."""
    server = _servers.get(address)
    return server if server is not None and server.accepting else None


class InProcessChannel(WrappedChannel):
    """A channel to `address` whose unary and server-streaming calls are served in
    this process while a server here is registered under that address; over the
    wrapped channel otherwise."""

    def __init__(self, channel: grpc.aio.Channel, address: str) -> None:
        super().__init__(channel)
        self._address = address

    def invoke_for(self, method: str, streaming: bool, serialize: Any, deserialize: Any) -> Invoke:
        start = start_stream if streaming else start_unary

        def invoke(
            inner: Any, request: Any, *, timeout: float | None, metadata: Any, **options: Any
        ) -> Any:
            server = local_server(self._address)
            if server is None:
                return inner(request, timeout=timeout, metadata=metadata, **options)
            sent = tuple((key, value) for key, value in (metadata or ()))
            return start(_Serving(server, method, serialize(request), sent, timeout), deserialize)

        return invoke

    async def channel_ready(self) -> None:
        if local_server(self._address) is None:
            await super().channel_ready()
