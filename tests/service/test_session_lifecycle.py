"""Fork, delete, export/import, idempotent append, retention and calibration through
the real session server, on every backend (SQLite file, shared Redis, PostgreSQL)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.builders import TENANT, assistant, user
from tests.conftest import make_settings
from tests.postgres_schema import postgres_schema_outside_loop
from tests.service.conftest import EventRecorder, private_stack
from threadline import errors
from threadline.config import Settings
from threadline.events import InProcessEventBus
from threadline.peers import SessionClient
from threadline.stack import Stack, start_stack
from threadline.v1 import common_pb2, session_pb2


def _database(request: pytest.FixtureRequest) -> Iterator[str]:
    """`session.database` for the backend in request.param; PostgreSQL in a fresh schema."""
    if request.param == "sqlite":
        yield ""
    elif request.param == "redis":
        yield request.getfixturevalue("redis_url")
    else:
        with postgres_schema_outside_loop(request.getfixturevalue("postgres_url")) as url:
            yield url


@pytest.fixture(params=["sqlite", "redis", "postgresql"])
def database(request: pytest.FixtureRequest) -> Iterator[str]:
    yield from _database(request)


@pytest.fixture(params=["redis", "postgresql"])
def shared_database(request: pytest.FixtureRequest) -> Iterator[str]:
    """A backend several session servers can share."""
    yield from _database(request)


def session_settings(tmp_path: Path, redis_url: str, database: str, **session: object) -> Settings:
    return make_settings(
        tmp_path, None, redis_url=redis_url, session={"database": database, **session}
    )


@pytest.fixture
async def stack(
    tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, database: str
) -> AsyncIterator[Stack]:
    async with private_stack(session_settings(tmp_path, redis_url, database), ["session"]) as s:
        yield s


async def new_session(sessions: SessionClient, *contents: str) -> tuple[str, str]:
    session = await sessions.create(session_pb2.SessionsCreateRequest(tenant=TENANT, title="t"))
    head = session.head
    for i, content in enumerate(contents):
        message = user(content) if i % 2 == 0 else assistant(content)
        head = (await sessions.append(TENANT, session.id, head, [message])).head
    return session.id, head


async def test_fork_keeps_the_prefix_and_leaves_the_original_alone(
    sessions: SessionClient, events: EventRecorder
) -> None:
    session_id, _ = await new_session(sessions, "q1", "a1", "q2", "a2")
    original = await sessions.get(TENANT, session_id, include_messages=True)
    at = original.messages[1]

    fork = await sessions.fork(TENANT, session_id, at.hash)
    await sessions.append(TENANT, fork.id, fork.head, [user("another way")])

    forked = await sessions.get(TENANT, fork.id, include_messages=True, verify_chain=True)
    again = await sessions.get(TENANT, session_id, include_messages=True, verify_chain=True)
    assert fork.forked_from == session_id and fork.head == at.hash
    assert [m.hash for m in forked.messages[:2]] == [m.hash for m in original.messages[:2]]
    assert [m.content for m in forked.messages] == ["q1", "a1", "another way"]
    assert [m.content for m in again.messages] == ["q1", "a1", "q2", "a2"]
    (forked_event,) = await events.wait_for("session.forked")
    assert forked_event.session_id == fork.id


async def test_fork_at_an_unknown_hash_is_not_found(sessions: SessionClient) -> None:
    session_id, _ = await new_session(sessions, "q1")
    with pytest.raises(errors.NotFound):
        await sessions.fork(TENANT, session_id, "f" * 64)


async def test_delete_removes_the_session_and_publishes(
    sessions: SessionClient, events: EventRecorder
) -> None:
    session_id, _ = await new_session(sessions, "q1", "a1")
    await sessions.delete(TENANT, session_id)
    with pytest.raises(errors.NotFound):
        await sessions.get(TENANT, session_id)
    with pytest.raises(errors.NotFound):
        await sessions.delete(TENANT, session_id)
    assert [e.session_id for e in await events.wait_for("session.deleted")] == [session_id]


async def test_export_then_import_round_trips_under_a_new_id(sessions: SessionClient) -> None:
    session_id, head = await new_session(sessions, "q1", "a1", "q2")
    lines = await sessions.export(TENANT, session_id)
    await sessions.delete(TENANT, session_id)

    imported = await sessions.import_session(TENANT, lines)

    assert imported.id != session_id and imported.head == head
    again = await sessions.export(TENANT, imported.id)
    assert again == [lines[0].replace(session_id, imported.id), *lines[1:]]
    detail = await sessions.get(TENANT, imported.id, verify_chain=True)
    assert detail.chain_verified


async def test_import_of_a_tampered_export_is_refused(sessions: SessionClient) -> None:
    session_id, _ = await new_session(sessions, "q1", "a1")
    lines = await sessions.export(TENANT, session_id)
    await sessions.delete(TENANT, session_id)
    tampered = [lines[0], lines[1].replace("q1", "q9"), *lines[2:]]
    with pytest.raises(errors.InvalidArgument):
        await sessions.import_session(TENANT, tampered)
    with pytest.raises(errors.NotFound):
        await sessions.get(TENANT, session_id)


async def test_a_retried_append_with_the_same_request_id_lands_once(
    sessions: SessionClient,
) -> None:
    session_id, head = await new_session(sessions)
    first = await sessions.append(TENANT, session_id, head, [user("once")], request_id="r-1")
    # The reply was "lost": the client retries with the same id and the old head.
    retry = await sessions.append(TENANT, session_id, head, [user("once")], request_id="r-1")
    assert retry.head == first.head
    detail = await sessions.get(TENANT, session_id, include_messages=True)
    assert [m.content for m in detail.messages] == ["once"]


async def test_compaction_creates_a_linked_session_with_its_messages(
    sessions: SessionClient, events: EventRecorder
) -> None:
    old_id, _ = await new_session(sessions, "q1", "a1")
    summary = common_pb2.Message(
        role=common_pb2.ROLE_USER, content="[Compacted context summary] q1 was answered"
    )
    new = await sessions.create(
        session_pb2.SessionsCreateRequest(
            tenant=TENANT, compacted_from=old_id, messages=[summary, assistant("a1")]
        )
    )
    detail = await sessions.get(TENANT, new.id, include_messages=True, verify_chain=True)
    assert new.compacted_from == old_id and detail.chain_verified
    assert detail.messages[0].content.startswith("[Compacted context summary]")
    listed = (await sessions.list(TENANT)).sessions
    assert {s.id: s.compacted_from for s in listed}[new.id] == old_id
    (created,) = await events.wait_for("session.created", session_id=new.id)
    assert created.attributes["compacted_from"] == old_id


async def test_build_context_reports_the_dropped_range(sessions: SessionClient) -> None:
    session_id, _ = await new_session(sessions, *(f"message {i} " + "x" * 200 for i in range(10)))
    context = await sessions.build_context(
        session_pb2.BuildContextRequest(tenant=TENANT, session_id=session_id, budget_tokens=250)
    )
    kept = [m.seq for m in context.messages]
    assert context.dropped_count > 0
    assert context.dropped_until_seq - context.dropped_from_seq == context.dropped_count
    assert kept[0] == 0 and kept[1] == context.dropped_until_seq  # first user, then the suffix
    assert context.dropped_from_seq == 1


async def test_calibration_changes_the_estimate_for_that_model(sessions: SessionClient) -> None:
    session_id, _ = await new_session(sessions, "y" * 400)

    async def estimate(model: str) -> int:
        request = session_pb2.BuildContextRequest(
            tenant=TENANT, session_id=session_id, budget_tokens=4000, model=model
        )
        return (await sessions.build_context(request)).token_estimate

    before = await estimate("tiny-tokenizer")
    ratio = await sessions.calibrate("tiny-tokenizer", prompt_chars=400, prompt_tokens=400)
    assert ratio < 4.0
    assert await estimate("tiny-tokenizer") > before
    assert await estimate("other-model") == before
    with pytest.raises(errors.InvalidArgument, match="prompt_tokens"):
        await sessions.calibrate("m", prompt_chars=10, prompt_tokens=0)


async def test_an_answer_append_carries_its_calibration(sessions: SessionClient) -> None:
    session_id, head = await new_session(sessions, "y" * 400)

    async def estimate() -> int:
        request = session_pb2.BuildContextRequest(
            tenant=TENANT, session_id=session_id, budget_tokens=4000, model="dense-tokenizer"
        )
        return (await sessions.build_context(request)).token_estimate

    before = await estimate()
    answer = common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, content="ok")
    bad = session_pb2.CalibrateRequest(model="dense-tokenizer", prompt_chars=400)
    with pytest.raises(errors.InvalidArgument, match=r"calibration\.prompt_tokens"):
        await sessions.append(TENANT, session_id, head, [answer], calibration=bad)
    # Refused whole: the answer was not stored either.
    assert (await sessions.get(TENANT, session_id)).session.head == head

    measured = session_pb2.CalibrateRequest(
        model="dense-tokenizer", prompt_chars=400, prompt_tokens=400
    )
    await sessions.append(TENANT, session_id, head, [answer], calibration=measured)
    assert await estimate() > 2 * before  # 1 char a token where 4 were assumed


async def test_idle_sessions_expire_with_their_event(
    tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, database: str
) -> None:
    settings = session_settings(tmp_path, redis_url, database, ttl_s=0.5, cleanup_interval_s=0.2)
    async with private_stack(settings, ["session"]) as stack:
        recorder = EventRecorder(stack.bus, await stack.bus.subscribe())
        client = SessionClient(stack.address("session"))
        try:
            session_id, _ = await new_session(client, "soon gone")
            (expired,) = await recorder.wait_for("session.expired", timeout=5)
            assert expired.session_id == session_id
            assert expired.attributes["reason"] == "idle"
            with pytest.raises(errors.NotFound):
                await client.get(TENANT, session_id)
        finally:
            await client.close()
            await recorder.close()


async def test_a_tenant_keeps_at_most_its_cap(
    tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, database: str
) -> None:
    settings = session_settings(tmp_path, redis_url, database, max_sessions_per_tenant=3)
    async with private_stack(settings, ["session"]) as stack:
        client = SessionClient(stack.address("session"))
        try:
            ids = [(await new_session(client, f"s{i}"))[0] for i in range(5)]
            other = await client.create(session_pb2.SessionsCreateRequest(tenant="other"))
            listed = {s.id for s in (await client.list(TENANT)).sessions}
            assert listed == set(ids[2:])  # the least recently used went first
            assert [s.id for s in (await client.list("other")).sessions] == [other.id]
        finally:
            await client.close()


async def test_two_session_servers_on_one_store_serialise_fifty_writers(
    tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, shared_database: str
) -> None:
    settings = session_settings(tmp_path, redis_url, shared_database)
    bus = InProcessEventBus()
    first = await start_stack(settings, services=["session"], bus=bus, ephemeral_ports=True)
    second = await start_stack(settings, services=["session"], bus=bus, ephemeral_ports=True)
    clients = [SessionClient(first.address("session")), SessionClient(second.address("session"))]
    try:
        session_id, _ = await new_session(clients[0])

        async def writer(n: int) -> None:
            client = clients[n % 2]
            text = f"writer {n}"
            while True:
                head = (await client.get(TENANT, session_id)).session.head
                try:
                    await client.append(
                        TENANT,
                        session_id,
                        head,
                        [user(text)],
                        request_id=f"w-{n}-{uuid.uuid4().hex}",
                    )
                    return
                except errors.HeadMismatch:
                    await asyncio.sleep(0)

        await asyncio.gather(*(writer(n) for n in range(50)))
        detail = await clients[1].get(TENANT, session_id, include_messages=True, verify_chain=True)
    finally:
        for client in clients:
            await client.close()
        await first.stop(1.0)
        await second.stop(1.0)
    assert detail.chain_verified
    assert sorted(m.content for m in detail.messages) == sorted(f"writer {n}" for n in range(50))
