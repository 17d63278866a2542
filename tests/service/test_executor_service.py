"""The executor's RunTurn against the real stack (session, memory, llm_proxy, Redis).

Called directly, as the gateway calls it: what the turn streams, what it
stores, what it sends to the model, how turns on one session exclude each
other, and what a cancelled turn leaves behind.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis

from services.session.sqlite_store import SqliteSessionStore
from tests import builders
from tests.builders import TENANT, assistant, user
from tests.conftest import make_settings
from tests.service.conftest import EventRecorder, attrs, kinds, private_stack, run_turn
from tests.waiting import eventually
from threadline import errors
from threadline.config import Settings
from threadline.peers import ExecutorClient, MemoryClient, SessionClient
from threadline.stack import Stack
from threadline.testing.fake_upstream import FakeUpstream, Script
from threadline.v1 import common_pb2, executor_pb2

SYSTEM_PROMPT = "You are a concise assistant."
LEASE_PREFIX = "threadline:turn:"
CONTEXT_BUDGET = 600
MAX_OUTPUT = 100


@pytest.fixture
def settings(tmp_path: Path, fake_upstream: FakeUpstream, redis_url: str) -> Settings:
    return make_settings(
        tmp_path,
        fake_upstream.base_url,
        redis_url=redis_url,
        executor={"context_budget_tokens": CONTEXT_BUDGET, "max_output_tokens": MAX_OUTPUT},
    )


@pytest.fixture
async def stack(settings: Settings, redis_client: aioredis.Redis) -> AsyncIterator[Stack]:
    async with private_stack(settings) as running:
        yield running


def turn(session_id: str, text: str, tenant: str = TENANT) -> executor_pb2.RunTurnRequest:
    return executor_pb2.RunTurnRequest(tenant=tenant, session_id=session_id, input=text)


def text_of(events: list[executor_pb2.TurnEvent]) -> str:
    return "".join(e.delta for e in events if e.WhichOneof("event") == "delta")


async def new_session(
    sessions: SessionClient, history: list[common_pb2.Message] | None = None
) -> str:
    return await builders.new_session(sessions, history or (), system_prompt=SYSTEM_PROMPT)


async def stored(sessions: SessionClient, session_id: str) -> list[common_pb2.Message]:
    detail = await sessions.get(TENANT, session_id, include_messages=True, verify_chain=True)
    assert detail.chain_verified
    return list(detail.messages)


def wire(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


async def test_turn_streams_and_stores_the_question_and_answer(
    executor: ExecutorClient,
    sessions: SessionClient,
    fake_upstream: FakeUpstream,
    events: EventRecorder,
) -> None:
    fake_upstream.default = Script(text="Lyon is in France.")
    session_id = await new_session(sessions)

    events_out = await run_turn(executor, session_id, "Where is Lyon?")

    assert kinds(events_out)[0] == "started" and kinds(events_out)[-1] == "done"
    assert set(kinds(events_out)[1:-1]) == {"delta"}
    assert events_out[0].started.session_id == session_id
    assert text_of(events_out) == "Lyon is in France."
    done = events_out[-1].done
    assert done.turn_id == events_out[0].started.turn_id
    assert done.finish_reason == common_pb2.FINISH_REASON_STOP
    assert done.content == "Lyon is in France." and done.error == ""
    assert done.model == "fake-model" and done.upstream == "fake"
    assert done.usage.completion_tokens == 4 and done.usage.prompt_tokens > 0

    messages = await stored(sessions, session_id)
    assert [(m.role, m.content, m.interrupted) for m in messages] == [
        (common_pb2.ROLE_USER, "Where is Lyon?", False),
        (common_pb2.ROLE_ASSISTANT, "Lyon is in France.", False),
    ]
    assert done.head == messages[-1].hash

    (completed,) = await events.wait_for("turn.completed")
    assert events.types("turn.") == ["turn.started", "turn.completed"]
    assert completed.session_id == session_id and completed.tenant == TENANT
    assert attrs(completed)["turn_id"] == done.turn_id
    assert attrs(completed)["finish_reason"] == "FINISH_REASON_STOP"
    assert attrs(completed)["completion_tokens"] == 4


async def test_a_turn_calibrates_its_models_estimate_after_answering(
    settings: Settings,
    executor: ExecutorClient,
    sessions: SessionClient,
    fake_upstream: FakeUpstream,
) -> None:
    # The calibration rides on the answer's append: the next turns' estimates
    # follow the server's counts.
    fake_upstream.default = Script(text="Noted.")
    session_id = await new_session(sessions)

    events_out = await run_turn(executor, session_id, "Remember the number 42. " * 20)

    assert events_out[-1].done.usage.prompt_tokens > 0
    async with SqliteSessionStore(settings.data_dir / "sessions.db") as store:
        ratio = await store.calibration("default")
    assert ratio is not None and ratio > 0


async def test_prompt_is_system_then_history_then_the_new_message(
    executor: ExecutorClient, sessions: SessionClient, fake_upstream: FakeUpstream
) -> None:
    history = [
        user("My name is Ada."),
        assistant("Hello Ada."),
        user("I like tea."),
        assistant("Tea it is."),
    ]
    session_id = await new_session(sessions, history)

    await run_turn(executor, session_id, "What do I like?")

    (request,) = fake_upstream.chat_requests()
    assert request.body["messages"] == [
        wire("system", SYSTEM_PROMPT),
        wire("user", "My name is Ada."),
        wire("assistant", "Hello Ada."),
        wire("user", "I like tea."),
        wire("assistant", "Tea it is."),
        wire("user", "What do I like?"),
    ]
    assert request.body["stream"] is True
    assert request.body["max_tokens"] > 0


async def test_memory_summary_is_in_the_prompt_after_a_consolidation(
    executor: ExecutorClient,
    sessions: SessionClient,
    memory: MemoryClient,
    fake_upstream: FakeUpstream,
) -> None:
    summary = "The user is Ada; she likes tea."
    session_id = await new_session(
        sessions, [user("My name is Ada."), assistant("Hello Ada."), user("I like tea.")]
    )
    await run_turn(executor, session_id, "Noted?")  # answers the open question
    fake_upstream.enqueue(Script(text=summary))
    assert (await memory.consolidate(TENANT, session_id)).summary == summary

    await run_turn(executor, session_id, "What do I drink?")

    prompt = fake_upstream.chat_requests()[-1].body["messages"]
    assert prompt[0] == wire("system", SYSTEM_PROMPT)
    memory_messages = [m for m in prompt if m["role"] == "system" and summary in m["content"]]
    assert len(memory_messages) == 1
    assert prompt.index(memory_messages[0]) < prompt.index(wire("user", "What do I drink?"))
    assert prompt[-1] == wire("user", "What do I drink?")


async def test_second_concurrent_turn_on_a_session_is_aborted_busy(
    executor: ExecutorClient, sessions: SessionClient, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.default = Script(tokens=20, token_delay_s=0.03)
    session_id = await new_session(sessions)
    first = asyncio.create_task(run_turn(executor, session_id, "one"))
    await fake_upstream.wait_for_requests(1)

    with pytest.raises(errors.Aborted, match="session busy"):
        await run_turn(executor, session_id, "two")

    assert (await first)[-1].done.finish_reason == common_pb2.FINISH_REASON_STOP
    assert [m.content for m in await stored(sessions, session_id)] == [
        "one",
        "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7 tok8 tok9 tok10 tok11 tok12 tok13 tok14 "
        "tok15 tok16 tok17 tok18 tok19 ",
    ]
    assert len(fake_upstream.chat_requests()) == 1
    # The lease is free again: the next turn runs.
    assert (await run_turn(executor, session_id, "three"))[-1].done.content


async def test_turns_on_different_sessions_run_at_the_same_time(
    executor: ExecutorClient, sessions: SessionClient, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.default = Script(tokens=10, token_delay_s=0.05)
    first_id, second_id = await new_session(sessions), await new_session(sessions)

    first = asyncio.create_task(run_turn(executor, first_id, "first"))
    second = asyncio.create_task(run_turn(executor, second_id, "second"))
    await fake_upstream.wait_for_requests(2)
    assert not first.done() and not second.done()  # both answers are streaming

    for task, session_id in ((first, first_id), (second, second_id)):
        assert (await task)[-1].done.finish_reason == common_pb2.FINISH_REASON_STOP
        assert len(await stored(sessions, session_id)) == 2


async def test_redis_lease_is_held_during_the_turn_and_gone_after(
    executor: ExecutorClient,
    sessions: SessionClient,
    fake_upstream: FakeUpstream,
    redis_client: aioredis.Redis,
) -> None:
    fake_upstream.default = Script(tokens=10, token_delay_s=0.03)
    session_id = await new_session(sessions)
    running = asyncio.create_task(run_turn(executor, session_id, "hold it"))
    await fake_upstream.wait_for_requests(1)

    assert await redis_client.exists(LEASE_PREFIX + session_id) == 1
    assert await redis_client.pttl(LEASE_PREFIX + session_id) > 0  # a crashed holder expires

    await running
    assert await redis_client.exists(LEASE_PREFIX + session_id) == 0


async def test_cancelled_turn_keeps_the_partial_answer_as_interrupted(
    executor: ExecutorClient,
    sessions: SessionClient,
    fake_upstream: FakeUpstream,
    events: EventRecorder,
    redis_client: aioredis.Redis,
) -> None:
    fake_upstream.default = Script(tokens=200, token_delay_s=0.02)
    session_id = await new_session(sessions)
    call = executor.run_turn(turn(session_id, "Tell me a long story."))
    seen = ""
    async for event in call:
        seen += event.delta
        if seen.count("tok") >= 3:
            break

    call.cancel()

    assert await call.code() == grpc.StatusCode.CANCELLED
    (interrupted,) = await events.wait_for("turn.interrupted")
    assert interrupted.session_id == session_id

    async def both_stored() -> list[common_pb2.Message]:
        messages = await stored(sessions, session_id)
        return messages if len(messages) == 2 else []

    question, answer = await eventually(both_stored)
    assert question.content == "Tell me a long story."
    assert answer.role == common_pb2.ROLE_ASSISTANT and answer.interrupted
    # What the user saw is kept; it was never the whole answer.
    assert answer.content.startswith(seen)
    assert len(answer.content.split()) < 200
    assert attrs(interrupted)["partial_chars"] == len(answer.content)
    await fake_upstream.wait_for_disconnects(1)  # the model stopped generating

    async def lease_released() -> bool:
        return await redis_client.exists(LEASE_PREFIX + session_id) == 0

    await eventually(lease_released)


async def test_cut_upstream_stream_is_stored_interrupted(
    executor: ExecutorClient,
    sessions: SessionClient,
    fake_upstream: FakeUpstream,
    events: EventRecorder,
) -> None:
    fake_upstream.default = Script(tokens=10, fault="cut", fault_after=3)
    session_id = await new_session(sessions)

    events_out = await run_turn(executor, session_id, "go on")

    done = events_out[-1].done
    assert done.finish_reason == common_pb2.FINISH_REASON_INTERRUPTED and done.error
    answer = (await stored(sessions, session_id))[-1]
    assert (answer.content, answer.interrupted) == ("tok0 tok1 tok2 ", True)
    (interrupted,) = await events.wait_for("turn.interrupted")
    assert attrs(interrupted)["finish_reason"] == "FINISH_REASON_INTERRUPTED"
    assert events.of_type("turn.completed") == []


async def test_upstream_down_fails_the_turn_and_keeps_the_question(
    executor: ExecutorClient,
    sessions: SessionClient,
    fake_upstream: FakeUpstream,
    events: EventRecorder,
) -> None:
    fake_upstream.default = Script.error(503, "overloaded")
    session_id = await new_session(sessions)

    with pytest.raises(errors.Unavailable, match="overloaded"):
        await run_turn(executor, session_id, "anyone there?")

    assert [m.content for m in await stored(sessions, session_id)] == ["anyone there?"]
    (failed,) = await events.wait_for("turn.failed")
    assert attrs(failed)["code"] == "UNAVAILABLE"


async def test_another_tenants_session_is_not_found_and_untouched(
    executor: ExecutorClient, sessions: SessionClient, fake_upstream: FakeUpstream
) -> None:
    session_id = await new_session(sessions)

    with pytest.raises(errors.NotFound):
        await run_turn(executor, session_id, "let me in", tenant="other")

    assert await stored(sessions, session_id) == []
    assert fake_upstream.chat_requests() == []


async def test_long_history_is_trimmed_to_the_context_budget(
    executor: ExecutorClient,
    sessions: SessionClient,
    fake_upstream: FakeUpstream,
    events: EventRecorder,
) -> None:
    history: list[common_pb2.Message] = []
    for i in range(10):
        history += [user(f"question {i} " + "q" * 100), assistant(f"answer {i} " + "a" * 100)]
    session_id = await new_session(sessions, history)

    done = (await run_turn(executor, session_id, "And now?"))[-1].done

    assert done.finish_reason == common_pb2.FINISH_REASON_STOP
    request = fake_upstream.chat_requests()[0].body
    prompt = request["messages"]
    assert request["max_tokens"] == MAX_OUTPUT
    assert prompt[0] == wire("system", SYSTEM_PROMPT)
    assert prompt[1]["content"].startswith("question 0 ")  # the first user message stays
    assert prompt[-1] == wire("user", "And now?")
    assert prompt[-2]["content"].startswith("answer 9 ")
    assert len(prompt) < 2 + len(history)
    assert sum(len(m["content"]) for m in prompt) // 4 <= CONTEXT_BUDGET - MAX_OUTPUT
    (truncated,) = await events.wait_for("session.truncated")
    assert truncated.session_id == session_id
    assert attrs(truncated)["dropped"] == 2 + len(history) - len(prompt)


async def test_turn_goes_on_without_memory_when_memory_is_down(
    stack: Stack, executor: ExecutorClient, sessions: SessionClient, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.default = Script(text="Still here.")
    session_id = await new_session(sessions)
    await stack.hosts["memory"].stop(0)

    events_out = await run_turn(executor, session_id, "Hello?")

    assert events_out[-1].done.finish_reason == common_pb2.FINISH_REASON_STOP
    assert [m.content for m in await stored(sessions, session_id)] == ["Hello?", "Still here."]


async def test_another_tenant_gets_not_found_even_while_a_turn_runs(
    executor: ExecutorClient, sessions: SessionClient, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.default = Script(tokens=20, token_delay_s=0.03)
    session_id = await new_session(sessions)
    mine = asyncio.create_task(run_turn(executor, session_id, "mine"))
    await fake_upstream.wait_for_requests(1)

    try:
        with pytest.raises(errors.NotFound):
            await run_turn(executor, session_id, "theirs", tenant="other")
    finally:
        await mine
