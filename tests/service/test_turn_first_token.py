"""The way to a turn's first token: the user's message is stored beside the context
and the model's stream, yet the model sees it exactly once and no answer is
relayed before it is stored."""

from __future__ import annotations

from tests.builders import TENANT, new_session
from threadline.channels import streaming
from threadline.peers import ExecutorClient, SessionClient
from threadline.testing.fake_upstream import FakeUpstream, Script
from threadline.v1 import common_pb2, executor_pb2


async def test_the_input_is_stored_before_the_first_delta_and_sent_to_the_model_once(
    executor: ExecutorClient, sessions: SessionClient, fake_upstream: FakeUpstream
) -> None:
    session_id = await new_session(sessions)
    fake_upstream.default = Script(text="Noted, thanks.")
    for n in range(8):  # the append lands before or after the context is built
        text = f"Message number {n} about Lyon."
        request = executor_pb2.RunTurnRequest(tenant=TENANT, session_id=session_id, input=text)
        kinds: list[str] = []
        async for event in streaming(executor.run_turn(request)):
            kind = str(event.WhichOneof("event"))
            if kind == "delta" and "delta" not in kinds:
                # What the caller sees of the answer is only sent once the input is stored.
                # (The answer may be stored too by the time this read arrives.)
                detail = await sessions.get(TENANT, session_id, include_messages=True)
                users = [m.content for m in detail.messages if m.role == common_pb2.ROLE_USER]
                assert users[-1] == text
            kinds.append(kind)
        assert kinds[0] == "started" and kinds[-1] == "done"
        sent = fake_upstream.chat_requests()[-1].body["messages"]
        contents = [m["content"] for m in sent if m["role"] == "user"]
        assert contents.count(text) == 1  # in the prompt once, last
        assert sent[-1]["content"] == text

    detail = await sessions.get(TENANT, session_id, include_messages=True, verify_chain=True)
    assert [m.role for m in detail.messages] == [
        common_pb2.ROLE_USER,
        common_pb2.ROLE_ASSISTANT,
    ] * 8
