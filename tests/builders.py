"""Messages and sessions as the tests build them."""

from __future__ import annotations

from collections.abc import Sequence

from threadline.peers import SessionClient
from threadline.v1 import common_pb2, session_pb2

#: The tenant of tests/conftest.py's ACME_KEY, and of the tests that call services directly.
TENANT = "acme"


def user(content: str) -> common_pb2.Message:
    return common_pb2.Message(role=common_pb2.ROLE_USER, content=content)


def assistant(content: str) -> common_pb2.Message:
    return common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, content=content)


def exchange(n: int, words: int = 10) -> list[common_pb2.Message]:
    """n user/assistant pairs of about `words` words each."""
    out = []
    for i in range(n):
        out.append(user(f"question {i} " + "lorem " * words))
        out.append(assistant(f"answer {i} " + "ipsum " * words))
    return out


async def new_session(
    sessions: SessionClient,
    messages: Sequence[common_pb2.Message] = (),
    *,
    system_prompt: str = "",
    tenant: str = TENANT,
) -> str:
    """A new session holding `messages` (one append); its id."""
    created = await sessions.create(
        session_pb2.SessionsCreateRequest(tenant=tenant, system_prompt=system_prompt)
    )
    if messages:
        await sessions.append(tenant, created.id, "", list(messages))
    return created.id


async def add(
    sessions: SessionClient, session_id: str, *messages: common_pb2.Message, tenant: str = TENANT
) -> None:
    """Append `messages` at the session's current head."""
    head = (await sessions.get(tenant, session_id)).session.head
    await sessions.append(tenant, session_id, head, list(messages))
