"""The end-to-end turn against a real llama.cpp server with Gemma 3 270M."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ACME_KEY, make_settings
from threadline.client import GatewayClient
from threadline.local_model import LocalModelServer, local_upstream
from threadline.stack import start_stack
from threadline.v1 import common_pb2

pytestmark = pytest.mark.real_model


async def test_a_turn_with_the_local_model(tmp_path: Path, local_model: LocalModelServer) -> None:
    settings = make_settings(tmp_path, None)
    settings = settings.model_copy(
        update={
            "llm": settings.llm.model_copy(
                update={"upstream": local_upstream(local_model.base_url)}
            )
        }
    )
    stack = await start_stack(settings, ephemeral_ports=True)
    try:
        async with GatewayClient(stack.address("gateway"), api_key=ACME_KEY) as client:
            session = await client.create_session(system_prompt="Answer in one short sentence.")
            events = [
                e
                async for e in client.converse(
                    session.id, "What is the sky's colour?", max_tokens=12
                )
            ]
            deltas = "".join(e.delta for e in events if e.WhichOneof("event") == "delta")
            done = events[-1].done
            detail = await client.get_session(session.id, verify_chain=True)
    finally:
        await stack.stop(1.0)

    assert done.finish_reason in (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH)
    assert deltas and done.content == deltas
    assert done.model == "gemma-3-270m" and done.upstream == "local-llama-cpp"
    assert done.usage.completion_tokens > 0
    assert detail.chain_verified
    assert [(m.role, m.content) for m in detail.messages] == [
        (common_pb2.ROLE_USER, "What is the sky's colour?"),
        (common_pb2.ROLE_ASSISTANT, deltas),
    ]
