"""Where each session's tool workspace lives on this replica, and its removal when the
session goes.

A workspace is `<root>/<sha256(tenant)[:16]>/<session id>`. The tenant is part of
the key: a session id can pass to another tenant (an import under the id of a
deleted session), and the new owner must never find the old owner's files. The
tenant's name itself never becomes a path.

Two ways a workspace goes when its session is deleted or expires:

- the erasure cascade (threadline/erasure_owner.py): the replica polls the session
  service for deletions the executor has not acknowledged, removes the workspace
  and acknowledges. Durable: a deletion waits in the session store until some
  replica has done it, across crashes and restarts.
- the events (`session.deleted`, `session.expired`): every executor replica keeps
  its own copy of a workspace, so every replica also listens and removes its own
  at once. This path is best effort (an event can be missed while a replica is
  down); the cascade is what the executor acknowledges.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import shutil
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from services.executor.turns.tools import PerTenant, ToolBox
from threadline import errors
from threadline.cancellation import cancel_and_wait
from threadline.erasure_owner import ErasureFollower, ErasureSource
from threadline.events import EventBus, Subscription
from threadline.ids import validate_session_id
from threadline.logs import get_logger
from threadline.v1 import session_pb2
from threadline.v1.events_pb2 import LifecycleEvent

log = get_logger(__name__)

#: Session events after which the session's files must go.
GONE = frozenset({"session.deleted", "session.expired"})

#: The executor's name as an owner in the erasure cascade.
OWNER = "executor"

#: Removals by event remembered for the erasure's acknowledgement.
_REMEMBERED_REMOVALS = 4096


def tenant_key(tenant: str) -> str:
    """The tenant's directory name: fixed length, no characters a path could misread."""
    return hashlib.sha256(tenant.encode("utf-8")).hexdigest()[:16]


@dataclass
class SessionWorkspaces:
    #: `<workspace_root>/sessions`.
    root: Path
    #: The tools over a workspace directory.
    toolbox: Callable[[str], ToolBox]
    #: The file size limit of the workspaces (the tools' descriptions name it).
    max_file_bytes: int
    _subscription: Subscription | None = field(default=None, repr=False)
    _follower: asyncio.Task[None] | None = field(default=None, repr=False)
    _erasures: ErasureFollower | None = field(default=None, repr=False)
    #: What the events removed, by session, until the erasure asks (bounded: the
    #: sessions another replica acknowledges never ask here).
    _removed_by_events: OrderedDict[str, dict[str, int]] = field(
        default_factory=OrderedDict, repr=False
    )

    def directory(self, tenant: str, session_id: str) -> Path:
        if not tenant:
            raise errors.InvalidArgument("tenant is required")
        validate_session_id(session_id)  # it becomes a path
        return self.root / tenant_key(tenant) / session_id

    def tools(self, tenant: str, session_id: str) -> ToolBox:
        return self.toolbox(str(self.directory(tenant, session_id)))

    def offered(self, session_id: str) -> ToolBox:
        """A session's tools as a turn asks for them, by session id: they run in the
        workspace of the tenant the tool round names (`ToolBox.for_tenant`)."""
        validate_session_id(session_id)
        return ToolBox(
            PerTenant(lambda tenant: self.tools(tenant, session_id), self.max_file_bytes)
        )

    def remove(self, tenant: str, session_id: str) -> bool:
        """Delete the session's workspace; False if there was none."""
        return self.erase(tenant, session_id)["workspaces"] == 1

    def erase(self, tenant: str, session_id: str) -> dict[str, int]:
        """Delete the session's workspace; what went (workspaces 0 or 1, files)."""
        directory = self.directory(tenant, session_id)
        if not os.path.lexists(directory):
            return {"workspaces": 0, "files": 0}
        files = sum(len(names) for _, _, names in os.walk(directory))
        # A tool still running (a turn that outlived its session) may add an entry
        # while the tree goes: try again. rmtree works through descriptors and never
        # follows a symlink out.
        for _ in range(3):
            shutil.rmtree(directory, ignore_errors=True)
            if not os.path.lexists(directory):
                return {"workspaces": 1, "files": files}
        raise OSError(errno.ENOTEMPTY, "the workspace could not be removed", session_id)

    async def start(self, bus: EventBus, erasures: ErasureSource, poll_s: float) -> None:
        """Remove workspaces as their sessions go: the events from now on, and every
        deletion the cascade holds for the executor, earlier ones included."""
        if self._follower is None:
            self._subscription = await bus.subscribe()
            self._follower = asyncio.create_task(
                self._follow(self._subscription), name="session-workspaces"
            )
        if self._erasures is None:
            self._erasures = ErasureFollower(OWNER, erasures, self._erase, interval_s=poll_s)
            self._erasures.start()

    async def _erase(self, erasure: session_pb2.Erasure) -> dict[str, int]:
        # A failure raises: the erasure stays pending and the next pass tries again.
        removed = await asyncio.to_thread(self.erase, erasure.tenant, erasure.session_id)
        if removed["workspaces"]:
            log.info("workspace.removed", session_id=erasure.session_id, reason="erasure")
        # The event may have been faster on this replica: what it removed is what the
        # acknowledgement reports.
        earlier = self._removed_by_events.pop(erasure.session_id, None)
        return earlier if earlier is not None and not removed["workspaces"] else removed

    async def stop(self) -> None:
        """Stop listening; safe to call twice."""
        if self._erasures is not None:
            await self._erasures.stop()
            self._erasures = None
        # The subscription first: its reader checks that flag between reads, while a
        # cancellation alone can be swallowed by the Redis client mid-read
        # (threadline/cancellation.py) and the stop would wait forever.
        if self._subscription is not None:
            await self._subscription.close()
            self._subscription = None
        if self._follower is not None:
            await cancel_and_wait(self._follower)
            self._follower = None

    async def _follow(self, subscription: Subscription) -> None:
        async for event in subscription:
            if event.type in GONE:
                await self._forget(event)

    async def _forget(self, event: LifecycleEvent) -> None:
        # A failed removal is logged and the loop goes on: the next deletion must
        # not wait for this one's disk.
        try:
            removed = await asyncio.to_thread(self.erase, event.tenant, event.session_id)
        except errors.InvalidArgument as exc:
            log.warning("workspace.unremovable_event", event_type=event.type, error=exc.message)
            return
        except OSError as exc:
            log.error("workspace.remove_failed", session_id=event.session_id, error=exc.strerror)
            return
        except Exception:
            log.exception("workspace.remove_crashed", session_id=event.session_id)
            return
        if removed["workspaces"]:
            log.info("workspace.removed", session_id=event.session_id, reason=event.type)
            self._removed_by_events[event.session_id] = removed
            while len(self._removed_by_events) > _REMEMBERED_REMOVALS:
                self._removed_by_events.popitem(last=False)
