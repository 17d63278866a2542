"""A turn whose model stream is cut and restarted: the rollback reaches the caller
through the executor and the gateway, and the session stores only the final answer.

The whole stack runs on port 0; llm_proxy's routes point at the fake upstream
under two model names, a primary that breaks and a fallback that answers.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.builders import TENANT, new_session
from tests.conftest import ACME_KEY, make_settings
from tests.service.conftest import private_stack
from threadline.client import GatewayClient
from threadline.config import Settings
from threadline.peers import SessionClient
from threadline.stack import Stack
from threadline.testing.fake_upstream import FakeUpstream, Script
from threadline.v1 import common_pb2, executor_pb2

FULL = "Lyon sits where the Rhone meets the Saone, in the east of France."
CUT_AFTER = 4


def _upstream(fake: FakeUpstream, name: str, model: str) -> dict[str, Any]:
    timeouts = {"connect_s": 2, "first_token_s": 3, "idle_between_chunks_s": 2, "total_s": 30}
    return {"name": name, "base_url": fake.base_url, "model": model, "timeouts": timeouts}


def _route(on_cut: str) -> dict[str, Any]:
    targets = [{"upstream": "a", "model": "model-a"}, {"upstream": "c", "model": "model-c"}]
    return {"targets": targets, "on_cut": on_cut}


@pytest.fixture
def settings(tmp_path: Path, fake_upstream: FakeUpstream, redis_url: str) -> Settings:
    return make_settings(
        tmp_path,
        None,
        redis_url=redis_url,
        llm={
            "upstreams": [
                _upstream(fake_upstream, "a", "model-a"),
                _upstream(fake_upstream, "c", "model-c"),
            ],
            "routes": {"restarting": _route("restart"), "interrupting": _route("interrupt")},
            "default_route": "restarting",
            "retry": {"max_attempts": 1, "base_delay_s": 0.01, "max_delay_s": 0.01, "budget_s": 5},
        },
        executor={
            "tools_enabled": True,
            "max_iterations": 3,
            "workspace_root": str(tmp_path / "workspaces"),
            "tool_rules": [{"path": "", "permission": "write"}],
        },
    )


@pytest.fixture
async def stack(settings: Settings, redis_client: aioredis.Redis) -> AsyncIterator[Stack]:
    async with private_stack(settings) as running:
        yield running


@pytest.fixture
async def gateway(stack: Stack) -> AsyncIterator[GatewayClient]:
    async with GatewayClient(stack.address("gateway"), api_key=ACME_KEY) as client:
        yield client


def kinds(events: list[executor_pb2.TurnEvent]) -> list[str]:
    return [str(e.WhichOneof("event")) for e in events]


def text_between(events: list[executor_pb2.TurnEvent], start: int, end: int) -> str:
    return "".join(e.delta for e in events[start:end] if e.WhichOneof("event") == "delta")


async def stored(sessions: SessionClient, session_id: str) -> list[common_pb2.Message]:
    detail = await sessions.get(TENANT, session_id, include_messages=True, verify_chain=True)
    return list(detail.messages)


async def test_a_restarted_answer_is_rolled_back_for_the_caller_and_stored_whole(
    gateway: GatewayClient, sessions: SessionClient, fake_upstream: FakeUpstream
) -> None:
    session_id = await new_session(sessions)
    fake_upstream.route("model-a", Script(text=FULL, fault="cut", fault_after=CUT_AFTER))
    fake_upstream.route("model-c", Script(text=FULL))

    events = [e async for e in gateway.converse(session_id, "Where is Lyon?")]

    at = kinds(events).index("rollback")
    rollback = events[at].rollback
    assert (rollback.reason, rollback.upstream, rollback.model_call) == ("restart", "c", 1)
    assert rollback.error.startswith("reset: ")
    # The caller saw the cut start, was told to discard it, then got the whole answer.
    assert text_between(events, 0, at) == " ".join(FULL.split(" ")[:CUT_AFTER]) + " "
    assert text_between(events, at, len(events)) == FULL
    done = events[-1].done
    assert done.finish_reason == common_pb2.FINISH_REASON_STOP
    assert (done.content, done.upstream) == (FULL, "c")
    messages = await stored(sessions, session_id)
    assert [(m.role, m.content, m.interrupted) for m in messages] == [
        (common_pb2.ROLE_USER, "Where is Lyon?", False),
        (common_pb2.ROLE_ASSISTANT, FULL, False),
    ]


async def test_under_interrupt_the_cut_answer_is_stored_interrupted_as_before(
    gateway: GatewayClient, sessions: SessionClient, fake_upstream: FakeUpstream
) -> None:
    session_id = await new_session(sessions)
    fake_upstream.route("model-a", Script(text=FULL, fault="cut", fault_after=CUT_AFTER))
    fake_upstream.route("model-c", Script(text=FULL))

    events = [e async for e in gateway.converse(session_id, "Where is Lyon?", model="interrupting")]

    assert "rollback" not in kinds(events)
    done = events[-1].done
    partial = " ".join(FULL.split(" ")[:CUT_AFTER]) + " "
    assert done.finish_reason == common_pb2.FINISH_REASON_INTERRUPTED
    assert done.content == partial and done.upstream == "a"
    answer = (await stored(sessions, session_id))[-1]
    assert (answer.content, answer.interrupted) == (partial, True)
    assert fake_upstream.chat_requests()[-1].model == "model-a"  # c was never asked


async def test_a_tool_call_cut_mid_stream_is_restarted_and_the_tool_runs_once(
    settings: Settings,
    gateway: GatewayClient,
    sessions: SessionClient,
    fake_upstream: FakeUpstream,
) -> None:
    session_id = await new_session(sessions)
    call = ("write_file", json.dumps({"path": "notes/lyon.txt", "content": "on the Rhone"}))
    # The primary sends the call's id and name, then is cut; after the tool round it
    # answers the second model call normally.
    fake_upstream.route_sequence(
        "model-a",
        [Script(tool_calls=[call], fault="cut", fault_after=1), Script(text="Noted.")],
    )
    fake_upstream.route("model-c", Script(tool_calls=[call]))

    events = [e async for e in gateway.converse(session_id, "Note where Lyon is.")]

    names = kinds(events)
    at = names.index("rollback")
    assert "tool_call_delta" in names[:at]  # the partial call had reached the caller
    assert "tool_result" not in names[:at]
    assert events[at].rollback.model_call == 1
    results = [e.tool_result for e in events if e.WhichOneof("event") == "tool_result"]
    assert [(r.name, r.status) for r in results] == [("write_file", "ok")]  # once
    done = events[-1].done
    assert done.content == "Noted." and done.model_calls == 2
    messages = await stored(sessions, session_id)
    roles = [common_pb2.Role.Name(m.role) for m in messages]
    assert roles == ["ROLE_USER", "ROLE_ASSISTANT", "ROLE_TOOL", "ROLE_ASSISTANT"]
    (stored_call,) = messages[1].tool_calls
    assert (stored_call.name, stored_call.arguments_json) == call


async def test_a_rolled_back_answer_leaves_no_draft_of_the_discarded_text(
    gateway: GatewayClient,
    sessions: SessionClient,
    fake_upstream: FakeUpstream,
    redis_client: aioredis.Redis,
) -> None:
    session_id = await new_session(sessions)
    fake_upstream.route("model-a", Script(text=FULL, fault="cut", fault_after=CUT_AFTER))
    # The new answer's tokens come slowly: the draft is read between two of them.
    fake_upstream.route("model-c", Script(text="Lyon is on the Rhone.", token_delay_s=0.5))

    seen_rollback = False
    async for event in gateway.converse(session_id, "Where is Lyon?"):
        kind = event.WhichOneof("event")
        seen_rollback = seen_rollback or kind == "rollback"
        if seen_rollback and kind == "delta":
            # If this process died now, the next turn would store the draft.
            draft = await redis_client.get(f"threadline:turn-draft:{session_id}")
            assert draft is None or b"sits" not in draft
            break
    assert seen_rollback
