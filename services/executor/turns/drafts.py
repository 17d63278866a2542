"""Drafts: the answer a turn is streaming, kept where the next turn can find it.

A turn stores a cut answer itself when it can (upstream failure, client gone,
shutdown). When its executor dies (SIGKILL, OOM, node loss) nothing is left to
store it, though the user saw it. So while the model streams, the turn saves
what it has as a draft beside its lease, at most every CHECKPOINT_S; the next
turn to take the session's lease, on any replica, stores a draft it finds as an
interrupted answer, then goes on. What a draft misses is at most the last
CHECKPOINT_S of the stream.

A draft is stored only right after the message it answers (its `head`): once
the session has moved on, the answer was stored by its own turn, and the draft
is dropped, so nothing is ever stored twice.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.executor.turns.peers import Sessions
from threadline import errors
from threadline.events import EventPublisher
from threadline.logs import get_logger
from threadline.v1 import common_pb2

log = get_logger(__name__)

#: How often a streaming turn saves its draft (and so the most a crash can lose).
CHECKPOINT_S = 0.2
#: How long the first delta of an answer may wait for its draft to be saved.
FIRST_SAVE_WAIT_S = 0.25
#: A draft nobody picked up is dropped after this long.
DRAFT_TTL_S = 7 * 24 * 3600


@dataclass(frozen=True)
class Draft:
    tenant: str
    session_id: str
    #: The head the answer follows: the draft is stored only if it is still the head.
    head: str
    turn_id: str
    content: str


class Drafts(Protocol):
    async def save(self, draft: Draft) -> None: ...

    async def get(self, session_id: str) -> Draft | None: ...

    async def drop(self, session_id: str) -> None: ...


class LocalDrafts:
    """For a single process without Redis: a crash loses its drafts with it."""

    def __init__(self) -> None:
        self._drafts: dict[str, Draft] = {}

    async def save(self, draft: Draft) -> None:
        self._drafts[draft.session_id] = draft

    async def get(self, session_id: str) -> Draft | None:
        return self._drafts.get(session_id)

    async def drop(self, session_id: str) -> None:
        self._drafts.pop(session_id, None)


class RedisDrafts:
    def __init__(self, client: aioredis.Redis, *, prefix: str) -> None:
        self._client = client
        self._prefix = prefix

    async def save(self, draft: Draft) -> None:
        await self._client.set(
            self._prefix + draft.session_id, json.dumps(asdict(draft)), ex=DRAFT_TTL_S
        )

    async def get(self, session_id: str) -> Draft | None:
        raw = await self._client.get(self._prefix + session_id)
        return Draft(**json.loads(raw)) if raw is not None else None

    async def drop(self, session_id: str) -> None:
        await self._client.delete(self._prefix + session_id)


class Checkpoints:
    """Saves one model call's partial answer now and then, without holding up the stream.

    The first save is awaited (for at most FIRST_SAVE_WAIT_S) before the first
    delta goes out, so a user never sees an answer no draft holds; later saves
    run in the background, and while one is in flight the next waits for the
    following delta. A failed save is logged and the stream goes on: a draft
    only matters if this process dies.
    """

    def __init__(
        self, drafts: Drafts, tenant: str, session_id: str, head: str, turn_id: str
    ) -> None:
        self._drafts = drafts
        self._key = (tenant, session_id, head, turn_id)
        self._saving: asyncio.Task[None] | None = None
        self._last = 0.0

    async def saw(self, text: Callable[[], str]) -> None:
        """Called on every delta with what builds the answer so far: the text is only
        built when a save is due (joining it on every delta grows with the answer)."""
        if self._saving is not None and not self._saving.done():
            return
        now = time.monotonic()
        if now - self._last < CHECKPOINT_S:
            return
        content = text()
        if not content:
            return
        first = self._saving is None
        self._last = now
        self._saving = asyncio.create_task(self._save(Draft(*self._key, content)))
        if first:
            await asyncio.wait([self._saving], timeout=FIRST_SAVE_WAIT_S)

    async def _save(self, draft: Draft) -> None:
        try:
            await self._drafts.save(draft)
        except (RedisError, OSError) as exc:
            log.warning("turn.draft_not_saved", session_id=draft.session_id, error=str(exc))

    async def settle(self) -> None:
        """Wait for a save in flight, so a later drop is not overtaken by it."""
        if self._saving is not None:
            await asyncio.wait([self._saving])


async def store_draft(
    drafts: Drafts, sessions: Sessions, events: EventPublisher, session_id: str
) -> bool:
    """Store the session's draft, if one was left, as an interrupted answer; True if stored.

    Called by a turn holding the session's lease, before it starts: no other turn
    can be writing the session, so a head that moved means the draft's own turn
    stored its answer, and the draft is dropped.
    """
    draft = await drafts.get(session_id)
    if draft is None:
        return False
    message = common_pb2.Message(
        role=common_pb2.ROLE_ASSISTANT, content=draft.content, interrupted=True
    )
    stored = True
    try:
        await sessions.append(
            draft.tenant, session_id, draft.head, [message], request_id=f"{draft.turn_id}:draft"
        )
    except errors.HeadMismatch:
        stored = False
    await drafts.drop(session_id)
    if stored:
        log.info("turn.draft_stored", session_id=session_id, turn_id=draft.turn_id)
        events.emit(
            "turn.interrupted",
            tenant=draft.tenant,
            session_id=session_id,
            turn_id=draft.turn_id,
            error="its executor stopped; the answer so far was stored from its last draft",
            partial_chars=len(draft.content),
        )
    return stored
