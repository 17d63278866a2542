"""The turn's session writer against a real session service: whose appends go through.

A turn that holds its session's lease appends after a head that moved (another
client appended directly); a turn that lost its lease to another turn is refused
instead, so a stale holder never writes over the new owner's turn.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from services.executor.turns.detached import DetachedWrites
from services.executor.turns.drafts import Draft, RedisDrafts, store_draft
from services.executor.turns.writer import SessionWriter
from tests.builders import TENANT, assistant, user
from tests.conftest import make_settings
from tests.waiting import eventually
from threadline import errors
from threadline.config import Settings
from threadline.events import EventPublisher, InProcessEventBus
from threadline.leases import HeldLease, RedisLeases
from threadline.peers import SessionClient
from threadline.stack import Stack, start_stack
from threadline.v1 import common_pb2, session_pb2
from threadline.v1.events_pb2 import LifecycleEvent

PREFIX = "test:turn:"


@pytest.fixture
def settings(tmp_path: Path, redis_url: str) -> Settings:
    return make_settings(tmp_path, None, redis_url=redis_url)


@pytest.fixture
async def stack(settings: Settings, redis_client: aioredis.Redis) -> AsyncIterator[Stack]:
    running = await start_stack(settings, services=["session"], ephemeral_ports=True)
    yield running
    await running.stop(1.0)


@pytest.fixture
def writer(sessions: SessionClient) -> SessionWriter:
    return SessionWriter(sessions, DetachedWrites())


async def _session(sessions: SessionClient) -> tuple[str, str]:
    """A new session with one message; its id and head."""
    session = await sessions.create(session_pb2.SessionsCreateRequest(tenant=TENANT))
    appended = await sessions.append(TENANT, session.id, session.head, [user("hello")])
    return session.id, appended.head


async def _contents(sessions: SessionClient, session_id: str) -> list[str]:
    detail = await sessions.get(TENANT, session_id, include_messages=True)
    return [m.content for m in detail.messages]


async def _lease(redis_client: aioredis.Redis, session_id: str) -> HeldLease:
    held = await RedisLeases(redis_client, ttl_s=0.3, prefix=PREFIX).acquire(session_id)
    assert held is not None
    return held


async def test_a_holder_appends_after_a_direct_append(
    writer: SessionWriter, sessions: SessionClient, redis_client: aioredis.Redis
) -> None:
    session_id, head = await _session(sessions)
    lease = await _lease(redis_client, session_id)
    await sessions.append(TENANT, session_id, head, [user("a direct append")])

    await writer.append(TENANT, session_id, head, [assistant("the turn's answer")], "r-2", lease)

    assert await _contents(sessions, session_id) == [
        "hello",
        "a direct append",
        "the turn's answer",
    ]
    await lease.release()


async def test_a_holder_that_lost_its_lease_is_refused_and_writes_nothing(
    writer: SessionWriter, sessions: SessionClient, redis_client: aioredis.Redis
) -> None:
    session_id, head = await _session(sessions)
    lease = await _lease(redis_client, session_id)
    # The lease expired while this turn could not renew it; another turn took the
    # session and wrote its own answer.
    await redis_client.set(PREFIX + session_id, "the-other-turn")
    await eventually(lambda: lease.lost)
    await sessions.append(TENANT, session_id, head, [assistant("the other turn")])

    with pytest.raises(errors.Aborted, match="taken over by another turn"):
        await writer.append(TENANT, session_id, head, [assistant("stale answer")], "r-2", lease)

    assert await _contents(sessions, session_id) == ["hello", "the other turn"]
    await lease.release()


class _Published(InProcessEventBus):
    """A bus that keeps the types of what is published on it."""

    def __init__(self) -> None:
        super().__init__()
        self.types: list[str] = []

    def publish(self, event: LifecycleEvent) -> None:
        self.types.append(event.type)


async def test_a_dead_turns_draft_is_stored_once_as_interrupted_by_the_next_turn(
    sessions: SessionClient, redis_client: aioredis.Redis
) -> None:
    session_id, head = await _session(sessions)
    drafts = RedisDrafts(redis_client, prefix=PREFIX + "draft:")
    bus = _Published()
    events = EventPublisher(bus, "executor")
    await drafts.save(Draft(TENANT, session_id, head, "turn_dead", "The answer so"))

    assert await store_draft(drafts, sessions, events, session_id)
    # The draft is gone: a second look (the turn after) stores nothing more.
    assert not await store_draft(drafts, sessions, events, session_id)

    detail = await sessions.get(TENANT, session_id, include_messages=True)
    last = detail.messages[-1]
    assert [m.content for m in detail.messages] == ["hello", "The answer so"]
    assert last.role == common_pb2.ROLE_ASSISTANT and last.interrupted
    assert bus.types == ["turn.interrupted"]


async def test_a_draft_whose_turn_stored_its_answer_is_dropped(
    sessions: SessionClient, redis_client: aioredis.Redis
) -> None:
    session_id, head = await _session(sessions)
    drafts = RedisDrafts(redis_client, prefix=PREFIX + "draft:")
    await drafts.save(Draft(TENANT, session_id, head, "turn_done", "The answer so"))
    # The turn stored its whole answer and died before it could drop the draft.
    await sessions.append(TENANT, session_id, head, [assistant("The answer so far.")])

    assert not await store_draft(
        drafts, sessions, EventPublisher(_Published(), "executor"), session_id
    )

    assert await _contents(sessions, session_id) == ["hello", "The answer so far."]
    assert await drafts.get(session_id) is None
