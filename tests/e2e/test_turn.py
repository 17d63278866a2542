"""One turn through gateway → executor → session / memory / llm_proxy → fake upstream."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from tests.conftest import OTHER_KEY
from tests.e2e.redis_events import next_types, subscribe
from tests.waiting import eventually
from threadline import errors
from threadline.client import GatewayClient
from threadline.events import EventKeys
from threadline.stack import Stack
from threadline.testing.fake_upstream import FakeUpstream, Script
from threadline.v1 import common_pb2


async def collect(client: GatewayClient, session_id: str, text: str) -> list[object]:
    return [event async for event in client.converse(session_id, text)]


async def test_turn_streams_stores_and_publishes(
    stack: Stack, gateway: GatewayClient, fake_upstream: FakeUpstream, redis_client: aioredis.Redis
) -> None:
    pubsub = await subscribe(redis_client, EventKeys.on(redis_client).channel("turn.*"))
    fake_upstream.default = Script(text="Hello there, traveller.")
    session = await gateway.create_session(system_prompt="Be brief.")

    events = [e async for e in gateway.converse(session.id, "Hi!")]

    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "started" and kinds[-1] == "done"
    assert "".join(e.delta for e in events if e.WhichOneof("event") == "delta") == (
        "Hello there, traveller."
    )
    done = events[-1].done
    assert done.finish_reason == common_pb2.FINISH_REASON_STOP
    assert done.usage.completion_tokens > 0 and done.model == "fake-model"

    detail = await gateway.get_session(session.id, verify_chain=True)
    assert detail.chain_verified
    assert [(m.role, m.content) for m in detail.messages] == [
        (common_pb2.ROLE_USER, "Hi!"),
        (common_pb2.ROLE_ASSISTANT, "Hello there, traveller."),
    ]
    assert detail.session.head == done.head == detail.messages[-1].hash
    sent = fake_upstream.chat_requests()[-1].body
    assert sent is not None and sent["messages"][0] == {"role": "system", "content": "Be brief."}

    assert await next_types(pubsub, 2) == ["turn.started", "turn.completed"]
    await pubsub.aclose()  # type: ignore[no-untyped-call]


async def test_a_caller_that_leaves_mid_answer_stops_the_model_and_keeps_what_it_saw(
    stack: Stack, gateway: GatewayClient, fake_upstream: FakeUpstream
) -> None:
    # Through the gateway, whose calls to the executor (and on to llm_proxy) are
    # made in process in a stack like this one: leaving cancels all the way down.
    fake_upstream.default = Script(tokens=200, token_delay_s=0.02)
    session = await gateway.create_session()
    seen = ""
    async for event in gateway.converse(session.id, "Tell me a long story."):
        seen += event.delta
        if seen.count("tok") >= 3:
            break

    await fake_upstream.wait_for_disconnects(1)  # the model stopped generating

    async def answer_stored() -> common_pb2.Message | None:
        messages = (await gateway.get_session(session.id)).messages
        return messages[-1] if len(messages) == 2 else None

    answer = await eventually(answer_stored)
    assert answer.interrupted and answer.content.startswith(seen)
    assert len(answer.content.split()) < 200
    # The session takes the next turn: nothing of the left one holds it.
    fake_upstream.default = Script(text="Again.")
    events = [e async for e in gateway.converse(session.id, "Once more.")]
    assert events[-1].WhichOneof("event") == "done"


async def test_second_concurrent_turn_is_aborted(
    stack: Stack, gateway: GatewayClient, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.default = Script(tokens=20, token_delay_s=0.05)
    session = await gateway.create_session()
    first = asyncio.create_task(collect(gateway, session.id, "one"))
    await fake_upstream.wait_for_requests(1)
    with pytest.raises(errors.Aborted, match="session busy"):
        await collect(gateway, session.id, "two")
    assert (await first)[-1].done.finish_reason == common_pb2.FINISH_REASON_STOP  # type: ignore[attr-defined]
    detail = await gateway.get_session(session.id)
    assert detail.messages[0].content == "one"
    assert len(detail.messages) == 2


async def test_wrong_key_is_unauthenticated(stack: Stack) -> None:
    async with GatewayClient(stack.address("gateway"), api_key="nope") as client:
        with pytest.raises(errors.Unauthenticated):
            await client.list_sessions()


async def test_other_tenants_session_is_not_found(stack: Stack, gateway: GatewayClient) -> None:
    session = await gateway.create_session()
    async with GatewayClient(stack.address("gateway"), api_key=OTHER_KEY) as other:
        with pytest.raises(errors.NotFound):
            await other.get_session(session.id)
        with pytest.raises(errors.NotFound):
            await collect(other, session.id, "hi")
    assert (await gateway.get_session(session.id)).messages == []


async def test_cut_stream_is_stored_as_interrupted(
    stack: Stack, gateway: GatewayClient, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.default = Script(tokens=10, fault="cut", fault_after=4)
    session = await gateway.create_session()

    events = await collect(gateway, session.id, "tell me a story")

    done = events[-1].done  # type: ignore[attr-defined]
    assert done.finish_reason == common_pb2.FINISH_REASON_INTERRUPTED
    assert done.content == "tok0 tok1 tok2 tok3 " and done.error
    detail = await gateway.get_session(session.id, verify_chain=True)
    answer = detail.messages[-1]
    assert answer.interrupted and answer.content == "tok0 tok1 tok2 tok3 "


async def test_upstream_down_fails_the_turn_but_keeps_the_input(
    stack: Stack, gateway: GatewayClient, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.default = Script.error(503, "overloaded")
    session = await gateway.create_session()
    with pytest.raises(errors.Unavailable, match="503"):
        await collect(gateway, session.id, "are you there?")
    assert len(fake_upstream.chat_requests()) == 3  # max_attempts in the test settings
    detail = await gateway.get_session(session.id)
    assert [m.content for m in detail.messages] == ["are you there?"]


@pytest.mark.parametrize(
    ("session_id", "text", "error", "message"),
    [
        (None, "", errors.InvalidArgument, "input is empty"),
        (None, "   ", errors.InvalidArgument, "input is empty"),
        (None, "x" * 2001, errors.InvalidArgument, "2001 characters; the limit is 2000"),
        ("ses_" + "0" * 32, "hi", errors.NotFound, "ses_0000"),
        ("../etc/passwd", "hi", errors.InvalidArgument, "malformed session id"),
        ("", "hi", errors.InvalidArgument, "session_id is required"),
    ],
)
async def test_bad_input_is_refused_and_nothing_is_stored(
    stack: Stack,
    gateway: GatewayClient,
    fake_upstream: FakeUpstream,
    session_id: str | None,
    text: str,
    error: type[errors.ThreadlineError],
    message: str,
) -> None:
    session = await gateway.create_session()
    with pytest.raises(error, match=message.replace("(", r"\(")):
        await collect(gateway, session.id if session_id is None else session_id, text)
    assert (await gateway.get_session(session.id)).messages == []
    assert fake_upstream.chat_requests() == []


async def test_watch_events_shows_own_tenant_only(
    stack: Stack, gateway: GatewayClient, fake_upstream: FakeUpstream
) -> None:
    async with GatewayClient(stack.address("gateway"), api_key=OTHER_KEY) as other:
        mine = await gateway.create_session()
        watch = gateway.watch_events(types=["turn.*", "session.created"])
        received: list[tuple[str, str]] = []

        async def read() -> None:
            async for event in watch:
                received.append((event.type, event.session_id))
                if event.type == "turn.completed" and event.session_id == mine.id:
                    return

        reader = asyncio.create_task(read())

        async def subscribed() -> bool:
            # The watch is live once it delivers an event published after it started.
            if not any(t == "session.created" for t, _ in received):
                await gateway.create_session(title="probe")
            return any(t == "session.created" for t, _ in received)

        await eventually(subscribed, interval=0.1)
        theirs = await other.create_session()
        await collect(other, theirs.id, "theirs")
        await collect(gateway, mine.id, "mine")
        await asyncio.wait_for(reader, 5)
    turns = [(t, s) for t, s in received if t.startswith("turn.")]
    assert turns == [("turn.started", mine.id), ("turn.completed", mine.id)]
    assert theirs.id not in {s for _, s in received}
