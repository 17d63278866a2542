"""The session service as a real gRPC server on its SQLite file, with Redis events.

What callers get back, what ends up in the log (and its hash chain), and
which events are published, including under concurrent appends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.builders import TENANT, assistant, user
from tests.conftest import make_settings
from tests.service.conftest import EventRecorder, attrs
from threadline import errors
from threadline.config import Settings
from threadline.events import EventKeys
from threadline.peers import SessionClient
from threadline.stack import Stack, start_stack
from threadline.v1 import common_pb2, session_pb2

MAX_CHARS = 500
MISSING_ID = "ses_" + "0" * 32


@pytest.fixture
def settings(tmp_path: Path, redis_url: str) -> Settings:
    return make_settings(
        tmp_path, None, redis_url=redis_url, session={"max_message_chars": MAX_CHARS}
    )


@pytest.fixture
async def stack(settings: Settings, redis_client: aioredis.Redis) -> AsyncIterator[Stack]:
    running = await start_stack(settings, services=["session"], ephemeral_ports=True)
    yield running
    await running.stop(1.0)


async def create(
    sessions: SessionClient, tenant: str = TENANT, **fields: Any
) -> session_pb2.Session:
    return await sessions.create(session_pb2.SessionsCreateRequest(tenant=tenant, **fields))


async def stored(sessions: SessionClient, session_id: str) -> list[tuple[int, str]]:
    detail = await sessions.get(TENANT, session_id, include_messages=True)
    return [(m.role, m.content) for m in detail.messages]


def corrupt(settings: Settings, sql: str, *params: object) -> None:
    """Change the session database behind the service's back, as a disk or a person might."""
    with contextlib.closing(sqlite3.connect(settings.sqlite_path("session"))) as conn:
        conn.execute(sql, params)
        conn.commit()


# -- create, get, list -----------------------------------------------------------


async def test_create_then_get_returns_the_same_session(sessions: SessionClient) -> None:
    created = await create(
        sessions,
        model="fake-model",
        system_prompt="Be brief.",
        title="Trip planning",
        metadata={"channel": "slack"},
    )

    assert created.id.startswith("ses_") and len(created.id) == 36
    assert (created.tenant, created.head, created.message_count) == (TENANT, "", 0)
    detail = await sessions.get(TENANT, created.id, include_messages=True)
    assert detail.session == created
    assert dict(detail.session.metadata) == {"channel": "slack"}
    assert list(detail.messages) == []


async def test_list_shows_own_sessions_most_recently_updated_first(
    sessions: SessionClient,
) -> None:
    first = await create(sessions, title="first")
    second = await create(sessions, title="second")
    third = await create(sessions, title="third")
    await create(sessions, tenant="other", title="not mine")
    await sessions.append(TENANT, first.id, "", [user("bump")])

    listed = await sessions.list(TENANT)
    assert [s.title for s in listed.sessions] == ["first", "third", "second"]
    assert listed.next_page_token == ""

    page_one = await sessions.list(TENANT, page_size=2)
    page_two = await sessions.list(TENANT, page_size=2, page_token=page_one.next_page_token)
    assert [s.id for s in page_one.sessions] == [first.id, third.id]
    assert [s.id for s in page_two.sessions] == [second.id]
    assert page_two.next_page_token == ""


async def test_session_created_is_published_on_redis(
    sessions: SessionClient, redis_client: aioredis.Redis
) -> None:
    pubsub = redis_client.pubsub()
    keys = EventKeys.on(redis_client)
    await pubsub.psubscribe(keys.channel("*"))
    try:
        created = await create(sessions, title="watched")
        seen: list[dict[str, Any]] = []
        async with asyncio.timeout(5):
            while not any(e.get("session_id") == created.id for e in seen):
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                if message is not None:
                    assert message["channel"] == keys.channel(json.loads(message["data"])["type"])
                    seen.append(json.loads(message["data"]))
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
    (event,) = [e for e in seen if e["type"] == "session.created" and e["session_id"] == created.id]
    assert (event["tenant"], event["session_id"], event["service"]) == (
        TENANT,
        created.id,
        "session",
    )


# -- append and the hash chain ---------------------------------------------------


async def test_append_stores_messages_in_a_verified_chain(sessions: SessionClient) -> None:
    session = await create(sessions)

    first = await sessions.append(TENANT, session.id, "", [user("Hi"), assistant("Hello!")])
    second = await sessions.append(TENANT, session.id, first.head, [user("Bye")])

    assert [m.seq for m in first.messages] == [0, 1]
    assert second.messages[0].parent_hash == first.head == first.messages[1].hash
    detail = await sessions.get(TENANT, session.id, include_messages=True, verify_chain=True)
    assert detail.chain_verified
    assert detail.session.head == second.head == detail.messages[-1].hash
    assert detail.session.message_count == 3
    assert [(m.role, m.content) for m in detail.messages] == [
        (common_pb2.ROLE_USER, "Hi"),
        (common_pb2.ROLE_ASSISTANT, "Hello!"),
        (common_pb2.ROLE_USER, "Bye"),
    ]
    assert all(m.id.startswith("msg_") and m.token_count > 0 for m in detail.messages)
    tail = await sessions.messages_from(TENANT, session.id, 2)
    assert [m.content for m in tail] == ["Bye"]


async def test_append_with_a_stale_head_is_refused_with_the_current_head(
    sessions: SessionClient,
) -> None:
    session = await create(sessions)
    first = await sessions.append(TENANT, session.id, "", [user("one")])
    current = await sessions.append(TENANT, session.id, first.head, [assistant("two")])

    with pytest.raises(errors.HeadMismatch) as caught:
        await sessions.append(TENANT, session.id, first.head, [user("lost update?")])

    assert caught.value.current_head == current.head
    assert caught.value.code == "ABORTED"
    detail = await sessions.get(TENANT, session.id)
    assert detail.session.head == current.head and detail.session.message_count == 2
    assert await stored(sessions, session.id) == [
        (common_pb2.ROLE_USER, "one"),
        (common_pb2.ROLE_ASSISTANT, "two"),
    ]


@pytest.mark.parametrize(
    "tamper",
    [
        "UPDATE messages SET content = 'I never said that' WHERE session_id = ? AND seq = 1",
        "DELETE FROM messages WHERE session_id = ? AND seq = 1",
        "UPDATE sessions SET head = 'f00d' WHERE id = ?",
    ],
    ids=["content-edited", "message-deleted", "head-rewritten"],
)
async def test_tampered_log_fails_verification_with_data_loss(
    sessions: SessionClient, settings: Settings, tamper: str
) -> None:
    session = await create(sessions)
    await sessions.append(
        TENANT, session.id, "", [user("pay Bob 10"), assistant("done"), user("thanks")]
    )
    assert (await sessions.get(TENANT, session.id, verify_chain=True)).chain_verified

    corrupt(settings, tamper, session.id)

    with pytest.raises(errors.DataLoss):
        await sessions.get(TENANT, session.id, include_messages=True, verify_chain=True)


async def test_oversized_message_is_refused_and_nothing_is_stored(
    sessions: SessionClient,
) -> None:
    session = await create(sessions)

    with pytest.raises(errors.InvalidArgument, match=f"501 characters, the limit is {MAX_CHARS}"):
        await sessions.append(TENANT, session.id, "", [user("fine"), user("x" * (MAX_CHARS + 1))])

    assert await stored(sessions, session.id) == []
    assert (await sessions.get(TENANT, session.id)).session.head == ""
    # The exact limit is accepted.
    await sessions.append(TENANT, session.id, "", [user("x" * MAX_CHARS)])


async def test_tool_result_without_its_call_is_refused(sessions: SessionClient) -> None:
    session = await create(sessions)
    orphan = common_pb2.Message(
        role=common_pb2.ROLE_TOOL, content="42", tool_call_id="call_nowhere"
    )

    with pytest.raises(errors.InvalidArgument, match="call_nowhere"):
        await sessions.append(TENANT, session.id, "", [orphan])

    call = common_pb2.ToolCall(id="call_1", name="add", arguments_json='{"a": 40, "b": 2}')
    asking = common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, tool_calls=[call])
    answer = common_pb2.Message(role=common_pb2.ROLE_TOOL, content="42", tool_call_id="call_1")
    await sessions.append(TENANT, session.id, "", [asking, answer])
    assert len(await stored(sessions, session.id)) == 2


# -- tenants and ids --------------------------------------------------------------


async def test_another_tenants_session_is_not_found_like_a_missing_one(
    sessions: SessionClient,
) -> None:
    session = await create(sessions)
    await sessions.append(TENANT, session.id, "", [user("secret plans")])

    with pytest.raises(errors.NotFound) as theirs:
        await sessions.get("other", session.id, include_messages=True)
    with pytest.raises(errors.NotFound) as missing:
        await sessions.get("other", MISSING_ID)
    assert theirs.value.message == missing.value.message.replace(MISSING_ID, session.id)

    with pytest.raises(errors.NotFound):
        await sessions.append("other", session.id, session.head, [user("hijack")])
    with pytest.raises(errors.NotFound):
        await sessions.build_context(
            session_pb2.BuildContextRequest(
                tenant="other", session_id=session.id, budget_tokens=1000
            )
        )
    assert await stored(sessions, session.id) == [(common_pb2.ROLE_USER, "secret plans")]
    assert list((await sessions.list("other")).sessions) == []


@pytest.mark.parametrize("session_id", ["../etc/passwd", "ses_XYZ", "ses_" + "A" * 32])
async def test_malformed_session_id_is_invalid_argument(
    sessions: SessionClient, session_id: str
) -> None:
    with pytest.raises(errors.InvalidArgument, match="malformed session id"):
        await sessions.get(TENANT, session_id)
    with pytest.raises(errors.InvalidArgument, match="malformed session id"):
        await sessions.append(TENANT, session_id, "", [user("hi")])
    with pytest.raises(errors.InvalidArgument, match="malformed session id"):
        await sessions.build_context(
            session_pb2.BuildContextRequest(tenant=TENANT, session_id=session_id, budget_tokens=9)
        )


async def test_missing_tenant_is_invalid_argument(sessions: SessionClient) -> None:
    with pytest.raises(errors.InvalidArgument, match="tenant is required"):
        await create(sessions, tenant="")


# -- context building --------------------------------------------------------------


async def test_build_context_with_a_small_budget_drops_old_messages_and_says_so(
    sessions: SessionClient, events: EventRecorder
) -> None:
    session = await create(sessions, system_prompt="You are a travel agent.")
    history = []
    for i in range(10):
        history += [user(f"question {i}: " + "q" * 80), assistant(f"answer {i}: " + "a" * 80)]
    await sessions.append(TENANT, session.id, "", history)

    # Each message costs ceil(~92 / 4) + 4 = 27 tokens; the system prompt 10.
    built = await sessions.build_context(
        session_pb2.BuildContextRequest(
            tenant=TENANT, session_id=session.id, budget_tokens=200, reserve_output_tokens=50
        )
    )

    contents = [m.content for m in built.messages]
    assert built.messages[0].role == common_pb2.ROLE_SYSTEM
    assert contents[0] == "You are a travel agent."
    assert contents[1].startswith("question 0:")  # the first user message is kept
    assert contents[-1].startswith("answer 9:")  # then the newest suffix
    kept_from_log = len(built.messages) - 1
    assert 2 <= kept_from_log < 20
    assert built.dropped_count == 20 - kept_from_log
    assert built.token_estimate <= 150
    assert built.head == (await sessions.get(TENANT, session.id)).session.head
    # The suffix is contiguous: no hole between kept recent messages.
    recent = built.messages[2:]
    assert [m.seq for m in recent] == list(range(20 - len(recent), 20))

    (truncated,) = await events.wait_for("session.truncated", session_id=session.id)
    assert truncated.session_id == session.id and truncated.tenant == TENANT
    assert attrs(truncated)["dropped"] == built.dropped_count
    assert attrs(truncated)["budget_tokens"] == 200


async def test_build_context_that_fits_drops_nothing_and_publishes_nothing(
    sessions: SessionClient, events: EventRecorder
) -> None:
    session = await create(sessions, system_prompt="Be brief.")
    await sessions.append(TENANT, session.id, "", [user("Hi"), assistant("Hello")])

    built = await sessions.build_context(
        session_pb2.BuildContextRequest(
            tenant=TENANT,
            session_id=session.id,
            budget_tokens=4000,
            memory_summary="The user is called Ada.",
        )
    )

    assert [(m.role, m.content) for m in built.messages] == [
        (common_pb2.ROLE_SYSTEM, "Be brief."),
        (common_pb2.ROLE_SYSTEM, "Summary of earlier conversation:\nThe user is called Ada."),
        (common_pb2.ROLE_USER, "Hi"),
        (common_pb2.ROLE_ASSISTANT, "Hello"),
    ]
    assert built.dropped_count == 0
    await events.settle()
    assert events.of_type("session.truncated", session_id=session.id) == []


async def test_build_context_budget_smaller_than_the_system_prompt_is_refused(
    sessions: SessionClient,
) -> None:
    session = await create(sessions, system_prompt="A long system prompt. " * 20)
    with pytest.raises(errors.FailedPrecondition, match="context budget too small"):
        await sessions.build_context(
            session_pb2.BuildContextRequest(tenant=TENANT, session_id=session.id, budget_tokens=20)
        )
    with pytest.raises(errors.InvalidArgument, match="budget_tokens"):
        await sessions.build_context(
            session_pb2.BuildContextRequest(tenant=TENANT, session_id=session.id, budget_tokens=0)
        )


# -- concurrency -------------------------------------------------------------------


async def test_concurrent_appenders_each_land_exactly_once_in_a_valid_chain(
    sessions: SessionClient,
) -> None:
    session = await create(sessions)
    conflicts = 0

    async def append_one(i: int) -> None:
        nonlocal conflicts
        head = ""
        while True:
            try:
                await sessions.append(TENANT, session.id, head, [user(f"writer {i}")])
                return
            except errors.HeadMismatch as exc:
                conflicts += 1
                head = exc.current_head

    await asyncio.gather(*(append_one(i) for i in range(50)))

    detail = await sessions.get(TENANT, session.id, include_messages=True, verify_chain=True)
    assert detail.chain_verified
    contents = [m.content for m in detail.messages]
    assert sorted(contents) == sorted(f"writer {i}" for i in range(50))
    assert [m.seq for m in detail.messages] == list(range(50))
    assert detail.session.message_count == 50
    assert conflicts > 0  # they really did race
