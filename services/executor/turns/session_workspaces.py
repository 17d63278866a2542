"""Where each session's tool workspace lives on this replica, and its removal when the
session goes.

A workspace is `<root>/<sha256(tenant)[:16]>/<session id>`. The tenant is part of
the key, and the tenant's name itself never becomes a path.

Workspaces go through the erasure cascade (threadline/erasure_owner.py). Every
executor replica, every `executor.erasure_poll_s`:

- asks the session service for deletions the executor has not acknowledged,
  removes those workspaces and acknowledges with what it removed (the counts in
  `session.erased`); a deletion waits in the session store until a replica has
  done it, across crashes and restarts;
- sweeps its own copies: each replica keeps its own workspaces (a session's turns
  may run on several), so it asks which of the sessions it holds a directory for
  are deleted (tombstones are kept) and removes those. A replica that was down
  or busy when another acknowledged a deletion still removes its copy.

The erasure also drops what the executor keeps of a session outside this disk
(`forget`: the turn draft in Redis, an answer an executor died streaming, which
only the session's next turn would otherwise pick up).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import shutil
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from services.executor.turns.tools import PerTenant, ToolBox
from threadline import errors
from threadline.erasure_owner import ErasureFollower, ErasureSource
from threadline.ids import validate_session_id
from threadline.logs import get_logger
from threadline.v1 import session_pb2

log = get_logger(__name__)

#: The executor's name as an owner in the erasure cascade.
OWNER = "executor"

#: Ids per question in a sweep (the session service's limit).
_SWEEP_CHUNK = 1_000
#: Sweep removals remembered for the acknowledgement.
_REMEMBERED_SWEEPS = 4_096


class WorkspaceErasures(ErasureSource, Protocol):
    """The session service as the workspaces need it (`threadline.peers.SessionClient`)."""

    async def erased_among(self, session_ids: list[str]) -> list[str]: ...


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
    _erasures: ErasureFollower | None = field(default=None, repr=False)
    _source: WorkspaceErasures | None = field(default=None, repr=False)
    _forget: Callable[[str], Awaitable[None]] | None = field(default=None, repr=False)
    #: What sweeps removed, by session, for the acknowledgement: a sweep may find a
    #: deletion before this replica's erasure pass does (bounded: most of them are
    #: acknowledged by other replicas and never asked for here).
    _swept: OrderedDict[str, dict[str, int]] = field(default_factory=OrderedDict, repr=False)

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
        return _remove_tree(self.directory(tenant, session_id))

    def held(self) -> dict[str, list[Path]]:
        """The session ids this replica holds a workspace for, with their directories."""
        found: dict[str, list[Path]] = {}
        if not self.root.is_dir():
            return found
        for tenant_dir in os.scandir(self.root):
            if not tenant_dir.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(tenant_dir.path):
                try:
                    validate_session_id(entry.name)
                except errors.InvalidArgument:
                    continue  # not a workspace of ours
                found.setdefault(entry.name, []).append(Path(entry.path))
        return found

    async def start(
        self,
        source: WorkspaceErasures,
        poll_s: float,
        forget: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        """Remove workspaces as their sessions go, from every deletion the cascade holds
        for the executor and every leftover copy on this replica, earlier ones included;
        `forget(session_id)` drops the rest the executor keeps of a deleted session."""
        if self._erasures is None:
            self._source, self._forget = source, forget
            self._erasures = ErasureFollower(
                OWNER, source, self._erase, interval_s=poll_s, sweep=self.sweep
            )
            self._erasures.start()

    async def _erase(self, erasure: session_pb2.Erasure) -> dict[str, int]:
        # A failure raises: the erasure stays pending and the next pass tries again.
        removed = await asyncio.to_thread(self.erase, erasure.tenant, erasure.session_id)
        if self._forget is not None:
            await self._forget(erasure.session_id)
        if removed["workspaces"]:
            log.info("workspace.removed", session_id=erasure.session_id, reason="erasure")
        swept = self._swept.pop(erasure.session_id, None)
        return swept if swept is not None and not removed["workspaces"] else removed

    async def sweep(self) -> int:
        """Remove this replica's workspaces of deleted sessions; how many went."""
        if self._source is None:
            return 0
        held = await asyncio.to_thread(self.held)
        ids = sorted(held)
        removed = 0
        for i in range(0, len(ids), _SWEEP_CHUNK):
            for session_id in await self._source.erased_among(ids[i : i + _SWEEP_CHUNK]):
                total = {"workspaces": 0, "files": 0}
                for directory in held[session_id]:
                    gone = await asyncio.to_thread(_remove_tree, directory)
                    total = {kind: total[kind] + gone[kind] for kind in total}
                removed += total["workspaces"]
                self._swept[session_id] = total
                while len(self._swept) > _REMEMBERED_SWEEPS:
                    self._swept.popitem(last=False)
                log.info("workspace.removed", session_id=session_id, reason="sweep")
        return removed

    async def stop(self) -> None:
        """Stop removing; safe to call twice."""
        if self._erasures is not None:
            await self._erasures.stop()
            self._erasures = None


def _remove_tree(directory: Path) -> dict[str, int]:
    if not os.path.lexists(directory):
        return {"workspaces": 0, "files": 0}
    files = sum(len(names) for _, _, names in os.walk(directory))
    # A tool still running (a turn that outlived its session) may add an entry while
    # the tree goes: try again. rmtree works through descriptors and never follows a
    # symlink out.
    for _ in range(3):
        shutil.rmtree(directory, ignore_errors=True)
        if not os.path.lexists(directory):
            return {"workspaces": 1, "files": files}
    raise OSError(errno.ENOTEMPTY, "the workspace could not be removed", directory.name)
