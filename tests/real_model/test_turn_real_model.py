"""Conversations through the whole stack against the real bundled model (SmolLM2 135M Instruct)."""

from __future__ import annotations

import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tests.conftest import ACME_KEY, make_settings
from tests.waiting import eventually
from threadline.client import GatewayClient
from threadline.errors import Unavailable
from threadline.local_model import LOCAL_UPSTREAM_NAME, LocalModelServer
from threadline.stack import Stack, start_stack
from threadline.v1 import common_pb2, executor_pb2

pytestmark = [pytest.mark.real_model, pytest.mark.asyncio(loop_scope="session")]

SYSTEM = "Answer in one short sentence."
_COLOURS = (
    *("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"),
    *("grey", "gold", "silver", "violet", "indigo", "teal", "cyan", "magenta", "beige", "navy"),
)


async def _stack_on(tmp_path: Path, server: LocalModelServer) -> Stack:
    settings = make_settings(tmp_path, None)
    llm = settings.llm.model_copy(update={"upstream": server.upstream()})
    return await start_stack(settings.model_copy(update={"llm": llm}), ephemeral_ports=True)


async def _turn(
    client: GatewayClient, session_id: str, text: str, max_tokens: int = 64
) -> tuple[str, executor_pb2.TurnDone]:
    deltas: list[str] = []
    done = None
    async for event in client.converse(session_id, text, max_tokens=max_tokens):
        kind = event.WhichOneof("event")
        if kind == "delta":
            deltas.append(event.delta)
        elif kind == "done":
            done = event.done
    assert done is not None, "the turn ended without a done event"
    return "".join(deltas), done


async def test_a_question_gets_an_answer_that_ends_by_itself(
    tmp_path: Path, local_model: LocalModelServer
) -> None:
    stack = await _stack_on(tmp_path, local_model)
    try:
        async with GatewayClient(stack.address("gateway"), api_key=ACME_KEY) as client:
            session = await client.create_session(system_prompt=SYSTEM)
            text, done = await _turn(client, session.id, "What is the capital of France?", 128)
            detail = await client.get_session(session.id, verify_chain=True)
    finally:
        await stack.stop(1.0)

    assert done.finish_reason == common_pb2.FINISH_REASON_STOP, text
    assert text.strip() and done.content == text
    assert done.model == "smollm2-135m" and done.upstream == LOCAL_UPSTREAM_NAME
    assert 0 < done.usage.completion_tokens < 128
    assert detail.chain_verified
    assert [(m.role, m.content) for m in detail.messages] == [
        (common_pb2.ROLE_USER, "What is the capital of France?"),
        (common_pb2.ROLE_ASSISTANT, text),
    ]


@pytest.mark.slow
async def test_twenty_turns_in_one_session_keep_the_server_alive(
    tmp_path: Path, local_model: LocalModelServer
) -> None:
    pid, restarts = local_model.pid, local_model.restarts
    questions = [f"Name one thing that is {colour}." for colour in _COLOURS]
    stack = await _stack_on(tmp_path, local_model)
    try:
        async with GatewayClient(stack.address("gateway"), api_key=ACME_KEY) as client:
            session = await client.create_session(system_prompt=SYSTEM)
            answers = [await _turn(client, session.id, q, max_tokens=32) for q in questions]
            detail = await client.get_session(session.id, verify_chain=True)
    finally:
        await stack.stop(1.0)

    assert len(answers) == 20
    for text, done in answers:
        assert text.strip()
        assert done.finish_reason in (
            common_pb2.FINISH_REASON_STOP,
            common_pb2.FINISH_REASON_LENGTH,
        )
    assert local_model.pid == pid and local_model.restarts == restarts
    assert detail.chain_verified and len(detail.messages) == 40


@pytest.mark.slow
async def test_a_killed_server_fails_one_turn_cleanly_and_comes_back(
    tmp_path: Path, local_model_required: None
) -> None:
    # A server of its own: killing the shared one would disturb the other tests.
    server = LocalModelServer(tmp_path / "model", restart_delay_s=2.0)
    await server.start()
    stack = await _stack_on(tmp_path, server)
    try:
        async with GatewayClient(stack.address("gateway"), api_key=ACME_KEY) as client:
            session = await client.create_session(system_prompt=SYSTEM)
            first, _ = await _turn(client, session.id, "Say hello.")
            assert first.strip()

            with capture_logs() as logs:
                pid = server.pid
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
                await eventually(_down(server), timeout=10)
                with pytest.raises(Unavailable) as failed:
                    await _turn(client, session.id, "Are you there?")
                await server.wait_ready(120)
            again, done = await _turn(client, session.id, "Say hello again.")
    finally:
        await stack.stop(1.0)
        await server.stop()

    message = failed.value.message
    assert LOCAL_UPSTREAM_NAME in message
    for internal in ("127.0.0.1", "refused", str(server.log_path)):
        assert internal not in message
    assert again.strip() and done.upstream == LOCAL_UPSTREAM_NAME
    assert server.restarts == 1
    exited = [e for e in logs if e["event"] == "local_model.exited"]
    assert len(exited) == 1
    assert exited[0]["exit_status"] == "signal SIGKILL" and exited[0]["pid"] == pid
    assert exited[0]["log_path"] == str(server.log_path)
    assert any("llama" in line for line in exited[0]["last_lines"])


def _down(server: LocalModelServer) -> Callable[[], Awaitable[bool]]:
    async def probe() -> bool:
        return server.pid is None

    return probe
