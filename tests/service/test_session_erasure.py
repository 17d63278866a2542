"""Deleting or expiring a session erases everything derived from it.

A canary phrase goes through turns, a tool write, consolidation, extraction and a
fork; after DeleteSession (and after retention expiry) it is in no store the test
can read (session and memory databases, every Redis key, the workspaces), and
every API answers NOT_FOUND for the deleted ids exactly as for ids never used.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.conftest import ACME_KEY, ADMIN_KEY, FAKE_MODEL, OTHER_KEY, make_settings
from tests.postgres_schema import postgres_schema
from tests.service.conftest import EventRecorder, attrs, private_stack, upstream_config
from tests.service.erasure_stores import holding
from tests.waiting import eventually
from threadline import errors
from threadline.channels import streaming
from threadline.client import GatewayClient
from threadline.config import Settings
from threadline.peers import ExecutorClient, MemoryClient, SessionClient
from threadline.stack import Stack
from threadline.testing.fake_upstream import FakeUpstream, Script
from threadline.v1 import executor_pb2, memory_pb2, session_pb2

CANARY = "Quokka-Heliotrope-7731"
SUMMARIZER = "summarizer"
TENANT = "acme"
UNKNOWN = "ses_" + "5" * 32


def erasure_settings(
    tmp_path: Path, fake: FakeUpstream, redis_url: str, **overrides: Any
) -> Settings:
    upstream = upstream_config(fake.base_url, first_token_s=2, total_s=10)
    upstream["models"] = [FAKE_MODEL, SUMMARIZER]
    session = overrides.pop("session", {})
    memory = overrides.pop("memory", {})
    return make_settings(
        tmp_path,
        fake.base_url,
        redis_url=redis_url,
        llm={"upstream": upstream, "default_route": ""},
        memory={"model": SUMMARIZER, "erasure_poll_s": 0.1, "job_timeout_s": 5.0, **memory},
        executor={
            "tools_enabled": True,
            "workspace_root": str(tmp_path / "workspaces"),
            "tool_rules": [{"path": "", "permission": "write"}],
            "erasure_poll_s": 0.1,
            "tasks": {
                "default_agent_type": "echo",
                "agent_types": {
                    "echo": {
                        "description": "Repeats the prompt.",
                        "runner": "command",
                        "argv": [
                            "sh",
                            "-c",
                            'echo "got: $1" > out.txt; cat out.txt',
                            "sh",
                            "{prompt}",
                        ],
                    }
                },
            },
        },
        session=session,
        **overrides,
    )


@contextlib.asynccontextmanager
async def backend_settings(
    kind: str, tmp_path: Path, fake: FakeUpstream, redis_url: str, postgres: str, **extra: Any
) -> AsyncIterator[Settings]:
    """Settings with the session (and memory) store of `kind`."""
    session = dict(extra.pop("session", {}))
    if kind == "sqlite":
        yield erasure_settings(tmp_path, fake, redis_url, session=session, **extra)
    elif kind == "redis":
        session["database"] = redis_url
        yield erasure_settings(tmp_path, fake, redis_url, session=session, **extra)
    else:
        async with postgres_schema(postgres) as url:
            session["database"] = url
            yield erasure_settings(
                tmp_path, fake, redis_url, session=session, memory={"database": url}, **extra
            )


class Clients:
    def __init__(self, stack: Stack) -> None:
        self.gateway = GatewayClient(stack.address("gateway"), api_key=ACME_KEY)
        self.sessions = SessionClient(stack.address("session"))
        self.memory = MemoryClient(stack.address("memory"))
        self.executor = ExecutorClient(stack.address("executor"))

    async def executor_turn(self, session_id: str, text: str) -> list[executor_pb2.ToolResult]:
        """A turn run on the executor directly; its tool results."""
        request = executor_pb2.RunTurnRequest(tenant=TENANT, session_id=session_id, input=text)
        return [
            event.tool_result
            async for event in streaming(self.executor.run_turn(request))
            if event.WhichOneof("event") == "tool_result"
        ]

    async def close(self) -> None:
        await self.gateway.close()
        for peer in (self.sessions, self.memory, self.executor):
            await peer.close()


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[tuple[Clients, EventRecorder]]:
    async with private_stack(settings) as stack:
        events = EventRecorder(stack.bus, await stack.bus.subscribe())
        await events.settle()
        clients = Clients(stack)
        try:
            yield clients, events
        finally:
            await clients.close()
            await events.close()


async def converse(gateway: GatewayClient, session_id: str, text: str) -> str:
    """A turn through the public API; the answer's text."""
    answer = ""
    async for event in gateway.converse(session_id, text):
        if event.WhichOneof("event") == "delta":
            answer += event.delta
    return answer


async def spread_the_canary(clients: Clients, fake: FakeUpstream) -> tuple[str, list[str]]:
    """A session holding the canary everywhere it can go; its id and its memory jobs."""
    session = await clients.gateway.create_session(system_prompt="Be brief.")
    for i in range(5):
        fake.enqueue(Script(text=f"Noted {i}."))
        await converse(clients.gateway, session.id, f"Remember {CANARY}, note {i}.")
    fake.enqueue(
        Script(tool_calls=[("write_file", json.dumps({"path": "c.txt", "content": CANARY}))]),
        Script(text="Saved."),
    )
    await converse(clients.gateway, session.id, "Save it to a file.")
    decision = {"options": [CANARY, "none"], "chosen": CANARY, "rationale": CANARY}
    fake.route_sequence(
        SUMMARIZER,
        [
            Script(text=f"The user asked to remember {CANARY}."),
            Script(text=json.dumps({"decisions": [decision]})),
        ],
    )
    consolidated = await clients.memory.consolidate(TENANT, session.id)
    assert CANARY in consolidated.summary
    extraction = await clients.memory.extract(
        memory_pb2.JobRequest(tenant=TENANT, session_id=session.id, wait=True)
    )
    assert extraction.state == memory_pb2.JOB_STATE_SUCCEEDED, extraction.error
    recalled = await clients.memory.recall(TENANT, session.id)
    assert CANARY in recalled.summary and any(CANARY in i.json for i in recalled.items)
    return session.id, [consolidated.job.id, extraction.id]


async def refusal(call: Callable[[], Awaitable[object]]) -> errors.ThreadlineError:
    with pytest.raises(errors.ThreadlineError) as refused:
        await call()
    return refused.value


async def assert_unknown_everywhere(clients: Clients, session_id: str, job_ids: list[str]) -> None:
    """Every API answers for `session_id` exactly as for an id never used."""
    gateway, memory = clients.gateway, clients.memory

    def calls(sid: str) -> list[Callable[[], Awaitable[object]]]:
        return [
            lambda: gateway.get_session(sid),
            lambda: gateway.export_session(sid),
            lambda: gateway.fork_session(sid, ""),
            lambda: gateway.delete_session(sid),
            lambda: gateway.list_derived_sessions(sid),
            lambda: gateway.compact_session(sid),
            lambda: converse(gateway, sid, "hello"),
            lambda: memory.recall(TENANT, sid),
            lambda: memory.consolidate(TENANT, sid),
            lambda: memory.extract(memory_pb2.JobRequest(tenant=TENANT, session_id=sid)),
            lambda: memory.record_activity(
                memory_pb2.RecordActivityRequest(tenant=TENANT, session_id=sid)
            ),
            lambda: clients.sessions.build_context(
                session_pb2.BuildContextRequest(tenant=TENANT, session_id=sid, budget_tokens=100)
            ),
            lambda: collect_turn(clients.executor, sid),
        ]

    for deleted_call, unknown_call in zip(calls(session_id), calls(UNKNOWN), strict=True):
        deleted, unknown = await refusal(deleted_call), await refusal(unknown_call)
        assert deleted.code == unknown.code == "NOT_FOUND", (deleted, unknown)
        assert deleted.message.replace(session_id, "ID") == unknown.message.replace(UNKNOWN, "ID")
    unknown_job = "job_" + "7" * 32
    never = await refusal(lambda: gateway.get_memory_job(unknown_job))
    for job_id in job_ids:
        refused = await refusal(functools.partial(gateway.get_memory_job, job_id))
        assert refused.code == never.code == "NOT_FOUND"
        assert refused.message.replace(job_id, "ID") == never.message.replace(unknown_job, "ID")


async def task_ended(gateway: GatewayClient, task_id: str) -> bool:
    return (await gateway.get_task(task_id)).status in ("succeeded", "failed", "cancelled")


async def collect_turn(executor: ExecutorClient, session_id: str) -> None:
    request = executor_pb2.RunTurnRequest(tenant=TENANT, session_id=session_id, input="hi")
    async for _ in streaming(executor.run_turn(request)):
        pass


@pytest.mark.parametrize("kind", ["sqlite", "redis", "postgresql"])
async def test_a_deleted_session_and_its_fork_leave_no_trace(
    kind: str,
    tmp_path: Path,
    fake_upstream: FakeUpstream,
    redis_url: str,
    postgres_url: str,
    redis_client: aioredis.Redis,
) -> None:
    async with (
        backend_settings(kind, tmp_path, fake_upstream, redis_url, postgres_url) as settings,
        running(settings) as (clients, events),
    ):
        session_id, job_ids = await spread_the_canary(clients, fake_upstream)
        head = (await clients.gateway.get_session(session_id)).session.head
        fork = await clients.gateway.fork_session(session_id, head)
        kept = await clients.gateway.create_session(system_prompt="Unrelated.")
        exported = await clients.gateway.export_session(session_id)
        assert [s.id for s in await clients.gateway.list_derived_sessions(session_id)] == [fork.id]
        assert await holding(CANARY, settings, redis_client)

        deleted = await clients.gateway.delete_session(session_id, with_descendants=True)

        assert deleted == [session_id, fork.id]
        erased = {e.session_id: attrs(e) for e in await events.wait_for("session.erased", count=2)}
        assert erased[session_id]["reason"] == "deleted"
        assert erased[session_id]["removed"]["memory"]["items"] == 1
        assert erased[session_id]["removed"]["memory"]["summaries"] == 1
        assert erased[session_id]["removed"]["executor"] == {"workspaces": 1, "files": 1}
        assert await holding(CANARY, settings, redis_client) == []
        await assert_unknown_everywhere(clients, session_id, job_ids)
        await assert_unknown_everywhere(clients, fork.id, [])
        # A turn's own calls leave the session check to the turn (session_checked):
        # one that arrives late finds nothing and, refused by memory's tombstone,
        # stores nothing (a stored activity this large would make compaction due).
        late = memory_pb2.RecordActivityRequest(
            tenant=TENANT,
            session_id=session_id,
            prompt_tokens=10**6,
            context_window_tokens=1000,
            session_checked=True,
        )
        with contextlib.suppress(errors.NotFound):
            await clients.memory.record_activity(late)
        recalled = await clients.memory.recall(TENANT, session_id, session_checked=True)
        assert (recalled.summary, list(recalled.items), recalled.compact_due) == ("", [], False)
        assert [s.id for s in (await clients.gateway.list_sessions()).sessions] == [kept.id]
        # The export brings the conversation back, never the id, the memory or the files.
        imported = await clients.gateway.import_session(exported)
        assert imported.id != session_id
        recalled = await clients.memory.recall(TENANT, imported.id)
        assert (recalled.summary, list(recalled.items)) == ("", [])
        fake_upstream.enqueue(
            Script(tool_calls=[("list_dir", "{}")]), Script(text="Nothing there.")
        )
        turn = await clients.executor_turn(imported.id, "What files do I have?")
        assert [r.content for r in turn] == ["'.' is empty"]


@pytest.mark.parametrize("kind", ["sqlite", "redis", "postgresql"])
async def test_an_expired_session_leaves_no_trace(
    kind: str,
    tmp_path: Path,
    fake_upstream: FakeUpstream,
    redis_url: str,
    postgres_url: str,
    redis_client: aioredis.Redis,
) -> None:
    retention = {"ttl_s": 3.0, "cleanup_interval_s": 0.2}
    async with (
        backend_settings(
            kind, tmp_path, fake_upstream, redis_url, postgres_url, session=retention
        ) as settings,
        running(settings) as (clients, events),
    ):
        session_id, job_ids = await spread_the_canary(clients, fake_upstream)

        (expired,) = await events.wait_for("session.expired", session_id=session_id, timeout=15)
        (erased,) = await events.wait_for("session.erased", session_id=session_id, timeout=10)

        assert attrs(expired)["reason"] == attrs(erased)["reason"] == "idle"
        assert await holding(CANARY, settings, redis_client) == []
        await assert_unknown_everywhere(clients, session_id, job_ids)


async def test_lineage_lists_forks_and_compactions_and_delete_can_spare_them(
    tmp_path: Path, fake_upstream: FakeUpstream, redis_url: str, redis_client: aioredis.Redis
) -> None:
    async with running(erasure_settings(tmp_path, fake_upstream, redis_url)) as (clients, _):
        gateway = clients.gateway
        source = await gateway.create_session()
        fake_upstream.enqueue(Script(text="Hello."))
        await converse(gateway, source.id, "Hi")
        head = (await gateway.get_session(source.id)).session.head
        fork = await gateway.fork_session(source.id, head)
        compacted = await clients.sessions.create(
            session_pb2.SessionsCreateRequest(tenant=TENANT, compacted_from=source.id)
        )
        grandchild = await gateway.fork_session(fork.id, "")

        derived = await gateway.list_derived_sessions(source.id)

        assert [(s.id, s.forked_from, s.compacted_from) for s in derived] == [
            (fork.id, source.id, ""),
            (compacted.id, "", source.id),
            (grandchild.id, fork.id, ""),
        ]
        async with GatewayClient(clients.gateway.address, api_key=OTHER_KEY) as other:
            with pytest.raises(errors.NotFound):
                await other.list_derived_sessions(source.id)
            with pytest.raises(errors.NotFound):
                await other.delete_session(source.id, with_descendants=True)

        assert await gateway.delete_session(source.id) == [source.id]

        # Without the flag the descendants stay, and still name where they came from.
        kept = {s.id: s for s in (await gateway.list_sessions()).sessions}
        assert set(kept) == {fork.id, compacted.id, grandchild.id}
        assert kept[fork.id].forked_from == source.id


async def test_erasing_a_tenant_leaves_nothing_of_it_and_spares_the_others(
    tmp_path: Path, fake_upstream: FakeUpstream, redis_url: str, redis_client: aioredis.Redis
) -> None:
    settings = erasure_settings(tmp_path, fake_upstream, redis_url)
    async with running(settings) as (clients, events):
        await spread_the_canary(clients, fake_upstream)
        fake_upstream.enqueue(Script(text="Fine."))
        second = await clients.gateway.create_session()
        await converse(clients.gateway, second.id, f"Also {CANARY}")
        async with (
            GatewayClient(clients.gateway.address, api_key=OTHER_KEY) as other,
            GatewayClient(clients.gateway.address, api_key=ADMIN_KEY) as admin,
        ):
            task = await clients.gateway.submit_task(CANARY, agent_type="echo")
            await eventually(lambda: task_ended(clients.gateway, task.id), timeout=15)
            assert await holding(f"got: {CANARY}", settings, redis_client)
            fake_upstream.enqueue(Script(text="Theirs."))
            theirs = await other.create_session()
            await converse(other, theirs.id, "Keep me: Wombat-Cerulean")
            with pytest.raises(errors.PermissionDenied):
                await other.erase_tenant(TENANT)
            with pytest.raises(errors.InvalidArgument) as too_long:
                await admin.erase_tenant("t" * 10_000)
            assert "128" in too_long.value.message and "t" * 200 not in too_long.value.message

            erased = await clients.gateway.erase_tenant()

            assert erased.sessions == 2 and erased.tasks == 1 and erased.tasks_still_running == 0
            (done,) = await events.wait_for("tenant.erased", timeout=10)
            assert done.tenant == TENANT
            # What the cascade removed of the tenant's sessions, by count (the task went
            # in the call itself: its counts are the gateway's answer).
            totals = attrs(done)
            assert totals["sessions"] == 2
            assert totals["removed"]["memory"]["summaries"] == 1
            assert totals["removed"]["memory"]["items"] == 1
            assert totals["removed"]["executor"] == {"workspaces": 1, "files": 1}
            assert len(events.of_type("session.erased")) == 2
            assert await holding(CANARY, settings, redis_client) == []
            assert (await clients.gateway.list_sessions()).sessions == []
            assert [s.id for s in (await other.list_sessions()).sessions] == [theirs.id]
            assert await holding("Wombat-Cerulean", settings, redis_client)
            # An admin key may erase another tenant.
            assert (await admin.erase_tenant("other")).sessions == 1
            await events.wait_for("tenant.erased", count=2, timeout=10)
            assert await holding("Wombat-Cerulean", settings, redis_client) == []


async def test_a_job_running_when_its_session_goes_leaves_nothing_and_its_waiter_hears(
    tmp_path: Path, fake_upstream: FakeUpstream, redis_url: str, redis_client: aioredis.Redis
) -> None:
    settings = erasure_settings(tmp_path, fake_upstream, redis_url)
    async with running(settings) as (clients, events):
        session = await clients.gateway.create_session()
        for i in range(3):
            fake_upstream.enqueue(Script(text=f"Noted {i}."))
            await converse(clients.gateway, session.id, f"Remember {CANARY}, note {i}.")
        # A summary that takes a while to come, so the deletion lands in the middle.
        fake_upstream.route(
            SUMMARIZER, Script(text=f"The user said {CANARY} thrice.", token_delay_s=0.3)
        )
        waiting = asyncio.create_task(clients.memory.consolidate(TENANT, session.id))
        await events.wait_for("memory.consolidation.started", session_id=session.id)

        await clients.gateway.delete_session(session.id)
        await events.wait_for("session.erased", session_id=session.id)

        # NOT_FOUND either way the race goes: the job erased under its waiter ("memory
        # job ... not found"), or the job failing because its session was gone first
        # ("session ... not found").
        with pytest.raises(errors.NotFound) as refused:
            await asyncio.wait_for(waiting, 10)
        assert refused.value.message.endswith("not found")

        # The job ends (its summary arriving after the erasure, or failing) and
        # writes nothing anywhere.
        async def job_ended() -> bool:
            ended = ("memory.consolidation.done", "memory.consolidation.failed")
            return any(events.of_type(t, session_id=session.id) for t in ended)

        await eventually(job_ended, timeout=10)
        assert await holding(CANARY, settings, redis_client) == []


async def test_a_turn_streaming_when_its_session_goes_leaves_no_draft(
    tmp_path: Path, fake_upstream: FakeUpstream, redis_url: str, redis_client: aioredis.Redis
) -> None:
    # The draft (what a turn streamed so far, in Redis for a next turn to store if this
    # executor dies) is saved again after the erasure dropped it, while the turn goes on.
    settings = erasure_settings(tmp_path, fake_upstream, redis_url)
    async with running(settings) as (clients, events):
        session = await clients.gateway.create_session()
        fake_upstream.enqueue(Script(text=f"{CANARY} " * 150, token_delay_s=0.02))
        turn = asyncio.create_task(refusal(lambda: converse(clients.gateway, session.id, "Go")))

        async def drafted() -> bool:
            return bool([key async for key in redis_client.scan_iter(match="*draft*")])

        await eventually(drafted)
        await clients.gateway.delete_session(session.id)
        await events.wait_for("session.erased", session_id=session.id)

        assert (await asyncio.wait_for(turn, 10)).code == "NOT_FOUND"
        assert await holding(CANARY, settings, redis_client) == []


async def test_the_owners_calls_check_their_arguments(
    tmp_path: Path, fake_upstream: FakeUpstream, redis_url: str, redis_client: aioredis.Redis
) -> None:
    async with running(erasure_settings(tmp_path, fake_upstream, redis_url)) as (clients, _):
        sessions = clients.sessions
        with pytest.raises(errors.InvalidArgument, match="limit must be 0 to 500, got 501"):
            await sessions.pending_erasures("memory", 501)
        with pytest.raises(errors.InvalidArgument, match="'billing' is not an erasure owner"):
            await sessions.pending_erasures("billing")
        with pytest.raises(errors.InvalidArgument, match="not an erasure owner") as long_owner:
            await sessions.pending_erasures("x" * 5000)
        assert "x" * 100 not in long_owner.value.message
        with pytest.raises(errors.NotFound, match=f"no erasure of session {UNKNOWN} awaits"):
            await sessions.acknowledge_erasure("memory", UNKNOWN, {})
        with pytest.raises(errors.InvalidArgument, match="1001 ids, the limit is 1000"):
            await sessions.erased_among([UNKNOWN] * 1001)
        assert await sessions.erased_among([UNKNOWN]) == []
