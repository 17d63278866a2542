"""Domain errors cross a real gRPC server and come back as the same typed errors."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import pytest
import redis.exceptions
import structlog

from threadline import errors
from threadline.channels import connect, streaming, unary
from threadline.interceptors import REQUEST_ID_KEY, ServerContextInterceptor
from threadline.status import from_rpc_error
from threadline.v1.llm_pb2 import ChatRequest

SERVICE = "threadline.test.Errors"
Request = ChatRequest  # any message with tenant and session_id fields


def _error_classes() -> list[type[errors.ThreadlineError]]:
    found: list[type[errors.ThreadlineError]] = []
    pending = list(errors.ThreadlineError.__subclasses__())
    while pending:
        cls = pending.pop()
        if cls is not errors.Retryable:  # a base for errors that carry RetryInfo, not an outcome
            found.append(cls)
        pending.extend(cls.__subclasses__())
    return sorted(found, key=lambda cls: cls.__name__)


def _make(cls: type[errors.ThreadlineError]) -> errors.ThreadlineError:
    if cls is errors.HeadMismatch:
        return errors.HeadMismatch("ses_1", "hash-expected", "hash-current")
    if issubclass(cls, errors.Retryable):
        return cls("slow down", retry_after_s=1.5, details={"limit": "10/min"})
    return cls(f"{cls.__name__} happened", details={"session_id": "ses_1", "why": "test"})


@dataclass
class Handlers:
    """What the test server does, and the log context it saw while doing it."""

    to_raise: list[BaseException] = field(default_factory=list)
    seen_context: list[dict[str, Any]] = field(default_factory=list)

    async def call(
        self, request: ChatRequest, context: grpc.aio.ServicerContext[ChatRequest, ChatRequest]
    ) -> ChatRequest:
        self.seen_context.append(structlog.contextvars.get_contextvars())
        if self.to_raise:
            raise self.to_raise.pop()
        return ChatRequest(model="ok")

    async def stream(
        self, request: ChatRequest, context: grpc.aio.ServicerContext[ChatRequest, ChatRequest]
    ) -> AsyncIterator[ChatRequest]:
        self.seen_context.append(structlog.contextvars.get_contextvars())
        yield ChatRequest(model="first")
        if self.to_raise:
            raise self.to_raise.pop()
        yield ChatRequest(model="second")


@dataclass
class Harness:
    handlers: Handlers
    channel: grpc.aio.Channel

    def call(self) -> grpc.aio.UnaryUnaryMultiCallable[ChatRequest, ChatRequest]:
        return self.channel.unary_unary(
            f"/{SERVICE}/Call",
            request_serializer=ChatRequest.SerializeToString,
            response_deserializer=ChatRequest.FromString,
        )

    def stream(self) -> grpc.aio.UnaryStreamMultiCallable[ChatRequest, ChatRequest]:
        return self.channel.unary_stream(
            f"/{SERVICE}/Stream",
            request_serializer=ChatRequest.SerializeToString,
            response_deserializer=ChatRequest.FromString,
        )

    async def fail_with(self, error: BaseException) -> grpc.aio.AioRpcError:
        self.handlers.to_raise.append(error)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await self.call()(Request(), timeout=5)
        return caught.value


async def create_server(handlers: Handlers) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(interceptors=[ServerContextInterceptor()])
    serialize: Callable[[ChatRequest], bytes] = ChatRequest.SerializeToString
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE,
                {
                    "Call": grpc.unary_unary_rpc_method_handler(
                        handlers.call,
                        request_deserializer=ChatRequest.FromString,
                        response_serializer=serialize,
                    ),
                    "Stream": grpc.unary_stream_rpc_method_handler(
                        handlers.stream,
                        request_deserializer=ChatRequest.FromString,
                        response_serializer=serialize,
                    ),
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    handlers = Handlers()
    server, port = await create_server(handlers)
    channel = connect(f"127.0.0.1:{port}")
    try:
        yield Harness(handlers, channel)
    finally:
        await channel.close()
        await server.stop(None)


def test_every_error_class_is_covered() -> None:
    names = {cls.__name__ for cls in _error_classes()}

    # A new error class must be added to this suite (and to errors.BY_CODE) on purpose.
    assert "HeadMismatch" in names
    assert names - {"HeadMismatch"} == {cls.__name__ for cls in errors.BY_CODE.values()}


@pytest.mark.parametrize("cls", _error_classes(), ids=lambda cls: cls.__name__)
async def test_error_round_trips_through_grpc(
    harness: Harness, cls: type[errors.ThreadlineError]
) -> None:
    sent = _make(cls)

    rpc_error = await harness.fail_with(sent)
    received = from_rpc_error(rpc_error)

    assert rpc_error.code() == grpc.StatusCode[cls.code]
    assert rpc_error.details() == sent.message
    assert type(received) is cls
    assert received.message == sent.message
    assert received.details == sent.details


async def test_head_mismatch_keeps_the_current_head(harness: Harness) -> None:
    rpc_error = await harness.fail_with(errors.HeadMismatch("ses_1", "h-old", "h-new"))
    received = from_rpc_error(rpc_error)

    assert rpc_error.code() == grpc.StatusCode.ABORTED
    assert isinstance(received, errors.HeadMismatch)
    assert received.current_head == "h-new"
    assert received.details["expected_head"] == "h-old"
    assert "ses_1" in received.message


async def test_head_mismatch_on_an_empty_session(harness: Harness) -> None:
    received = from_rpc_error(await harness.fail_with(errors.HeadMismatch("ses_1", "h-1", "")))

    assert isinstance(received, errors.HeadMismatch)
    assert received.current_head == ""


async def test_resource_exhausted_keeps_retry_after(harness: Harness) -> None:
    rpc_error = await harness.fail_with(errors.ResourceExhausted("busy", retry_after_s=2.25))
    received = from_rpc_error(rpc_error)

    assert rpc_error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert isinstance(received, errors.ResourceExhausted)
    assert received.retry_after_s == 2.25


async def test_resource_exhausted_without_retry_after(harness: Harness) -> None:
    received = from_rpc_error(await harness.fail_with(errors.ResourceExhausted("quota")))

    assert isinstance(received, errors.ResourceExhausted)
    assert received.retry_after_s is None


async def test_an_unreachable_redis_is_unavailable_with_retry_info_not_internal(
    harness: Harness,
) -> None:
    cause = redis.exceptions.ConnectionError("Error 111 connecting to 10.1.2.3:6379.")
    rpc_error = await harness.fail_with(cause)
    received = from_rpc_error(rpc_error)

    assert rpc_error.code() == grpc.StatusCode.UNAVAILABLE
    assert isinstance(received, errors.Unavailable)
    assert received.retry_after_s == 1.0
    assert "Redis" in received.message
    assert "10.1.2.3" not in received.message and "111" not in received.message


async def test_a_redis_timeout_in_a_stream_is_unavailable(harness: Harness) -> None:
    harness.handlers.to_raise.append(redis.exceptions.TimeoutError("Timeout reading from socket"))

    with pytest.raises(errors.Unavailable, match="Redis"):
        async for _ in streaming(harness.stream()(Request(), timeout=5)):
            pass


async def test_channels_unary_raises_the_domain_error(harness: Harness) -> None:
    harness.handlers.to_raise.append(errors.NotFound("no session ses_x"))

    with pytest.raises(errors.NotFound, match="no session ses_x"):
        await unary(harness.call()(Request(), timeout=5))


async def test_stream_delivers_items_then_the_domain_error(harness: Harness) -> None:
    harness.handlers.to_raise.append(errors.Unavailable("upstream gone"))
    received: list[str] = []

    with pytest.raises(errors.Unavailable, match="upstream gone"):
        async for item in streaming(harness.stream()(Request(), timeout=5)):
            received.append(item.model)

    assert received == ["first"]


async def test_unexpected_exception_becomes_internal_with_request_id(harness: Harness) -> None:
    harness.handlers.to_raise.append(KeyError("secret internals"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.call()(Request(), metadata=((REQUEST_ID_KEY, "req-boom"),), timeout=5)

    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "request id req-boom" in (caught.value.details() or "")
    assert "secret internals" not in (caught.value.details() or "")
    assert isinstance(from_rpc_error(caught.value), errors.Internal)


async def test_unexpected_exception_in_stream_becomes_internal(harness: Harness) -> None:
    harness.handlers.to_raise.append(RuntimeError("bug"))
    call = harness.stream()(Request(), metadata=((REQUEST_ID_KEY, "req-s"),), timeout=5)

    with pytest.raises(errors.Internal, match="request id req-s"):
        async for _ in streaming(call):
            pass


async def test_request_id_from_metadata_reaches_server_log_context(harness: Harness) -> None:
    request = Request(tenant="acme", session_id="ses_7")

    await harness.call()(request, metadata=((REQUEST_ID_KEY, "req-123"),), timeout=5)

    seen = harness.handlers.seen_context[-1]
    assert seen["request_id"] == "req-123"
    assert seen["rpc_method"] == f"/{SERVICE}/Call"
    assert (seen["tenant"], seen["session_id"]) == ("acme", "ses_7")


async def test_client_carries_its_current_request_id(harness: Harness) -> None:
    # A service calling the next one: the id bound for its own request travels on.
    with structlog.contextvars.bound_contextvars(request_id="req-upstream"):
        await harness.call()(Request(), timeout=5)

    assert harness.handlers.seen_context[-1]["request_id"] == "req-upstream"


async def test_client_carries_its_current_request_id_on_streams(harness: Harness) -> None:
    with structlog.contextvars.bound_contextvars(request_id="req-upstream"):
        async for _ in harness.stream()(Request(), timeout=5):
            pass

    assert harness.handlers.seen_context[-1]["request_id"] == "req-upstream"


async def test_request_without_id_gets_a_fresh_one(harness: Harness) -> None:
    with structlog.contextvars.bound_contextvars():
        structlog.contextvars.clear_contextvars()
        await harness.call()(Request(), timeout=5)
        await harness.call()(Request(), timeout=5)

    first, second = (seen["request_id"] for seen in harness.handlers.seen_context)
    assert first and second and first != second


async def test_server_context_does_not_leak_between_requests(harness: Harness) -> None:
    await harness.call()(Request(tenant="acme", session_id="ses_1"), timeout=5)
    await harness.call()(Request(), timeout=5)

    assert "tenant" not in harness.handlers.seen_context[-1]
    assert "session_id" not in harness.handlers.seen_context[-1]


async def test_unreachable_peer_is_unavailable() -> None:
    # Nothing listens on port 1: callers see a retryable Unavailable, not a grpc error.
    channel = connect("127.0.0.1:1")
    try:
        call = channel.unary_unary(
            f"/{SERVICE}/Call",
            request_serializer=ChatRequest.SerializeToString,
            response_deserializer=ChatRequest.FromString,
        )
        with pytest.raises(errors.Unavailable):
            await unary(call(Request(), timeout=5))
    finally:
        await channel.close()


async def test_unimplemented_method_is_a_typed_error(harness: Harness) -> None:
    call = harness.channel.unary_unary(
        f"/{SERVICE}/Missing",
        request_serializer=ChatRequest.SerializeToString,
        response_deserializer=ChatRequest.FromString,
    )

    with pytest.raises(errors.ThreadlineError):
        await unary(call(Request(), timeout=5))


def test_grpcs_own_errors_reach_callers_without_peer_addresses() -> None:
    refused = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        details="connections to all backends failing; last error: UNKNOWN: "
        "ipv4:10.1.2.3:50052: Failed to connect to remote host: Connection refused",
    )

    error = from_rpc_error(refused)

    assert isinstance(error, errors.Unavailable)
    assert "10.1.2.3" not in error.message and "50052" not in error.message
    assert "Connection refused" in error.message


async def test_an_error_echoing_a_huge_input_arrives_as_itself_and_short(
    harness: Harness,
) -> None:
    # Past gRPC's header limit the caller would get RESOURCE_EXHAUSTED instead.
    echoed = "é" * 20_000
    harness.handlers.to_raise.append(
        errors.InvalidArgument(f"bad id {echoed}", details={"id": echoed})
    )

    with pytest.raises(errors.InvalidArgument) as caught:
        await unary(harness.call()(Request(), timeout=5))

    assert caught.value.message.startswith("bad id éé")
    assert len(caught.value.message.encode()) < 1200
    assert len(caught.value.details["id"].encode()) < 400


async def test_a_peer_error_naming_a_store_address_reaches_callers_without_it(
    harness: Harness,
) -> None:
    harness.handlers.to_raise.append(
        errors.Unavailable("task store: Error 111 connecting to redis-0.internal:6379. Refused.")
    )

    with pytest.raises(errors.Unavailable) as caught:
        await unary(harness.call()(Request(), timeout=5))

    assert "redis-0.internal" not in caught.value.message and "6379" not in caught.value.message
    assert caught.value.message.startswith("task store: Error 111 connecting to")


async def test_oversized_request_fields_are_clipped_in_the_log_context(harness: Harness) -> None:
    request = Request(tenant="t" * 100_000, session_id="s" * 1_000_000)

    await harness.call()(request, metadata=((REQUEST_ID_KEY, "r" * 6000),), timeout=5)

    seen = harness.handlers.seen_context[-1]
    for name in ("tenant", "session_id", "request_id"):
        assert len(seen[name]) < 200
    assert seen["session_id"].startswith("s" * 128) and "1000000 chars" in seen["session_id"]
