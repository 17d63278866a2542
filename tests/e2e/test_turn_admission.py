"""A turn refused for anything it can be refused for up front (its options, its
model, its session) leaves the session as it was: nothing stored, nothing sent
to the model, INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import math

import pytest

from tests.conftest import FAKE_MODEL
from threadline import errors
from threadline.client import GatewayClient
from threadline.stack import Stack
from threadline.testing.fake_upstream import FakeUpstream, Script

INT32_MAX = 2**31 - 1
#: Longest refusal a caller should be handed.
SHORT = 300


async def turn(gateway: GatewayClient, session_id: str, **options: object) -> None:
    async for _ in gateway.converse(session_id, "What is the capital of France?", **options):  # type: ignore[arg-type]
        pass


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"model": "no-such-model"}, "options.model"),
        ({"max_tokens": INT32_MAX}, "options.max_tokens"),
        ({"max_tokens": -1}, "options.max_tokens"),
        ({"temperature": 7.5}, "options.temperature"),
        ({"temperature": math.nan}, "options.temperature"),
        ({"model": "m" * 10_000}, "options.model"),
    ],
)
async def test_a_turn_refused_for_its_options_stores_nothing(
    stack: Stack,
    gateway: GatewayClient,
    fake_upstream: FakeUpstream,
    options: dict[str, object],
    field: str,
) -> None:
    session = await gateway.create_session(system_prompt="Be brief.")

    with pytest.raises(errors.InvalidArgument, match=field.replace(".", r"\.")) as caught:
        await turn(gateway, session.id, **options)

    assert len(caught.value.message) < SHORT
    detail = await gateway.get_session(session.id)
    assert list(detail.messages) == [] and detail.session.head == session.head
    assert fake_upstream.chat_requests() == []


async def test_after_a_refused_model_a_known_one_makes_the_turn(
    stack: Stack, gateway: GatewayClient, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.default = Script(text="Paris.")
    session = await gateway.create_session()
    with pytest.raises(errors.InvalidArgument, match=f"known models and routes are {FAKE_MODEL}"):
        await turn(gateway, session.id, model="fake-model-2")

    await turn(gateway, session.id, model=FAKE_MODEL, max_tokens=64, temperature=0.2)

    detail = await gateway.get_session(session.id)
    assert [m.content for m in detail.messages] == ["What is the capital of France?", "Paris."]


async def test_a_session_whose_model_is_unknown_refuses_turns_before_storing(
    stack: Stack, gateway: GatewayClient, fake_upstream: FakeUpstream
) -> None:
    session = await gateway.create_session(model="retired-model")

    with pytest.raises(errors.InvalidArgument, match="session model"):
        await turn(gateway, session.id)

    assert list((await gateway.get_session(session.id)).messages) == []
