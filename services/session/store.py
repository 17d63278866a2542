"""The session store interface that every backend (SQLite, Redis) implements.

A session is an append-only, hash-chained log of messages owned by one tenant.
Every method takes the tenant: another tenant's session is NotFound, with the
same message as a missing one, so ids never leak across tenants.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Protocol

from threadline.errors import InvalidArgument
from threadline.v1 import common_pb2, session_pb2

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500


class SessionStore(Protocol):
    async def create(
        self,
        *,
        tenant: str,
        model: str,
        system_prompt: str,
        title: str,
        metadata: Mapping[str, str],
    ) -> session_pb2.Session:
        """Create an empty session (`ses_` + 32 hex id, head "", created_at = updated_at)."""
        ...

    async def get(self, tenant: str, session_id: str) -> session_pb2.Session:
        """The session; NotFound if it is missing or belongs to another tenant."""
        ...

    async def list(
        self, tenant: str, *, page_size: int, page_token: str
    ) -> tuple[builtins.list[session_pb2.Session], str]:
        """One page of the tenant's sessions, most recently updated first.

        page_size 0 means 50, larger than 500 means 500. Returns the sessions and
        the opaque token of the next page ("" after the last page).
        """
        ...

    async def messages(
        self, tenant: str, session_id: str, *, from_seq: int = 0
    ) -> builtins.list[common_pb2.Message]:
        """Messages with seq >= from_seq, in seq order (the first message has seq 0)."""
        ...

    async def append(
        self,
        tenant: str,
        session_id: str,
        expected_head: str,
        messages: Sequence[common_pb2.Message],
    ) -> tuple[str, builtins.list[common_pb2.Message]]:
        """Append atomically if the head still equals expected_head.

        Raises HeadMismatch (with the current head) when it moved, InvalidArgument
        when a message breaks the input rules; either way nothing is stored.
        Assigns id (when empty), created_at (when unset), seq, parent_hash, hash
        and token_count. Returns the new head and the messages as stored.
        """
        ...

    def recent(
        self, tenant: str, session_id: str, *, before_seq: int | None = None
    ) -> AsyncIterator[common_pb2.Message]:
        """Messages newest first, read lazily in batches.

        Only messages with seq < before_seq when given, else those present when
        iteration starts: a caller that read the session first passes its
        message_count to see exactly the log that matches its head.
        """
        ...

    async def first_user_message(self, tenant: str, session_id: str) -> common_pb2.Message | None:
        """The session's earliest user message, or None if it has none."""
        ...

    async def close(self) -> None:
        """Release the backend; safe to call more than once."""
        ...


def page_size_or_default(page_size: int) -> int:
    """Apply the List paging rules shared by every backend."""
    if page_size < 0:
        raise InvalidArgument(f"page_size must be >= 0, got {page_size}")
    if page_size == 0:
        return DEFAULT_PAGE_SIZE
    return min(page_size, MAX_PAGE_SIZE)
