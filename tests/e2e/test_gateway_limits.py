"""What the public API refuses, as an outside caller sees it: before anything is
stored, with short INVALID_ARGUMENT messages that name the field and its limit,
and without oversized request fields in the services' logs."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import grpc
import pytest
import structlog

from threadline import errors
from threadline.client import GatewayClient
from threadline.logs import configure_logging
from threadline.stack import Stack
from threadline.v1 import gateway_pb2, gateway_pb2_grpc

#: Longest refusal a caller should be handed for any oversized field.
SHORT = 300


@pytest.fixture
def service_log() -> Iterator[io.StringIO]:
    """Everything the in-process services log at info level while the test runs."""
    saved = structlog.get_config()
    buffer = io.StringIO()
    configure_logging("info")
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=buffer))
    yield buffer
    structlog.configure(**saved)


@pytest.mark.parametrize("api_key", ["test-key-acme", "wrong-key"])
async def test_a_megabyte_session_id_is_refused_and_barely_logged(
    stack: Stack, service_log: io.StringIO, api_key: str
) -> None:
    huge = "ses_" + "a" * 1_000_000
    async with GatewayClient(stack.address("gateway"), api_key=api_key) as client:
        before = service_log.tell()
        with pytest.raises(errors.ThreadlineError) as caught:
            await client.get_session(huge)

    expected = errors.InvalidArgument if api_key == "test-key-acme" else errors.Unauthenticated
    assert type(caught.value) is expected
    assert len(caught.value.message) < SHORT
    written = service_log.getvalue()[before:]
    assert "GetSession" in written  # the refusal is logged, with its request context
    assert len(written) < 8_000
    assert "a" * 200 not in written


async def test_a_long_memory_job_id_is_invalid_argument_with_a_short_message(
    gateway: GatewayClient,
) -> None:
    with pytest.raises(errors.InvalidArgument, match="job_id") as caught:
        await gateway.get_memory_job("job_" + "f" * 10_000)

    assert len(caught.value.message) < SHORT


@pytest.mark.parametrize(
    "call",
    [
        lambda g, long: g.get_task(long),
        lambda g, long: g.cancel_task(long),
        lambda g, long: g.watch_task(long).__anext__(),
    ],
)
async def test_a_long_task_id_is_invalid_argument_with_a_short_message(
    gateway: GatewayClient, call: Callable[[GatewayClient, str], Awaitable[object]]
) -> None:
    with pytest.raises(errors.InvalidArgument, match="task_id") as caught:
        await call(gateway, "task_" + "f" * 10_000)

    assert len(caught.value.message) < SHORT


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"title": "t" * 257}, "title is 257 characters; the limit is 256"),
        (
            {"metadata": {f"k{i}": "v" for i in range(33)}},
            "metadata has 33 entries; the limit is 32",
        ),
        ({"metadata": {"k" * 65: "v"}}, "metadata key is 65 characters; the limit is 64"),
        (
            {"metadata": {"k": "v" * 1025}},
            "metadata\\['k'\\] is 1025 characters; the limit is 1024",
        ),
        ({"metadata": {"k": "v" * 1_000_000}}, "the limit is 1024"),
        ({"model": "m" * 129}, "model is 129 characters; the limit is 128"),
    ],
)
async def test_an_oversized_title_or_metadata_is_refused_and_nothing_is_stored(
    gateway: GatewayClient, fields: dict[str, object], named: str
) -> None:
    before = await gateway.list_sessions()

    with pytest.raises(errors.InvalidArgument, match=named) as caught:
        await gateway.create_session(**fields)  # type: ignore[arg-type]

    assert len(caught.value.message) < SHORT
    assert list((await gateway.list_sessions()).sessions) == list(before.sessions)


async def test_title_and_metadata_at_their_limits_are_kept_one_past_refused(
    gateway: GatewayClient,
) -> None:
    metadata = {f"{i:02d}" + "k" * 62: "v" * 1024 for i in range(32)}

    session = await gateway.create_session(title="t" * 256, metadata=metadata)
    with pytest.raises(errors.InvalidArgument, match="metadata has 33 entries"):
        await gateway.create_session(metadata={**metadata, "one more": "v"})

    stored = (await gateway.get_session(session.id)).session
    assert stored.title == "t" * 256 and dict(stored.metadata) == metadata
    assert [s.id for s in (await gateway.list_sessions()).sessions] == [session.id]


@pytest.fixture
async def raw_gateway(stack: Stack) -> AsyncIterator[gateway_pb2_grpc.GatewayStub]:
    """The generated stub, for requests the client library has no argument for."""
    channel = grpc.aio.insecure_channel(stack.address("gateway"))
    yield gateway_pb2_grpc.GatewayStub(channel)
    await channel.close()


AUTH = (("authorization", "Bearer test-key-acme"),)


@pytest.mark.parametrize(
    ("method", "request_", "field"),
    [
        (
            "SubmitTask",
            gateway_pb2.SubmitTaskRequest(prompt="x", agent_type="a" * 10_000),
            "agent_type",
        ),
        (
            "SubmitTask",
            gateway_pb2.SubmitTaskRequest(prompt="x", workspace="w" * 10_000),
            "workspace",
        ),
        ("ListSessions", gateway_pb2.ListSessionsRequest(page_token="p" * 10_000), "page_token"),
        (
            "ForkSession",
            gateway_pb2.ForkSessionRequest(session_id="ses_" + "0" * 32, at_hash="h" * 10_000),
            "at_hash",
        ),
        ("WatchEvents", gateway_pb2.WatchEventsRequest(types=["t" * 10_000]), "types"),
        ("WatchEvents", gateway_pb2.WatchEventsRequest(types=["turn.*"] * 1000), "types"),
    ],
)
async def test_every_string_field_has_a_bound(
    raw_gateway: gateway_pb2_grpc.GatewayStub,
    method: str,
    request_: object,
    field: str,
) -> None:
    call = getattr(raw_gateway, method)(request_, metadata=AUTH, timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if method == "WatchEvents":
            await call.read()
        else:
            await call

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details() or ""
    assert field in details and len(details) < SHORT
