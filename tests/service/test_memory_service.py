"""Memory consolidation through real llm_proxy, session and memory servers.

A session's answered messages are summarised by the (fake) model into
long-term memory; what the caller gets back, what memory recalls, what was
asked of the model, and the consolidation events.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests import builders
from tests.builders import TENANT, add, assistant, user
from tests.conftest import make_settings
from tests.service.conftest import EventRecorder, attrs, private_stack, upstream_config
from threadline import errors
from threadline.config import Settings
from threadline.peers import MemoryClient, SessionClient
from threadline.stack import Stack
from threadline.testing.fake_upstream import FakeUpstream, Script
from threadline.v1 import common_pb2

SUMMARY = "Ada lives in Lyon and drinks tea."
MAX_SUMMARY_TOKENS = 120


@pytest.fixture
def settings(tmp_path: Path, fake_upstream: FakeUpstream, redis_url: str) -> Settings:
    upstream = upstream_config(fake_upstream.base_url, first_token_s=2, total_s=10)
    return make_settings(
        tmp_path,
        fake_upstream.base_url,
        redis_url=redis_url,
        llm={"upstream": upstream},
        memory={"max_summary_tokens": MAX_SUMMARY_TOKENS},
    )


@pytest.fixture
async def stack(settings: Settings, redis_client: aioredis.Redis) -> AsyncIterator[Stack]:
    async with private_stack(settings, ["llm_proxy", "session", "memory"]) as running:
        yield running


CONVERSATION = [
    user("Hi, I am Ada."),
    assistant("Nice to meet you, Ada."),
    user("I live in Lyon and I drink tea every morning."),
    assistant("Lyon and tea: noted."),
]


async def new_session(sessions: SessionClient, messages: list[common_pb2.Message]) -> str:
    return await builders.new_session(sessions, messages, system_prompt="Be kind.")


def summary_prompt(fake: FakeUpstream, index: int = -1) -> str:
    """The text the memory service asked the model to summarise."""
    body = fake.chat_requests()[index].body
    assert body["messages"][0]["role"] == "system"
    prompt = body["messages"][-1]["content"]
    assert isinstance(prompt, str)
    return prompt


async def test_consolidate_stores_the_models_summary_and_advances_the_offset(
    sessions: SessionClient, memory: MemoryClient, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.default = Script(text=SUMMARY)
    session_id = await new_session(sessions, CONVERSATION)

    result = await memory.consolidate(TENANT, session_id)

    assert result.consolidated
    assert result.summary == SUMMARY
    assert result.offset == 4 and result.messages_consolidated == 4
    assert result.usage.completion_tokens == len(SUMMARY.split())
    recalled = await memory.recall(TENANT, session_id)
    assert (recalled.summary, recalled.offset) == (SUMMARY, 4)

    (request,) = fake_upstream.chat_requests()
    prompt = summary_prompt(fake_upstream)
    for message in CONVERSATION:
        assert message.content in prompt
    assert "(none yet)" in prompt
    assert request.body["max_tokens"] == MAX_SUMMARY_TOKENS
    # The session's own system prompt is not part of what is summarised.
    assert "Be kind." not in prompt


async def test_nothing_new_means_no_model_call(
    sessions: SessionClient, memory: MemoryClient, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.default = Script(text=SUMMARY)
    session_id = await new_session(sessions, CONVERSATION)
    await memory.consolidate(TENANT, session_id)

    again = await memory.consolidate(TENANT, session_id)

    assert not again.consolidated
    assert (again.offset, again.summary) == (4, SUMMARY)
    assert len(fake_upstream.chat_requests()) == 1


async def test_empty_session_is_not_consolidated(
    sessions: SessionClient, memory: MemoryClient, fake_upstream: FakeUpstream
) -> None:
    session_id = await new_session(sessions, [])
    result = await memory.consolidate(TENANT, session_id)
    assert not result.consolidated and result.offset == 0 and result.summary == ""
    assert fake_upstream.chat_requests() == []


async def test_second_run_merges_only_new_messages_into_the_previous_summary(
    sessions: SessionClient, memory: MemoryClient, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(Script(text=SUMMARY))
    session_id = await new_session(sessions, CONVERSATION)
    await memory.consolidate(TENANT, session_id)
    await add(sessions, session_id, user("I also own a cat named Pixel."), assistant("Hi Pixel!"))
    merged = SUMMARY + " She has a cat, Pixel."
    fake_upstream.enqueue(Script(text=merged))

    result = await memory.consolidate(TENANT, session_id)

    assert result.consolidated and result.summary == merged
    assert result.offset == 6 and result.messages_consolidated == 2
    prompt = summary_prompt(fake_upstream)
    assert SUMMARY in prompt and "(none yet)" not in prompt
    assert "I also own a cat named Pixel." in prompt and "Hi Pixel!" in prompt
    assert "Hi, I am Ada." not in prompt  # already folded into the summary
    assert (await memory.recall(TENANT, session_id)).summary == merged


async def test_trailing_unanswered_user_message_waits_for_its_answer(
    sessions: SessionClient, memory: MemoryClient, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.default = Script(text=SUMMARY)
    pending_question = "Which bakery should I try tomorrow?"
    session_id = await new_session(sessions, [*CONVERSATION, user(pending_question)])

    result = await memory.consolidate(TENANT, session_id)

    assert result.consolidated and result.offset == 4
    assert pending_question not in summary_prompt(fake_upstream)
    assert not (await memory.consolidate(TENANT, session_id)).consolidated

    await add(sessions, session_id, assistant("Try Boulangerie Saint-Paul."))
    after = await memory.consolidate(TENANT, session_id)
    assert after.consolidated and after.offset == 6
    assert pending_question in summary_prompt(fake_upstream)


async def test_upstream_failure_keeps_the_offset_and_publishes_failed(
    sessions: SessionClient,
    memory: MemoryClient,
    fake_upstream: FakeUpstream,
    events: EventRecorder,
) -> None:
    fake_upstream.default = Script.error(503, "model server overloaded")
    session_id = await new_session(sessions, CONVERSATION)

    with pytest.raises(errors.Unavailable, match="overloaded"):
        await memory.consolidate(TENANT, session_id)

    recalled = await memory.recall(TENANT, session_id)
    assert (recalled.summary, recalled.offset) == ("", 0)
    (failed,) = await events.wait_for("memory.consolidation.failed")
    assert failed.session_id == session_id and failed.tenant == TENANT
    assert attrs(failed)["reason"] == "UNAVAILABLE"
    await events.settle()
    assert events.of_type("memory.consolidation.done") == []

    # Once the model is back, the same span is consolidated.
    fake_upstream.default = Script(text=SUMMARY)
    result = await memory.consolidate(TENANT, session_id)
    assert result.consolidated and result.offset == 4


async def test_cut_summary_is_not_stored(
    sessions: SessionClient,
    memory: MemoryClient,
    fake_upstream: FakeUpstream,
    events: EventRecorder,
) -> None:
    fake_upstream.default = Script(text=SUMMARY, fault="cut", fault_after=2)
    session_id = await new_session(sessions, CONVERSATION)

    with pytest.raises(errors.Unavailable, match="cut"):
        await memory.consolidate(TENANT, session_id)

    recalled = await memory.recall(TENANT, session_id)
    assert (recalled.summary, recalled.offset) == ("", 0)
    await events.wait_for("memory.consolidation.failed")


async def test_consolidation_publishes_started_and_done_with_tokens(
    sessions: SessionClient,
    memory: MemoryClient,
    fake_upstream: FakeUpstream,
    events: EventRecorder,
) -> None:
    fake_upstream.default = Script(text=SUMMARY)
    session_id = await new_session(sessions, CONVERSATION)

    result = await memory.consolidate(TENANT, session_id)

    (done,) = await events.wait_for("memory.consolidation.done")
    assert events.types("memory.") == [
        "memory.consolidation.started",
        "memory.consolidation.done",
    ]
    (started,) = events.of_type("memory.consolidation.started")
    assert started.session_id == session_id and started.service == "memory"
    assert attrs(started)["job_id"] == result.job.id == attrs(done)["job_id"]
    assert done.session_id == session_id and done.tenant == TENANT
    assert attrs(done)["offset"] == 4 and attrs(done)["messages"] == 4
    assert attrs(done)["duration_ms"] >= 0
    assert attrs(done)["tokens_in"] == result.usage.prompt_tokens > 0
    assert attrs(done)["tokens_out"] == result.usage.completion_tokens > 0


async def test_another_tenant_neither_consolidates_nor_recalls_the_session(
    sessions: SessionClient, memory: MemoryClient, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.default = Script(text=SUMMARY)
    session_id = await new_session(sessions, CONVERSATION)
    await memory.consolidate(TENANT, session_id)

    with pytest.raises(errors.NotFound):
        await memory.consolidate("other", session_id)
    # Recall asks the session service too: another tenant's session is unknown.
    with pytest.raises(errors.NotFound) as recalled:
        await memory.recall("other", session_id)

    assert recalled.value.message == f"session {session_id} not found"
    assert len(fake_upstream.chat_requests()) == 1


async def test_concurrent_consolidations_summarise_the_span_once(
    sessions: SessionClient, memory: MemoryClient, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.default = Script(text=SUMMARY, token_delay_s=0.05)
    session_id = await new_session(sessions, CONVERSATION)

    results = await asyncio.gather(*(memory.consolidate(TENANT, session_id) for _ in range(3)))

    # One job of a kind per session: the three callers share it and its result.
    assert len({r.job.id for r in results}) == 1
    assert all(r.consolidated and (r.offset, r.summary) == (4, SUMMARY) for r in results)
    assert len(fake_upstream.chat_requests()) == 1
