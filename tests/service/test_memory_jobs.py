"""Memory's background jobs through real llm_proxy, session, memory and executor servers.

The fake upstream serves two models: the conversation's (`fake-model`) and the
summariser's (`summarizer`, memory.model), so each test scripts the two apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from services.memory.store import SqliteMemoryStore
from tests.builders import TENANT, add, exchange, new_session, user
from tests.conftest import FAKE_MODEL, make_settings
from tests.service.conftest import (
    EventRecorder,
    attrs,
    kinds,
    private_stack,
    run_turn,
    upstream_config,
)
from tests.waiting import eventually
from threadline import errors
from threadline.config import ServiceName, Settings
from threadline.peers import ExecutorClient, MemoryClient, SessionClient
from threadline.stack import Stack, start_stack
from threadline.testing.fake_upstream import FakeUpstream, Script
from threadline.v1 import common_pb2, executor_pb2, memory_pb2

SUMMARIZER = "summarizer"
SUMMARY = "Ada plans a trip to Lyon; she prefers trains."
HEADER = "[Compacted context summary]"
SCAN_INTERVAL_S = 0.1
#: A summariser window small enough that a long session is summarised in several chunks.
CHUNKED = {"summary_window_tokens": 600, "max_summary_tokens": 50}


def memory_settings(
    tmp_path: Path, fake: FakeUpstream, redis_url: str, *, executor: Any = None, **memory: Any
) -> Settings:
    upstream = upstream_config(fake.base_url, first_token_s=2, total_s=10)
    upstream["models"] = [FAKE_MODEL, SUMMARIZER]
    return make_settings(
        tmp_path,
        fake.base_url,
        redis_url=redis_url,
        llm={"upstream": upstream, "default_route": ""},
        memory={
            "model": SUMMARIZER,
            "scan_interval_s": SCAN_INTERVAL_S,
            "claim_idle_s": 1.0,
            "lease_ttl_s": 2.0,
            "job_timeout_s": 5.0,
            "compact_retained_tokens": 40,
            **memory,
        },
        executor={"context_budget_tokens": 400, **(executor or {})},
    )


def write_summary(text: str = SUMMARY) -> Script:
    return Script(tool_calls=[("write_summary", json.dumps({"summary": text}))])


RUNNING, SUCCEEDED = memory_pb2.JOB_STATE_RUNNING, memory_pb2.JOB_STATE_SUCCEEDED


async def in_state(memory: MemoryClient, job_id: str, *states: int) -> memory_pb2.Job | None:
    """The job once it is in one of `states` (None before)."""
    job = await memory.get_job(TENANT, job_id)
    return job if job.state in states else None


class Clients:
    def __init__(self, stack: Stack) -> None:
        self.sessions = SessionClient(stack.address("session"))
        self.memory = MemoryClient(stack.address("memory"))
        self.executor = (
            ExecutorClient(stack.address("executor")) if "executor" in stack.hosts else None
        )

    async def close(self) -> None:
        await self.sessions.close()
        await self.memory.close()
        if self.executor is not None:
            await self.executor.close()

    async def session(self, messages: list[common_pb2.Message], system: str = "") -> str:
        return await new_session(self.sessions, messages, system_prompt=system)

    async def add(self, session_id: str, *messages: common_pb2.Message) -> None:
        await add(self.sessions, session_id, *messages)

    async def activity(
        self, session_id: str, prompt_tokens: int = 0, window: int = 400
    ) -> memory_pb2.RecordActivityResponse:
        return await self.memory.record_activity(
            memory_pb2.RecordActivityRequest(
                tenant=TENANT,
                session_id=session_id,
                model=FAKE_MODEL,
                prompt_tokens=prompt_tokens,
                context_window_tokens=window,
            )
        )

    async def wait_job(self, job_id: str, timeout_s: float = 10.0) -> memory_pb2.Job:
        finished = (SUCCEEDED, memory_pb2.JOB_STATE_FAILED)
        return await eventually(lambda: in_state(self.memory, job_id, *finished), timeout=timeout_s)

    async def compact(self, session_id: str) -> memory_pb2.Job:
        return await self.memory.compact(
            memory_pb2.JobRequest(tenant=TENANT, session_id=session_id, wait=True)
        )

    async def turn(self, session_id: str, text: str) -> list[executor_pb2.TurnEvent]:
        assert self.executor is not None
        return await run_turn(self.executor, session_id, text)


Start = Callable[..., contextlib.AbstractAsyncContextManager[tuple[Clients, EventRecorder]]]


@pytest.fixture
def start(
    tmp_path: Path, fake_upstream: FakeUpstream, redis_url: str, redis_client: aioredis.Redis
) -> Start:
    """Start a private stack with these memory settings (and `executor=` ones)."""

    @contextlib.asynccontextmanager
    async def started(
        services: tuple[ServiceName, ...] = ("llm_proxy", "session", "memory"),
        executor: dict[str, Any] | None = None,
        **memory: Any,
    ) -> AsyncIterator[tuple[Clients, EventRecorder]]:
        settings = memory_settings(tmp_path, fake_upstream, redis_url, executor=executor, **memory)
        async with private_stack(settings, list(services)) as stack:
            clients = Clients(stack)
            recorder = EventRecorder(stack.bus, await stack.bus.subscribe())
            try:
                yield clients, recorder
            finally:
                await recorder.close()
                await clients.close()

    return started


def summarizer_requests(fake: FakeUpstream) -> list[dict[str, Any]]:
    return [r.body for r in fake.chat_requests() if r.body and r.body["model"] == SUMMARIZER]


# -- triggers ------------------------------------------------------------------------


async def test_consolidation_fires_at_its_fraction_of_the_window_and_not_before(
    start: Start, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.route(SUMMARIZER, Script(text=SUMMARY))
    async with start(consolidate_fraction=0.5) as (clients, events):
        # Two exchanges of about 25 tokens a message: 100 < 0.5 * 400.
        session_id = await clients.session(exchange(2, words=20))
        assert not (await clients.activity(session_id, window=400)).started

        await clients.add(session_id, *exchange(3, words=20))
        response = await clients.activity(session_id, window=400)

        (job,) = response.started
        assert (job.kind, job.trigger) == ("consolidate", "tokens")
        done = await clients.wait_job(job.id)
        assert done.state == memory_pb2.JOB_STATE_SUCCEEDED and done.offset == 10
        recalled = await clients.memory.recall(TENANT, session_id)
        assert (recalled.summary, recalled.offset) == (SUMMARY, 10)
        (event,) = await events.wait_for("memory.consolidation.done")
        assert attrs(event)["job_id"] == job.id and attrs(event)["trigger"] == "tokens"


async def test_extraction_fires_past_its_threshold(
    start: Start, fake_upstream: FakeUpstream
) -> None:
    decision = {"options": ["train", "plane"], "chosen": "train", "rationale": "cheaper"}
    fake_upstream.route(SUMMARIZER, Script(text=json.dumps({"decisions": [decision]})))
    async with start(extract_threshold=100) as (clients, _events):
        session_id = await clients.session(exchange(1, words=20))
        assert not (await clients.activity(session_id)).started

        await clients.add(session_id, *exchange(3, words=20))
        (job,) = (await clients.activity(session_id)).started

        assert job.kind == "extract"
        done = await clients.wait_job(job.id)
        assert done.state == memory_pb2.JOB_STATE_SUCCEEDED and done.items == 1
        assert done.offset == 8
        (request,) = summarizer_requests(fake_upstream)
        assert request["response_format"] == {"type": "json_object"}
        recalled = await clients.memory.recall(TENANT, session_id, query="train or plane?")
        (item,) = recalled.items
        assert item.kind == "decision" and json.loads(item.json)["chosen"] == "train"
        assert (item.from_seq, item.to_seq) == (0, 7)
        assert "Decision: train" in recalled.context


async def test_after_a_failed_extraction_turns_start_none_until_the_pause_ends(
    start: Start, fake_upstream: FakeUpstream
) -> None:
    # A model that cannot write the JSON: every turn would ask it again.
    fake_upstream.route(SUMMARIZER, Script(text="not json at all"))
    async with start(extract_threshold=100, failed_job_pause_s=1.0) as (clients, _events):
        session_id = await clients.session(exchange(4, words=20))
        (job,) = (await clients.activity(session_id)).started
        assert (await clients.wait_job(job.id)).state == memory_pb2.JOB_STATE_FAILED
        asked = len(summarizer_requests(fake_upstream))

        for _ in range(3):  # turns within the pause
            assert not (await clients.activity(session_id)).started
        assert len(summarizer_requests(fake_upstream)) == asked

        async def started_again() -> memory_pb2.Job | None:
            started = (await clients.activity(session_id)).started
            return started[0] if started else None

        again = await eventually(started_again, timeout=5)
        assert again.kind == "extract" and again.id != job.id
        assert (await clients.wait_job(again.id)).state == memory_pb2.JOB_STATE_FAILED
        assert not (await clients.activity(session_id)).started  # paused again
        # An explicit request is never held back.
        explicit = await clients.memory.extract(
            memory_pb2.JobRequest(tenant=TENANT, session_id=session_id, wait=True)
        )
        assert explicit.id not in (job.id, again.id)
        assert explicit.state == memory_pb2.JOB_STATE_FAILED


async def test_thresholds_of_zero_never_fire(start: Start, fake_upstream: FakeUpstream) -> None:
    async with start(
        consolidate_fraction=0, extract_threshold=0, compact_threshold=0, idle_consolidate_s=0
    ) as (clients, events):
        session_id = await clients.session(exchange(30, words=30))
        response = await clients.activity(session_id, prompt_tokens=400, window=400)
        # Several idle scans. They publish nothing (no event, no metric) for a test to
        # wait on, so only a window of time can show that none of them started a job.
        await asyncio.sleep(5 * SCAN_INTERVAL_S)

        assert not response.started and not response.compact_due
        assert not (await clients.memory.recall(TENANT, session_id)).compact_due
        assert fake_upstream.chat_requests() == []
        assert events.types("memory.") == [] and events.types("compact.") == []


async def test_compaction_is_due_from_the_reported_prompt_not_an_estimate(start: Start) -> None:
    async with start(compact_threshold=0.75) as (clients, _events):
        # A tiny session: an estimate would never call it full.
        session_id = await clients.session(exchange(1, words=2))
        assert not (await clients.activity(session_id, prompt_tokens=299)).compact_due
        assert (await clients.activity(session_id, prompt_tokens=300)).compact_due
        assert (await clients.memory.recall(TENANT, session_id)).compact_due


async def test_idle_sessions_are_consolidated_and_active_ones_left_alone(
    start: Start, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.route(SUMMARIZER, Script(text=SUMMARY))
    async with start(idle_consolidate_s=0.4) as (clients, events):
        idle = await clients.session(exchange(2))
        busy = await clients.session(exchange(2))
        await clients.activity(idle)
        # The user of `busy` keeps talking, for several idle periods and until the idle
        # session has been consolidated.
        active_until = time.monotonic() + 1.5
        async with asyncio.timeout(10):
            while time.monotonic() < active_until or not events.of_type(
                "memory.consolidation.done"
            ):
                await clients.activity(busy)
                await asyncio.sleep(0.1)  # the user's pace, well inside idle_consolidate_s

        done = events.of_type("memory.consolidation.done")
        assert [e.session_id for e in done] == [idle]
        assert attrs(done[0])["trigger"] == "idle"
        # Idle again with nothing new: no second run (the busy one, idle at last, runs).
        await clients.activity(idle)
        await events.wait_for("memory.consolidation.done", count=2)
        # The idle scan says nothing when it finds nothing to do: a few more of its
        # rounds are the only way to see that `idle` is not run again.
        await asyncio.sleep(5 * SCAN_INTERVAL_S)
        await events.settle()
        done = events.of_type("memory.consolidation.done")
        assert [e.session_id for e in done] == [idle, busy]
        assert len(summarizer_requests(fake_upstream)) == 2


async def test_a_failing_job_leaves_the_workers_running(
    start: Start, fake_upstream: FakeUpstream
) -> None:
    boom = Script.error(500, "boom")
    # llm_proxy retries a 500 (3 attempts in these settings) before giving up.
    fake_upstream.route_sequence(SUMMARIZER, [boom, boom, boom, Script(text=SUMMARY)])
    async with start(workers=1) as (clients, events):
        broken = await clients.session(exchange(2))
        fine = await clients.session(exchange(2))

        with pytest.raises(errors.Unavailable, match="boom"):
            await clients.memory.consolidate(TENANT, broken)
        result = await clients.memory.consolidate(TENANT, fine)

        assert result.consolidated and result.summary == SUMMARY
        (failed,) = events.of_type("memory.consolidation.failed")
        # The event names the error's class; its message (the job's error) stays out.
        assert failed.session_id == broken and attrs(failed)["reason"] == "UNAVAILABLE"


async def test_the_offset_survives_a_restart(start: Start, fake_upstream: FakeUpstream) -> None:
    fake_upstream.route(SUMMARIZER, Script(text=SUMMARY))
    async with start() as (clients, _events):
        session_id = await clients.session(exchange(2))
        await clients.memory.consolidate(TENANT, session_id)
    async with start() as (clients, _events):
        recalled = await clients.memory.recall(TENANT, session_id)
        assert (recalled.summary, recalled.offset) == (SUMMARY, 4)
        again = await clients.memory.consolidate(TENANT, session_id)
        assert not again.consolidated
        await clients.add(session_id, *exchange(1))
        more = await clients.memory.consolidate(TENANT, session_id)
        assert more.consolidated and more.messages_consolidated == 2 and more.offset == 6
    assert len(summarizer_requests(fake_upstream)) == 2


async def test_three_failures_archive_the_raw_text_so_the_session_moves_on(
    start: Start, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.route(SUMMARIZER, Script.error(400, "summariser refuses"))
    async with start(max_failures=3) as (clients, events):
        session_id = await clients.session(exchange(2))
        for _ in range(2):
            with pytest.raises(errors.Unavailable):
                await clients.memory.consolidate(TENANT, session_id)
            assert (await clients.memory.recall(TENANT, session_id)).offset == 0

        with pytest.raises(errors.Unavailable):
            await clients.memory.consolidate(TENANT, session_id)

        assert (await clients.memory.recall(TENANT, session_id)).offset == 4
        failures = [attrs(e) for e in events.of_type("memory.consolidation.failed")]
        assert [f["failures"] for f in failures] == [1, 2, 3]
        assert failures[-1]["archived"] is True


async def test_a_span_larger_than_the_summarisers_window_goes_in_chunks(
    start: Start, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.route(SUMMARIZER, Script(text=SUMMARY))
    async with start(**CHUNKED) as (clients, _events):
        session_id = await clients.session(exchange(20, words=40))

        result = await clients.memory.consolidate(TENANT, session_id)

        assert result.offset == 40 and result.messages_consolidated == 40
        requests = summarizer_requests(fake_upstream)
        assert len(requests) >= 3
        for body in requests:
            prompt_chars = sum(len(m["content"]) for m in body["messages"])
            assert prompt_chars / 4 + body["max_tokens"] <= 600


def slow_summary() -> Script:
    """A summary that takes about 0.2 s to come back."""
    return Script(text=SUMMARY, first_token_delay_s=0.2)


def summary_gaps(fake: FakeUpstream) -> list[float]:
    sent = [r.received_at for r in fake.chat_requests() if r.body["model"] == SUMMARIZER]
    assert len(sent) >= 2
    return [later - earlier for earlier, later in itertools.pairwise(sent)]


async def test_while_turns_run_consolidation_rests_between_chunks(
    start: Start, fake_upstream: FakeUpstream
) -> None:
    # Each summary takes about 0.2 s; at a quarter duty cycle the job rests three
    # times that long after each chunk, so the next request comes no sooner.
    fake_upstream.route(SUMMARIZER, slow_summary())
    async with start(**CHUNKED, duty_cycle=0.25, job_timeout_s=2) as (clients, _events):
        session_id = await clients.session(exchange(8, words=40))
        await clients.memory.recall(TENANT, await clients.session(exchange(1)))  # a turn

        result = await clients.memory.consolidate(TENANT, session_id)

    # The rests pushed the job past its 2 s of work time without timing it out.
    assert result.offset == 16
    gaps = summary_gaps(fake_upstream)
    assert len(gaps) >= 2 and min(gaps) >= 0.2 + 3 * 0.2 * 0.9


async def test_with_no_turn_running_consolidation_runs_at_full_speed(
    start: Start, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.route(SUMMARIZER, slow_summary())
    async with start(**CHUNKED, duty_cycle=0.25) as (clients, _events):
        session_id = await clients.session(exchange(8, words=40))

        await clients.memory.consolidate(TENANT, session_id)

    assert max(summary_gaps(fake_upstream)) < 0.2 + 3 * 0.2 * 0.5


async def test_a_compaction_does_not_wait_for_a_resting_background_worker(
    start: Start, fake_upstream: FakeUpstream
) -> None:
    # The only background worker is busy with a long, resting consolidation; the
    # compaction a turn waits for runs on a worker of its own meanwhile.
    fake_upstream.route_sequence(SUMMARIZER, [slow_summary(), write_summary()])
    async with start(workers=1, **CHUNKED, duty_cycle=0.1) as (clients, events):
        await clients.memory.recall(TENANT, await clients.session(exchange(1)))  # a turn
        busy = await clients.session(exchange(8, words=40))
        consolidation = asyncio.create_task(clients.memory.consolidate(TENANT, busy))
        await events.wait_for("memory.consolidation.started")
        long = await clients.session([*exchange(4, words=20), user("And then?")])

        started = time.monotonic()
        job = await clients.compact(long)

        assert job.state == memory_pb2.JOB_STATE_SUCCEEDED and job.new_session_id
        assert time.monotonic() - started < 1.0
        assert not consolidation.done()
        consolidation.cancel()


async def test_malformed_extraction_is_retried_once_then_the_job_fails(
    start: Start, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.route(SUMMARIZER, Script(text="not json at all"))
    async with start() as (clients, events):
        session_id = await clients.session(exchange(2))

        job = await clients.memory.extract(
            memory_pb2.JobRequest(tenant=TENANT, session_id=session_id, wait=True)
        )

        assert job.state == memory_pb2.JOB_STATE_FAILED and "malformed" in job.error
        requests = summarizer_requests(fake_upstream)
        assert len(requests) == 2 and "not valid" in requests[1]["messages"][-1]["content"]
        assert list((await clients.memory.recall(TENANT, session_id)).items) == []
        (failed,) = events.of_type("memory.extraction.failed")
        assert attrs(failed)["job_id"] == job.id


async def test_duplicate_extracted_items_merge(start: Start, fake_upstream: FakeUpstream) -> None:
    first = {"discussions": [{"topic": "Trip", "points": ["dates"]}]}
    second = {"discussions": [{"topic": "trip ", "points": ["dates", "budget"]}]}
    fake_upstream.route_sequence(
        SUMMARIZER, [Script(text=json.dumps(first)), Script(text=json.dumps(second))]
    )
    async with start() as (clients, _events):
        session_id = await clients.session(exchange(1))
        request = memory_pb2.JobRequest(tenant=TENANT, session_id=session_id, wait=True)
        await clients.memory.extract(request)
        await clients.add(session_id, *exchange(1))
        await clients.memory.extract(request)

        (item,) = (await clients.memory.recall(TENANT, session_id)).items
        assert json.loads(item.json)["points"] == ["dates", "budget"]
        assert (item.mentions, item.from_seq, item.to_seq) == (2, 0, 3)


# -- compaction ----------------------------------------------------------------------


async def test_compaction_makes_a_new_session_with_the_summary_and_the_tail(
    start: Start, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.route(SUMMARIZER, write_summary())
    async with start(compact_retained_tokens=40) as (clients, events):
        messages = exchange(4, words=20)
        messages.append(user("And which train should I take?"))
        session_id = await clients.session(messages, system="Be brief.")

        job = await clients.compact(session_id)

        assert job.state == memory_pb2.JOB_STATE_SUCCEEDED and job.new_session_id
        new = await clients.sessions.get(TENANT, job.new_session_id, include_messages=True)
        assert new.session.compacted_from == session_id
        assert new.session.system_prompt == "Be brief."
        first, *tail = new.messages
        assert first.content == f"{HEADER}\n{SUMMARY}"
        # The question just asked survives, verbatim, at the end.
        assert [m.content for m in tail] == [m.content for m in messages[-len(tail) :]]
        assert tail[-1].content == "And which train should I take?"
        assert events.types("compact.") == ["compact.start", "compact.done"]
        done = events.of_type("compact.done")[0]
        assert attrs(done)["new_session_id"] == job.new_session_id
        assert attrs(done)["job_id"] == job.id and attrs(done)["tokens_in"] > 0
        (request,) = summarizer_requests(fake_upstream)
        assert [t["function"]["name"] for t in request["tools"]] == ["write_summary"]
        assert "question 0" in request["messages"][-1]["content"]


async def test_a_summariser_that_will_not_call_write_summary_is_nudged_once_then_fails(
    start: Start, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.route_sequence(SUMMARIZER, [Script(text="Here is a summary."), write_summary()])
    async with start() as (clients, _events):
        session_id = await clients.session(exchange(4, words=20))
        job = await clients.compact(session_id)
        assert job.state == memory_pb2.JOB_STATE_SUCCEEDED
        nudge = summarizer_requests(fake_upstream)[1]["messages"][-1]["content"]
        assert "write_summary" in nudge

    fake_upstream.reset()
    fake_upstream.route(SUMMARIZER, Script(text="I'd rather chat."))
    async with start() as (clients, events):
        session_id = await clients.session(exchange(4, words=20))
        job = await clients.compact(session_id)
        assert job.state == memory_pb2.JOB_STATE_FAILED and "write_summary" in job.error
        assert events.types("compact.") == ["compact.start", "compact.failed"]
        assert attrs(events.of_type("compact.failed")[0])["reason"] == "UNAVAILABLE"
        assert len(summarizer_requests(fake_upstream)) == 2


async def test_compacting_right_after_a_compaction_is_refused(
    start: Start, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.route(SUMMARIZER, write_summary())
    async with start() as (clients, _events):
        session_id = await clients.session(exchange(4, words=20))
        job = await clients.compact(session_id)

        with pytest.raises(errors.FailedPrecondition, match="just made by compaction"):
            await clients.compact(job.new_session_id)

        # Once the conversation goes on, it may be compacted again.
        await clients.add(job.new_session_id, *exchange(3, words=20))
        again = await clients.compact(job.new_session_id)
        assert again.state == memory_pb2.JOB_STATE_SUCCEEDED


async def test_three_failures_disable_compaction_until_the_session_changes(
    start: Start, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.route(SUMMARIZER, Script.error(400, "bad request"))
    async with start(max_failures=3) as (clients, _events):
        session_id = await clients.session(exchange(4, words=20))
        for _ in range(3):
            assert (await clients.compact(session_id)).state == memory_pb2.JOB_STATE_FAILED

        with pytest.raises(errors.FailedPrecondition, match="disabled until the session changes"):
            await clients.compact(session_id)

        await clients.add(session_id, *exchange(1))
        fake_upstream.route(SUMMARIZER, write_summary())
        assert (await clients.compact(session_id)).state == memory_pb2.JOB_STATE_SUCCEEDED


async def test_the_extract_pointer_starts_over_on_the_compacted_session(
    start: Start, fake_upstream: FakeUpstream
) -> None:
    empty = Script(text=json.dumps({"decisions": []}))
    async with start() as (clients, _events):
        session_id = await clients.session(exchange(4, words=20))
        fake_upstream.route(SUMMARIZER, empty)
        request = memory_pb2.JobRequest(tenant=TENANT, session_id=session_id, wait=True)
        assert (await clients.memory.extract(request)).offset == 8
        fake_upstream.route(SUMMARIZER, write_summary())
        job = await clients.compact(session_id)
        fake_upstream.route(SUMMARIZER, empty)

        extracted = await clients.memory.extract(
            memory_pb2.JobRequest(tenant=TENANT, session_id=job.new_session_id, wait=True)
        )

        new = await clients.sessions.get(TENANT, job.new_session_id)
        assert extracted.offset == new.session.message_count
        prompt = summarizer_requests(fake_upstream)[-1]["messages"][-1]["content"]
        assert HEADER in prompt  # read from seq 0 of the new session


async def test_a_repeated_compaction_of_one_head_makes_one_new_session(
    start: Start, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.route(SUMMARIZER, write_summary())
    async with start() as (clients, _events):
        session_id = await clients.session(exchange(4, words=20))
        first = await clients.compact(session_id)
        # The same head again (a redelivery, a retried request) gets the session the
        # first one made, without a model call.
        second = await clients.compact(session_id)
        assert second.new_session_id == first.new_session_id
        assert second.id != first.id
        assert len(summarizer_requests(fake_upstream)) == 1


# -- turns ---------------------------------------------------------------------------

TURN_SERVICES: tuple[ServiceName, ...] = ("llm_proxy", "session", "memory", "executor")


async def compact_due(clients: Clients, session_id: str) -> None:
    """Wait for the executor's detached RecordActivity to make compaction due."""

    async def due() -> bool:
        return (await clients.memory.recall(TENANT, session_id)).compact_due

    await eventually(due)


async def test_a_turn_past_compact_threshold_compacts_first_and_goes_on_in_the_new_session(
    start: Start, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.route(SUMMARIZER, write_summary())
    async with start(TURN_SERVICES, compact_threshold=0.5, executor={"max_output_tokens": 32}) as (
        clients,
        events,
    ):
        session_id = await clients.session(exchange(4, words=30))
        first = await clients.turn(session_id, "Where was I?")
        assert first[-1].done.session_id == session_id
        await compact_due(clients, session_id)

        turn = await clients.turn(session_id, "Which train, then?")

        assert kinds(turn)[:2] == ["compacted", "started"]
        compacted = turn[0].compacted
        assert (compacted.from_session_id, compacted.trigger) == (session_id, "pre_run")
        done = turn[-1].done
        (event,) = await events.wait_for("compact.done")
        assert done.session_id == compacted.to_session_id == attrs(event)["new_session_id"]
        assert turn[1].started.session_id == done.session_id
        assert events.types("compact.") == ["compact.start", "compact.done"]
        new = await clients.sessions.get(TENANT, done.session_id, include_messages=True)
        contents = [m.content for m in new.messages]
        assert contents[0].startswith(HEADER)
        assert contents[-2:] == ["Which train, then?", done.content]
        assert new.session.head == done.head
        # The old session is left as it was before the turn.
        old = await clients.sessions.get(TENANT, session_id)
        assert old.session.message_count == 8 + 2


async def test_a_failed_compaction_lets_the_turn_go_on_in_the_old_session(
    start: Start, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.route(SUMMARIZER, Script.error(400, "no tools here"))
    async with start(TURN_SERVICES, compact_threshold=0.5, executor={"max_output_tokens": 32}) as (
        clients,
        events,
    ):
        session_id = await clients.session(exchange(4, words=30))
        await clients.turn(session_id, "Where was I?")
        await compact_due(clients, session_id)

        turn = await clients.turn(session_id, "Which train, then?")

        assert "compacted" not in kinds(turn)
        assert turn[-1].done.session_id == session_id and turn[-1].done.content
        assert events.types("compact.") == ["compact.start", "compact.failed"]


async def test_a_mid_turn_compaction_lets_the_turn_finish_in_the_new_session(
    start: Start, fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    fake_upstream.route(SUMMARIZER, write_summary())
    fake_upstream.enqueue(
        Script(tool_calls=[("list_dir", json.dumps({"path": ""}))]),
        Script(text="Nothing in there."),
    )
    executor = {
        "tools_enabled": True,
        "compact_request_threshold": 0.3,
        "max_output_tokens": 32,
        "workspace_root": str(tmp_path / "workspaces"),
    }
    async with start(TURN_SERVICES, executor=executor) as (clients, events):
        session_id = await clients.session(exchange(3, words=30))

        turn = await clients.turn(session_id, "What is in my workspace?")

        assert kinds(turn)[0] == "started" and "compacted" in kinds(turn)
        assert kinds(turn).index("tool_result") < kinds(turn).index("compacted")
        compacted = next(e.compacted for e in turn if e.WhichOneof("event") == "compacted")
        assert (compacted.from_session_id, compacted.trigger) == (session_id, "mid_turn")
        done = turn[-1].done
        assert done.content == "Nothing in there." and done.model_calls == 2
        assert done.session_id == compacted.to_session_id
        new = await clients.sessions.get(TENANT, done.session_id, include_messages=True)
        roles = [common_pb2.Role.Name(m.role) for m in new.messages]
        # Summary, then the turn so far (question, call, result), then the answer.
        assert roles[0] == "ROLE_USER" and new.messages[0].content.startswith(HEADER)
        assert roles[-4:] == ["ROLE_USER", "ROLE_ASSISTANT", "ROLE_TOOL", "ROLE_ASSISTANT"]
        assert new.messages[-4].content == "What is in my workspace?"
        assert new.messages[-1].content == "Nothing in there."
        # The second model request was built from the new session.
        second = fake_upstream.chat_requests()[-1].body
        assert second is not None and HEADER in json.dumps(second["messages"])
        assert events.types("compact.") == ["compact.start", "compact.done"]


async def test_a_running_consolidation_does_not_slow_a_turn_down(
    start: Start, fake_upstream: FakeUpstream
) -> None:
    # The summary takes about 2 s to stream; the turn must not wait for it, even with
    # the job never resting for turns (duty cycle 1).
    fake_upstream.route(SUMMARIZER, Script(text="slow " * 20, token_delay_s=0.1))
    turn_settings = {"max_output_tokens": 32}
    async with start(TURN_SERVICES, executor=turn_settings, duty_cycle=1.0) as (clients, events):
        session_id = await clients.session(exchange(4))
        consolidation = asyncio.create_task(clients.memory.consolidate(TENANT, session_id))
        await events.wait_for("memory.consolidation.started")

        started = time.perf_counter()
        turn = await clients.turn(session_id, "Still there?")
        latency = time.perf_counter() - started

        assert turn[-1].done.content and latency < 0.5
        assert not consolidation.done()
        result = await consolidation
        assert result.consolidated and result.offset == 8


# -- replicas ------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def second_memory(first: Stack) -> AsyncIterator[Stack]:
    """Another memory replica beside `first`'s: same Redis, store, peers and bus."""
    stack = await start_stack(
        first.settings, services=["memory"], bus=first.bus, ephemeral_ports=True
    )
    try:
        yield stack
    finally:
        await stack.stop(1.0)


async def test_two_replicas_never_work_one_session_at_once(
    tmp_path: Path, fake_upstream: FakeUpstream, redis_url: str, redis_client: aioredis.Redis
) -> None:
    # Valid both as a summary and as an extraction; slow enough to overlap without leases.
    fake_upstream.route(SUMMARIZER, Script(text=json.dumps({"decisions": []}), token_delay_s=0.05))
    settings = memory_settings(tmp_path, fake_upstream, redis_url, workers=2)
    async with private_stack(settings, ["llm_proxy", "session", "memory"]) as first:
        recorder = EventRecorder(first.bus, await first.bus.subscribe())
        async with second_memory(first) as second:
            a = Clients(first)
            b = MemoryClient(second.address("memory"))
            sessions = [await a.session(exchange(2)) for _ in range(3)]
            jobs = []
            for session_id in sessions:
                request = memory_pb2.JobRequest(tenant=TENANT, session_id=session_id)
                jobs.append(await a.memory.extract(request))
                jobs.append(await b.extract(request))  # the same job (one per kind)
            # Consolidations of the same sessions, asked of the other replica at once.
            consolidated = await asyncio.gather(*(b.consolidate(TENANT, s) for s in sessions))
            jobs += [c.job for c in consolidated]
            finished = [await a.wait_job(job.id, 20) for job in jobs]
            await b.close()
            await a.close()
        await recorder.close()

    assert all(job.state == memory_pb2.JOB_STATE_SUCCEEDED for job in finished)
    assert len({job.worker for job in finished}) == 2, "both replicas should have worked"
    spans: dict[str, list[tuple[float, float]]] = {}
    opened: dict[str, float] = {}
    for event in recorder.events:
        at = event.time.ToNanoseconds() / 1e9
        job_id = attrs(event).get("job_id")
        if event.type.endswith((".started", ".start")):
            opened[str(job_id)] = at
        elif event.type.endswith((".done", ".failed")) and str(job_id) in opened:
            spans.setdefault(event.session_id, []).append((opened[str(job_id)], at))
    for session_id in sessions:
        intervals = sorted(spans[session_id])
        assert len(intervals) == 2  # extract, consolidate
        assert intervals[0][1] <= intervals[1][0], f"overlapping jobs on {session_id}"


async def test_replicas_on_one_postgresql_database_share_jobs_and_summaries(
    tmp_path: Path,
    fake_upstream: FakeUpstream,
    redis_url: str,
    redis_client: aioredis.Redis,
    postgres_url: str,
) -> None:
    # Valid both as a summary and as an extraction.
    fake_upstream.route(SUMMARIZER, Script(text=json.dumps({"decisions": []})))
    settings = memory_settings(tmp_path, fake_upstream, redis_url, database=postgres_url)
    async with (
        private_stack(settings, ["llm_proxy", "session", "memory"]) as first,
        second_memory(first) as second,
    ):
        a = Clients(first)
        b = MemoryClient(second.address("memory"))
        session_id = await a.session(exchange(2))
        request = memory_pb2.JobRequest(tenant=TENANT, session_id=session_id)
        # Asked of both replicas at once: one job, whichever stored it first.
        jobs = await asyncio.gather(a.memory.extract(request), b.extract(request))
        extracted = await a.wait_job(jobs[0].id)
        consolidated = await b.consolidate(TENANT, session_id)
        recalled = await a.memory.recall(TENANT, session_id)
        await b.close()
        await a.close()

    assert jobs[0].id == jobs[1].id and extracted.state == SUCCEEDED
    assert consolidated.consolidated and (recalled.summary, recalled.offset) == (
        consolidated.summary,
        4,
    )


async def test_a_dead_replicas_job_is_taken_over(
    tmp_path: Path, fake_upstream: FakeUpstream, redis_url: str, redis_client: aioredis.Redis
) -> None:
    fake_upstream.route(SUMMARIZER, Script(text="slow " * 10, token_delay_s=0.3))
    settings = memory_settings(tmp_path, fake_upstream, redis_url, workers=1)
    async with private_stack(settings, ["llm_proxy", "session", "memory"]) as first:
        clients = Clients(first)
        session_id = await clients.session(exchange(2))
        job = await clients.memory.extract(
            memory_pb2.JobRequest(tenant=TENANT, session_id=session_id)
        )
        running = await eventually(lambda: in_state(clients.memory, job.id, RUNNING))
        first_worker = running.worker
        async with second_memory(first) as second:
            # The first replica dies mid-job: its delivery is never acknowledged.
            await first.hosts.pop("memory").stop(0)
            other = MemoryClient(second.address("memory"))
            fake_upstream.route(SUMMARIZER, Script(text=json.dumps({"decisions": []})))
            taken = await eventually(lambda: in_state(other, job.id, SUCCEEDED), timeout=10)
            await other.close()
        await clients.close()

    assert taken.worker != first_worker and taken.offset == 4


# -- Redis restarts ------------------------------------------------------------------


async def test_a_job_redis_lost_with_a_restart_is_queued_again_and_runs(
    start: Start,
    fake_upstream: FakeUpstream,
    tmp_path: Path,
    redis_url: str,
    redis_client: aioredis.Redis,
) -> None:
    fake_upstream.route(SUMMARIZER, Script(text=SUMMARY))
    async with start() as (clients, _events):
        session_id = await clients.session(exchange(3, words=20))
        # What a restart leaves: the store has the job queued, Redis has neither the
        # job's entry nor the consumer group the workers read through.
        path = memory_settings(tmp_path, fake_upstream, redis_url).sqlite_path("memory")
        store = SqliteMemoryStore(path)
        await store.open()
        try:
            job = memory_pb2.Job(
                id="job_" + uuid.uuid4().hex,
                kind="consolidate",
                tenant=TENANT,
                session_id=session_id,
                state=memory_pb2.JOB_STATE_QUEUED,
                trigger="restart-test",
            )
            await store.put_job(job)
        finally:
            await store.close()
        await redis_client.flushdb()

        done = await clients.wait_job(job.id)

        recalled = await clients.memory.recall(TENANT, session_id)

    assert done.state == SUCCEEDED
    assert recalled.summary == SUMMARY


async def test_a_waiter_gives_up_on_a_job_no_replica_takes_and_says_why(
    start: Start, fake_upstream: FakeUpstream
) -> None:
    # The one worker is held by a summariser that never answers in time.
    fake_upstream.route(SUMMARIZER, Script(text=SUMMARY, first_token_delay_s=5))
    # Patience claim_idle_s + scan_interval_s = 0.4 s: the waiter gives up at its 0.6 s
    # look, long before the worker is free again (a first-token timeout of 2 s).
    async with start(workers=1, claim_idle_s=0.3) as (clients, _events):
        busy = await clients.session(exchange(3, words=20))
        waiting = await clients.session(exchange(3, words=20))
        request = memory_pb2.JobRequest(tenant=TENANT, session_id=busy)
        await clients.memory.extract(request)
        began = time.monotonic()

        with pytest.raises(errors.Unavailable, match="without a memory replica taking it") as gave:
            await clients.memory.extract(
                memory_pb2.JobRequest(tenant=TENANT, session_id=waiting, wait=True)
            )

    # claim_idle_s + scan_interval_s, not the job timeout's multiple it used to be.
    assert time.monotonic() - began < 5
    assert gave.value.retry_after_s is not None


async def test_a_job_queued_twice_runs_once_even_if_the_session_moved_on(
    start: Start, fake_upstream: FakeUpstream, redis_client: aioredis.Redis
) -> None:
    # A requeue can race the submit it repairs: the same job id lands on the queue
    # twice. The second delivery waits for the session's lease while the first runs.
    fake_upstream.route(SUMMARIZER, Script(text=json.dumps({"decisions": []}), token_delay_s=0.05))
    async with start(workers=2) as (clients, events):
        session_id = await clients.session(exchange(3))
        request = memory_pb2.JobRequest(tenant=TENANT, session_id=session_id)
        job = await clients.memory.extract(request)
        await events.wait_for("memory.extraction.started")
        await redis_client.xadd("threadline:memory:jobs", {"job_id": job.id})
        # The session moves on while the first delivery runs.
        await clients.add(session_id, *exchange(1))
        done = await clients.wait_job(job.id)
        await eventually(lambda: _stream_empty(redis_client), timeout=10)

    assert done.state == memory_pb2.JOB_STATE_SUCCEEDED
    assert len(summarizer_requests(fake_upstream)) == 1
    assert events.types("memory.extraction.started") == ["memory.extraction.started"]


async def _stream_empty(redis_client: aioredis.Redis) -> bool:
    return int(await redis_client.xlen("threadline:memory:jobs")) == 0
