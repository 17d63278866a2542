"""Session lifecycle through the public gateway API: fork, export/import, delete."""

from __future__ import annotations

import json

import pytest

from tests.conftest import OTHER_KEY
from threadline import errors
from threadline.client import GatewayClient
from threadline.stack import Stack
from threadline.testing.fake_upstream import FakeUpstream, Script
from threadline.v1 import memory_pb2


async def test_fork_export_import_and_delete_through_the_gateway(
    stack: Stack, gateway: GatewayClient, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.default = Script(text="An answer.")
    session = await gateway.create_session(title="original")
    for text in ("first question", "second question"):
        _ = [e async for e in gateway.converse(session.id, text)]
    detail = await gateway.get_session(session.id)

    fork = await gateway.fork_session(session.id, detail.messages[1].hash)
    forked = await gateway.get_session(fork.id, verify_chain=True)
    assert fork.forked_from == session.id
    assert [m.content for m in forked.messages] == ["first question", "An answer."]

    lines = await gateway.export_session(session.id)
    await gateway.delete_session(session.id)
    with pytest.raises(errors.NotFound):
        await gateway.get_session(session.id)
    restored = await gateway.import_session(lines)
    assert restored.id != session.id and restored.head == detail.session.head

    async with GatewayClient(stack.address("gateway"), api_key=OTHER_KEY) as other:
        with pytest.raises(errors.NotFound):
            await other.fork_session(restored.id, "")
        with pytest.raises(errors.NotFound):
            await other.export_session(restored.id)
        with pytest.raises(errors.NotFound):
            await other.delete_session(restored.id)
        # Another tenant importing the same export gets its own session: the answer
        # never says whether the exported id is held by someone else.
        theirs = await other.import_session(lines)
        assert theirs.id not in (session.id, restored.id)
    assert (await gateway.get_session(restored.id, verify_chain=True)).chain_verified


async def test_compact_session_through_the_gateway(
    stack: Stack, gateway: GatewayClient, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.default = Script(text="An answer that goes on for a while. " * 60)
    session = await gateway.create_session(title="long")
    for text in ("first question", "second question", "third question"):
        _ = [e async for e in gateway.converse(session.id, text)]
    fake_upstream.default = Script(
        tool_calls=[("write_summary", json.dumps({"summary": "Three questions asked."}))]
    )

    job = await gateway.compact_session(session.id)

    assert job.state == memory_pb2.JOB_STATE_SUCCEEDED
    assert (await gateway.get_memory_job(job.id)).new_session_id == job.new_session_id
    new = await gateway.get_session(job.new_session_id, verify_chain=True)
    assert new.session.compacted_from == session.id and new.chain_verified
    assert new.messages[0].content == "[Compacted context summary]\nThree questions asked."
    assert new.messages[-1].content == (await gateway.get_session(session.id)).messages[-1].content

    async with GatewayClient(stack.address("gateway"), api_key=OTHER_KEY) as other:
        with pytest.raises(errors.NotFound):
            await other.compact_session(session.id)
        with pytest.raises(errors.NotFound):
            await other.get_memory_job(job.id)
    with pytest.raises(errors.InvalidArgument, match="malformed session id"):
        await gateway.compact_session("nope")
