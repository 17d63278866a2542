"""The task classifier and the `local` runner against the real llm_proxy server,
the fake upstream scripting the model's answers, and a real workspace."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from services.executor.tasks.classifier import AgentType, Classification, Classifier
from services.executor.tasks.local_runner import LocalRunner
from services.executor.tasks.records import RunOutcome, TaskRecord, new_task_id
from services.executor.turns.tools import ToolBox
from services.executor.turns.workspace import PermissionRule, Workspace
from tests.builders import TENANT
from tests.conftest import FAKE_MODEL
from tests.service.conftest import private_stack
from threadline.config import Settings
from threadline.peers import LlmClient
from threadline.stack import Stack
from threadline.testing.fake_upstream import FakeUpstream, Script, estimate_prompt_tokens

TYPES = [
    AgentType("general", "Works on files in the workspace with tools.", "local"),
    AgentType("reviewer", "Reviews code and writes a review report.", "local"),
]
CANARY = "Ibis-Vermilion-2208"


@pytest.fixture
async def stack(settings: Settings, redis_client: aioredis.Redis) -> AsyncIterator[Stack]:
    async with private_stack(settings, ["llm_proxy"]) as running:
        yield running


# -- the classifier -------------------------------------------------------------------


async def test_the_classifier_picks_the_type_the_model_answers(
    llm: LlmClient, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(
        Script(text='{"agent_type": "reviewer", "reasons": "it asks for a review"}')
    )

    chosen = await Classifier(llm, TYPES, default="general").classify(
        "Review the diff in src/", tenant=TENANT
    )

    assert chosen == Classification("reviewer", "it asks for a review", fell_back=False)
    [request] = fake_upstream.chat_requests()
    body = request.body
    assert body["response_format"] == {"type": "json_object"}
    assert body["temperature"] == 0 and body["max_tokens"] <= 200
    system = body["messages"][0]["content"]
    assert "reviewer: Reviews code" in system and "general: Works on files" in system
    assert body["messages"][-1]["content"] == "Review the diff in src/"


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        ("I would pick the reviewer.", "not JSON"),
        ('["reviewer"]', "not a JSON object"),
        ('{"reasons": "no idea"}', "names no agent_type"),
        ('{"agent_type": "poet", "reasons": "it rhymes"}', 'unknown agent type: "poet"'),
    ],
)
async def test_an_unusable_answer_falls_back_to_the_default(
    llm: LlmClient, fake_upstream: FakeUpstream, answer: str, why: str
) -> None:
    fake_upstream.enqueue(Script(text=answer))

    chosen = await Classifier(llm, TYPES, default="general").classify("Review the diff")

    assert chosen.agent_type == "general" and chosen.fell_back
    assert why in chosen.reasons and "default type 'general'" in chosen.reasons


async def test_a_failed_call_falls_back_to_the_default(
    llm: LlmClient, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(Script.error(400, "json mode is broken today", error_type="invalid"))

    chosen = await Classifier(llm, TYPES, default="general").classify("Review the diff")

    assert chosen.agent_type == "general" and chosen.fell_back
    assert "classifier call failed" in chosen.reasons and "json mode is broken" in chosen.reasons


@pytest.mark.parametrize(
    "answer",
    [
        f"Sure: {CANARY}",
        json.dumps([CANARY]),
        json.dumps({"reasons": CANARY}),
        json.dumps({"agent_type": CANARY}),
        Script.error(400, f"cannot classify {CANARY}", error_type="invalid"),
    ],
    ids=["not_json", "not_object", "no_type", "unknown_type", "call_failed"],
)
async def test_a_fallback_logs_why_without_the_models_words(
    llm: LlmClient, fake_upstream: FakeUpstream, answer: str | Script
) -> None:
    # The log outlives the task: DeleteTask, retention and EraseTenant cannot reach it.
    fake_upstream.enqueue(answer if isinstance(answer, Script) else Script(text=answer))

    with capture_logs() as logs:
        chosen = await Classifier(llm, TYPES, default="general").classify(f"Review {CANARY}")

    assert chosen.fell_back and CANARY in chosen.reasons  # the task's record tells its owner
    [fell_back] = [line for line in logs if line["event"] == "classifier.fell_back"]
    assert fell_back["reason"].startswith("the classifier")
    assert not [line for line in logs if CANARY in json.dumps(line, default=str)]


async def test_a_single_type_is_chosen_without_asking_the_model(
    llm: LlmClient, fake_upstream: FakeUpstream
) -> None:
    chosen = await Classifier(llm, TYPES[:1], default="general").classify("Anything")

    assert chosen == Classification("general", "only one agent type is registered", False)
    assert fake_upstream.chat_requests() == []


# -- the local runner -----------------------------------------------------------------


class OutputLog:
    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []

    async def __call__(self, entry: dict[str, Any]) -> None:
        # Round-trips through JSON: every entry must be a stream-json line.
        self.entries.append(json.loads(json.dumps(entry)))

    def types(self) -> list[str]:
        return [e["type"] for e in self.entries]


def writable_toolbox(path: str) -> ToolBox:
    return ToolBox(Workspace(Path(path), [PermissionRule("", "write")]))


def new_task(tmp_path: Path, prompt: str, *, budget_tokens: int = 0) -> TaskRecord:
    return TaskRecord(
        id=new_task_id(),
        tenant=TENANT,
        prompt=prompt,
        agent_type="general",
        runner="local",
        workspace=str(tmp_path / "workspace"),
        budget_tokens=budget_tokens,
    )


def generated_tokens(script: Script | None) -> int:
    """completion_tokens as the fake counts them: one per delta it streamed."""
    assert script is not None
    tool_deltas = sum(1 + min(max(len(args), 1), 3) for _, args in script.tool_calls)
    return len(script.content_tokens()) + tool_deltas


def usage_reported(fake: FakeUpstream) -> tuple[int, int]:
    requests = fake.chat_requests()
    return (
        sum(estimate_prompt_tokens(r.body["messages"]) for r in requests),
        sum(generated_tokens(r.script) for r in requests),
    )


async def test_a_two_round_task_writes_its_file_and_logs_every_step(
    llm: LlmClient, fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    arguments = json.dumps({"path": "out/report.txt", "content": "all good"})
    fake_upstream.enqueue(
        Script(tool_calls=[("write_file", arguments)]),
        Script(text="Wrote out/report.txt."),
    )
    task = new_task(tmp_path, "Write a report to out/report.txt.")
    output = OutputLog()

    outcome = await LocalRunner(llm, writable_toolbox).run(task, output)

    tokens_in, tokens_out = usage_reported(fake_upstream)
    assert outcome == RunOutcome(
        status="succeeded", model=FAKE_MODEL, tokens_in=tokens_in, tokens_out=tokens_out
    )
    assert tokens_in > 0 and tokens_out > 0
    assert (tmp_path / "workspace/out/report.txt").read_text() == "all good"
    assert output.types() == [
        "assistant",
        "tool_call",
        "tool_result",
        "delta",
        "assistant",
        "answer",
    ]
    call, result = output.entries[1], output.entries[2]
    assert (call["name"], call["arguments"]) == ("write_file", arguments)
    assert (result["id"], result["name"], result["status"]) == (call["id"], "write_file", "ok")
    assert "out/report.txt" in result["content"]
    assert output.entries[3]["text"] == "Wrote out/report.txt."
    assert output.entries[-1] == {"type": "answer", "content": "Wrote out/report.txt."}
    # The second call carried the conversation so far, the tool's result last.
    first, second = fake_upstream.chat_requests()
    assert [m["role"] for m in first.body["messages"]] == ["system", "user"]
    assert {t["function"]["name"] for t in first.body["tools"]} >= {"write_file", "read_file"}
    messages = second.body["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool"]
    assert messages[3]["tool_call_id"] == call["id"]


async def test_max_iterations_stops_a_model_that_calls_tools_forever(
    llm: LlmClient, fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    fake_upstream.default = Script(tool_calls=[("list_dir", "{}")])
    output = OutputLog()

    outcome = await LocalRunner(llm, writable_toolbox, max_iterations=3).run(
        new_task(tmp_path, "List the workspace."), output
    )

    assert outcome.status == "failed"
    assert outcome.reason == "stopped after 3 model calls (max_iterations)"
    assert len(fake_upstream.chat_requests()) == 3
    # The last call's tools are not run: nothing would read their results.
    assert output.types().count("tool_result") == 2 and "answer" not in output.types()
    assert (outcome.tokens_in, outcome.tokens_out) == usage_reported(fake_upstream)


async def test_a_task_over_its_token_budget_fails(
    llm: LlmClient, fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    fake_upstream.default = Script(tool_calls=[("list_dir", "{}")])
    budget = 200

    outcome = await LocalRunner(llm, writable_toolbox, max_iterations=50).run(
        new_task(tmp_path, "List the workspace.", budget_tokens=budget), OutputLog()
    )

    assert outcome.status == "failed"
    assert outcome.reason.startswith("token budget exceeded")
    assert outcome.tokens_in + outcome.tokens_out > budget
    # It stopped at the first call that went over, long before max_iterations.
    calls = len(fake_upstream.chat_requests())
    assert 1 < calls < 50
    assert (outcome.tokens_in, outcome.tokens_out) == usage_reported(fake_upstream)


async def test_an_upstream_refusal_fails_the_task_with_its_message(
    llm: LlmClient, fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    fake_upstream.enqueue(Script.error(400, "the prompt is malformed", error_type="invalid"))

    outcome = await LocalRunner(llm, writable_toolbox).run(
        new_task(tmp_path, "Do it."), OutputLog()
    )

    assert outcome.status == "failed" and "the prompt is malformed" in outcome.reason


async def test_a_cut_answer_fails_the_task(
    llm: LlmClient, fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    fake_upstream.enqueue(Script(text="I have started the work and", fault="cut", fault_after=2))
    output = OutputLog()

    outcome = await LocalRunner(llm, writable_toolbox).run(new_task(tmp_path, "Do it."), output)

    assert outcome.status == "failed" and outcome.reason.startswith("the model's answer was cut")
    assert output.entries[0] == {"type": "delta", "text": "I have "}
    assert "answer" not in output.types()
