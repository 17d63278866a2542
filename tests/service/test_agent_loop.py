"""The agent loop: model ↔ tool rounds through the real executor, session and
llm_proxy servers, the fake upstream scripting the tool calls."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from services.executor.turns.session_workspaces import tenant_key
from tests.builders import TENANT, new_session
from tests.conftest import make_settings
from tests.service.conftest import EventRecorder, attrs, private_stack, run_turn
from threadline.config import Settings
from threadline.peers import ExecutorClient, SessionClient
from threadline.stack import Stack
from threadline.testing.fake_upstream import FakeUpstream, Script
from threadline.v1 import common_pb2, executor_pb2


@pytest.fixture
def settings(tmp_path: Path, fake_upstream: FakeUpstream, redis_url: str) -> Settings:
    return make_settings(
        tmp_path,
        fake_upstream.base_url,
        redis_url=redis_url,
        executor={
            "tools_enabled": True,
            "max_iterations": 3,
            "workspace_root": str(tmp_path / "workspaces"),
            "tool_rules": [
                {"path": "", "permission": "write"},
                {"path": "docs", "permission": "read"},
            ],
        },
    )


@pytest.fixture
async def stack(settings: Settings, redis_client: aioredis.Redis) -> AsyncIterator[Stack]:
    async with private_stack(settings) as running:
        yield running


def tool_results(turn: list[executor_pb2.TurnEvent]) -> list[executor_pb2.ToolResult]:
    return [e.tool_result for e in turn if e.WhichOneof("event") == "tool_result"]


def workspace(settings: Settings, session_id: str, tenant: str = TENANT) -> Path:
    return Path(settings.executor.workspace_root) / "sessions" / tenant_key(tenant) / session_id


async def test_a_two_tool_turn_stores_every_message_in_order(
    settings: Settings,
    executor: ExecutorClient,
    sessions: SessionClient,
    fake_upstream: FakeUpstream,
) -> None:
    session_id = await new_session(sessions)
    fake_upstream.enqueue(
        Script(
            tool_calls=[
                ("write_file", json.dumps({"path": "notes/plan.txt", "content": "step one"})),
                ("read_file", json.dumps({"path": "notes/plan.txt"})),
            ]
        ),
        Script(text="The plan says: step one."),
    )

    events = await run_turn(executor, session_id, "Write the plan, then read it back.")

    results = tool_results(events)
    assert [(r.name, r.status) for r in results] == [("write_file", "ok"), ("read_file", "ok")]
    assert "step one" in results[1].content
    done = events[-1].done
    assert done.content == "The plan says: step one." and done.model_calls == 2
    assert (workspace(settings, session_id) / "notes/plan.txt").read_text() == "step one"
    detail = await sessions.get(TENANT, session_id, include_messages=True, verify_chain=True)
    roles = [common_pb2.Role.Name(m.role) for m in detail.messages]
    assert roles == ["ROLE_USER", "ROLE_ASSISTANT", "ROLE_TOOL", "ROLE_TOOL", "ROLE_ASSISTANT"]
    calls = detail.messages[1].tool_calls
    assert [m.tool_call_id for m in detail.messages[2:4]] == [c.id for c in calls]
    # The second model request carried the tool results back.
    second = fake_upstream.chat_requests()[-1].body
    assert second is not None
    assert [m["role"] for m in second["messages"]][-3:] == ["assistant", "tool", "tool"]
    assert {t["function"]["name"] for t in second["tools"]} >= {"read_file", "write_file"}


@pytest.mark.parametrize(
    ("call", "why", "rule"),
    [
        (("read_file", {"path": "../../etc/passwd"}), "leaves the workspace", "leaves_workspace"),
        (("read_file", {"path": "/etc/passwd"}), "/etc/passwd", "outside_workspace"),
        (("write_file", {"path": "docs/readme.md", "content": "x"}), "read-only", "read_only"),
    ],
)
async def test_escapes_and_forbidden_writes_are_refused_and_reported(
    settings: Settings,
    executor: ExecutorClient,
    sessions: SessionClient,
    fake_upstream: FakeUpstream,
    events: EventRecorder,
    call: tuple[str, dict[str, str]],
    why: str,
    rule: str,
) -> None:
    session_id = await new_session(sessions)
    name, arguments = call
    fake_upstream.enqueue(Script(tool_calls=[(name, json.dumps(arguments))]), Script(text="ok"))

    turn = await run_turn(executor, session_id, "try it")

    (result,) = tool_results(turn)
    assert result.status == "denied" and why in result.content
    (denied,) = await events.wait_for("tool.denied", session_id=session_id)
    # The event names the rule; the path the model chose stays in the conversation.
    assert attrs(denied)["tool"] == name and attrs(denied)["rule"] == rule
    assert arguments["path"] not in str(denied)
    assert not (workspace(settings, session_id) / "docs/readme.md").exists()
    assert turn[-1].done.content == "ok"


async def test_a_symlink_out_of_the_workspace_is_refused(
    settings: Settings,
    executor: ExecutorClient,
    sessions: SessionClient,
    fake_upstream: FakeUpstream,
    tmp_path: Path,
) -> None:
    session_id = await new_session(sessions)
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    root = workspace(settings, session_id)
    root.mkdir(parents=True)
    (root / "link.txt").symlink_to(secret)
    fake_upstream.enqueue(
        Script(tool_calls=[("read_file", json.dumps({"path": "link.txt"}))]), Script(text="ok")
    )
    turn = await run_turn(executor, session_id, "read the link")
    (result,) = tool_results(turn)
    assert result.status == "denied" and "top secret" not in result.content


async def test_unknown_tools_and_bad_arguments_come_back_as_results(
    executor: ExecutorClient, sessions: SessionClient, fake_upstream: FakeUpstream
) -> None:
    session_id = await new_session(sessions)
    fake_upstream.enqueue(
        Script(tool_calls=[("launch_rocket", "{}"), ("read_file", "not json")]),
        Script(text="Sorry."),
    )
    turn = await run_turn(executor, session_id, "go")
    results = tool_results(turn)
    assert [r.status for r in results] == ["error", "error"]
    assert "launch_rocket" in results[0].content
    assert turn[-1].done.content == "Sorry."


async def test_max_iterations_stops_a_model_that_calls_tools_forever(
    executor: ExecutorClient, sessions: SessionClient, fake_upstream: FakeUpstream
) -> None:
    session_id = await new_session(sessions)
    fake_upstream.default = Script(tool_calls=[("list_dir", "{}")])
    turn = await run_turn(executor, session_id, "loop")
    done = turn[-1].done
    assert done.model_calls == 3
    assert done.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert "max_iterations" in done.error
    assert len(fake_upstream.chat_requests()) == 3
    detail = await sessions.get(TENANT, session_id, include_messages=True, verify_chain=True)
    # Two executed rounds are stored with their results; the third call is not.
    assert [common_pb2.Role.Name(m.role) for m in detail.messages] == [
        "ROLE_USER",
        "ROLE_ASSISTANT",
        "ROLE_TOOL",
        "ROLE_ASSISTANT",
        "ROLE_TOOL",
        "ROLE_ASSISTANT",
    ]
    assert not detail.messages[-1].tool_calls


async def test_a_turn_records_its_cost_from_the_price_table(
    tmp_path: Path, fake_upstream: FakeUpstream, redis_url: str, redis_client: aioredis.Redis
) -> None:
    settings = make_settings(
        tmp_path,
        fake_upstream.base_url,
        redis_url=redis_url,
        executor={"prices": {"fake-model": {"input_per_1k": 3.0, "output_per_1k": 6.0}}},
    )
    async with private_stack(settings) as running:
        executor = ExecutorClient(running.address("executor"))
        sessions = SessionClient(running.address("session"))
        try:
            session_id = await new_session(sessions)
            done = (await run_turn(executor, session_id, "What does it cost?"))[-1].done
        finally:
            await executor.close()
            await sessions.close()
    expected = done.usage.prompt_tokens * 3.0 / 1000 + done.usage.completion_tokens * 6.0 / 1000
    assert done.usage.prompt_tokens > 0 and done.cost == pytest.approx(expected)


async def test_a_write_longer_than_a_stored_message_is_done_and_the_turn_goes_on(
    settings: Settings,
    executor: ExecutorClient,
    sessions: SessionClient,
    fake_upstream: FakeUpstream,
) -> None:
    session_id = await new_session(sessions)
    content = "0123456789" * 4000  # 40,000 characters: over the 32,000 a message holds
    fake_upstream.enqueue(
        Script(tool_calls=[("write_file", json.dumps({"path": "big.txt", "content": content}))]),
        Script(text="Written."),
    )

    turn = await run_turn(executor, session_id, "Write the big file.")

    (result,) = tool_results(turn)
    assert result.status == "ok"
    assert "created 'big.txt' (40.0 KB)" in result.content
    assert "the tool ran with all of them, but the call is stored shortened" in result.content
    assert turn[-1].done.content == "Written."
    assert (workspace(settings, session_id) / "big.txt").read_text() == content
    # Stored within the session's limit, still naming the file; the chain holds.
    detail = await sessions.get(TENANT, session_id, include_messages=True, verify_chain=True)
    (call,) = detail.messages[1].tool_calls
    limit = settings.session.max_message_chars
    assert len(call.arguments_json) <= limit
    assert json.loads(call.arguments_json)["path"] == "big.txt"
    assert detail.messages[2].content == result.content
    # The model heard back about its call.
    second = fake_upstream.chat_requests()[-1].body
    assert second is not None
    assert "created 'big.txt'" in second["messages"][-1]["content"]


async def test_a_result_longer_than_a_stored_message_is_cut_and_the_turn_goes_on(
    tmp_path: Path, fake_upstream: FakeUpstream, redis_url: str, redis_client: aioredis.Redis
) -> None:
    settings = make_settings(
        tmp_path,
        fake_upstream.base_url,
        redis_url=redis_url,
        session={"max_message_chars": 3000},
        executor={
            "tools_enabled": True,
            "workspace_root": str(tmp_path / "workspaces"),
            "tool_rules": [{"path": "", "permission": "write"}],
            "max_tool_output_chars": 16_000,
        },
    )
    async with private_stack(settings) as running:
        executor = ExecutorClient(running.address("executor"))
        sessions = SessionClient(running.address("session"))
        try:
            session_id = await new_session(sessions)
            root = workspace(settings, session_id)
            root.mkdir(parents=True)
            (root / "long.txt").write_text("z" * 10_000)
            fake_upstream.enqueue(
                Script(tool_calls=[("read_file", json.dumps({"path": "long.txt"}))]),
                Script(text="It is long."),
            )
            turn = await run_turn(executor, session_id, "Read long.txt.")
            detail = await sessions.get(TENANT, session_id, include_messages=True)
        finally:
            await executor.close()
            await sessions.close()

    (result,) = tool_results(turn)
    assert len(result.content) <= 3000
    assert result.content.endswith("characters left out; the conversation keeps 3000 per message]")
    assert turn[-1].done.content == "It is long."
    assert detail.messages[2].content == result.content
