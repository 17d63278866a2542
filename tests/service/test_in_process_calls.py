"""Calls served in the caller's process (threadline/in_process.py), as `threadline up`'s
services call each other: the same answers and errors as over gRPC, deadlines and
cancellation reach the handler, a stopped server takes no more calls, and no
connection is opened."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable

import grpc
import pytest

from services.llm_proxy.overhead import TRAILER
from tests.builders import TENANT, user
from threadline import errors
from threadline.channels import ChannelSecurity
from threadline.peers import LlmClient, SessionClient
from threadline.stack import Stack
from threadline.testing.fake_upstream import FakeUpstream, Script
from threadline.v1 import common_pb2, llm_pb2, session_pb2

IN_PROCESS = ChannelSecurity(in_process=True)


@pytest.fixture
async def clients(stack: Stack) -> AsyncIterator[tuple[SessionClient, SessionClient]]:
    """The session service over gRPC, and in process."""
    remote = SessionClient(stack.address("session"))
    local = SessionClient(stack.address("session"), IN_PROCESS)
    yield remote, local
    await remote.close()
    await local.close()


async def refusal(call: Awaitable[object]) -> errors.ThreadlineError:
    with pytest.raises(errors.ThreadlineError) as refused:
        await call
    return refused.value


def failing_calls(client: SessionClient, session_id: str) -> list[Awaitable[object]]:
    message = user("hello")
    return [
        client.append(TENANT, session_id, "0" * 64, [message]),  # a head that moved
        client.get(TENANT, "s-" + "9" * 26),  # unknown
        client.get("", session_id),  # invalid
        client.build_context(
            session_pb2.BuildContextRequest(tenant=TENANT, session_id=session_id, budget_tokens=0)
        ),
        client.append(  # over the 16 MiB message limit
            TENANT, session_id, "", [user("x" * (17 * 1024 * 1024))]
        ),
    ]


Refusal = tuple[type[errors.ThreadlineError], str, dict[str, str]]


def described(refused: errors.ThreadlineError, session_id: str, head: str) -> Refusal:
    """A refusal with this client's session id and head made generic."""

    def generic(text: str) -> str:
        return text.replace(session_id, "ID").replace(head, "HEAD")

    details = {key: generic(value) for key, value in refused.details.items()}
    return type(refused), generic(refused.message), details


async def test_answers_and_errors_are_the_same_as_over_grpc(
    clients: tuple[SessionClient, SessionClient],
) -> None:
    seen: list[tuple[str, str, list[Refusal]]] = []
    for client in clients:
        created = await client.create(session_pb2.SessionsCreateRequest(tenant=TENANT))
        head = (await client.append(TENANT, created.id, "", [user("hello")])).head
        refused = [await refusal(call) for call in failing_calls(client, created.id)]
        mismatch = refused[0]
        assert isinstance(mismatch, errors.HeadMismatch)
        assert mismatch.current_head == head  # rich error details survive
        seen.append((created.id, head, [described(e, created.id, head) for e in refused]))
    (remote_id, _, over_grpc), (local_id, _, in_process) = seen
    assert local_id != remote_id
    assert over_grpc[:-1] == in_process[:-1]
    # The message limit: the same code (gRPC's own text differs by side).
    assert over_grpc[-1][0] is in_process[-1][0] is errors.ResourceExhausted
    # Each client's session reads the same through the other.
    for client in clients:
        detail = await client.get(TENANT, local_id, include_messages=True)
        assert [m.content for m in detail.messages] == ["hello"]
    # In process, no connection was ever opened.
    assert clients[1].channel.get_state() == grpc.ChannelConnectivity.IDLE


async def test_a_request_is_a_copy_the_caller_may_change(
    clients: tuple[SessionClient, SessionClient],
) -> None:
    _, local = clients
    created = await local.create(session_pb2.SessionsCreateRequest(tenant=TENANT))
    message = user("first")
    stored = (await local.append(TENANT, created.id, "", [message])).messages
    message.content = "changed afterwards"
    stored[0].content = "changed too"
    detail = await local.get(TENANT, created.id, include_messages=True)
    assert [m.content for m in detail.messages] == ["first"]


def chat(text: str = "Tell me a story.") -> llm_pb2.ChatRequest:
    return llm_pb2.ChatRequest(
        model="fake-model",
        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=text)],
        tenant=TENANT,
    )


async def test_a_deadline_fails_the_call_and_stops_the_handler(
    stack: Stack, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.default = Script(tokens=100, token_delay_s=0.1)
    llm = LlmClient(stack.address("llm_proxy"), IN_PROCESS)
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(errors.DeadlineExceeded):
            async for _ in llm.stream_chat(chat(), timeout=0.5):
                pass
        assert asyncio.get_running_loop().time() - started < 2
        # The proxy stopped reading the model: its request was dropped.
        await fake_upstream.wait_for_disconnects(1, timeout=5)
    finally:
        await llm.close()


async def test_leaving_a_stream_cancels_it_at_the_server(
    stack: Stack, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.default = Script(tokens=100, token_delay_s=0.05)
    llm = LlmClient(stack.address("llm_proxy"), IN_PROCESS)
    try:
        async for chunk in llm.stream_chat(chat()):
            if chunk.WhichOneof("chunk") == "delta":
                break
        await fake_upstream.wait_for_disconnects(1, timeout=5)
    finally:
        await llm.close()


async def test_a_stopped_server_takes_no_more_calls(stack: Stack) -> None:
    local = SessionClient(stack.address("session"), IN_PROCESS)
    try:
        await local.create(session_pb2.SessionsCreateRequest(tenant=TENANT))
        await stack.stop(0.5)
        with pytest.raises(errors.Unavailable):
            await local.create(session_pb2.SessionsCreateRequest(tenant=TENANT))
    finally:
        await local.close()


async def test_trailing_metadata_reaches_the_caller(
    stack: Stack, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.default = Script(text="Hi.")
    llm = LlmClient(stack.address("llm_proxy"), IN_PROCESS)
    try:
        call = llm.stub.Chat(chat())
        assert (await call).message.content == "Hi."
        overhead = dict(await call.trailing_metadata())[TRAILER]
        assert isinstance(overhead, str) and float(overhead) >= 0
    finally:
        await llm.close()
