"""The user's message of a turn, being stored while the turn works towards its first token.

Appending the message is one session round trip that nothing before the first
token needs to wait for: recall, the context and the model's stream go on beside
it. The context is built from the session as it stood when the append started,
or just after it: `include_in` adds the message to a context built before the
append landed (the context's head says which), so the model always sees it
exactly once. The turn waits for the append before it relays anything, so an
answer is never shown for a message that was not stored; a refused append ends
the turn there (its model stream is closed unread). The append runs as its own
task and is never cancelled with the turn: what the user said is not lost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from threadline.logs import get_logger
from threadline.v1 import common_pb2, session_pb2

log = get_logger(__name__)


class PendingInput:
    def __init__(
        self, append: Coroutine[Any, Any, str], *, before: str, message: common_pb2.Message
    ) -> None:
        self._task = asyncio.ensure_future(append)
        self._task.add_done_callback(_log_failure)
        #: The session's head before the append.
        self.before = before
        self.message = message

    @property
    def tokens(self) -> int:
        """The message's size in tokens, estimated, to hold back room for it."""
        return len(self.message.content) // 4 + 4

    def include_in(self, context: session_pb2.BuildContextResponse) -> None:
        """Add the message to a context built before the append landed."""
        if context.head == self.before:
            context.messages.append(self.message)
            context.token_estimate += self.tokens

    async def head(self) -> str:
        """The session's head after the append; raises why it was refused."""
        # Shielded: a turn cancelled while it waits must not cancel the append.
        return await asyncio.shield(self._task)


def _log_failure(task: asyncio.Future[str]) -> None:
    # Retrieved here so a turn that ended before waiting for it leaves no
    # "exception never retrieved" behind; the turn itself reports the refusal.
    if not task.cancelled() and task.exception() is not None:
        log.info("turn.input_not_stored", error=str(task.exception()))
