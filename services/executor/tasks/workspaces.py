"""Where background tasks work on this replica, and the removal of what no task needs.

A task works in `<root>/<tenant key>/<name>`: `name` is the workspace its submitter
named, else the task id; the tenant key is the one session workspaces use (the
first 16 hex digits of the SHA-256 of the tenant), so no tenant string ever
becomes a path. Several tasks of a tenant may name one workspace: it goes with the
last stored task that names it.

Workspaces are per replica. The replica that deletes a task removes its copy at
once; every other replica removes its own at its next sweep (`collect`), which
removes each directory here that no stored task names. So a replica that was
down, or one a deletion never reached, still ends up without the files.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from services.executor.tasks.store import TaskStore
from services.executor.turns.session_workspaces import tenant_key
from threadline.logs import get_logger

log = get_logger(__name__)

_TENANT_KEY = re.compile(r"[0-9a-f]{16}")


@dataclass
class TaskWorkspaces:
    #: `<workspace_root>/tasks`.
    root: Path
    #: A directory whose entries changed this recently is left to a later sweep: a
    #: task submitted while the sweep looks may be starting in it.
    quiet_s: float = 60.0

    def directory(self, tenant: str, name: str) -> Path:
        return self.root / tenant_key(tenant) / name

    async def remove_unused(self, store: TaskStore, paths: Iterable[str]) -> int:
        """Remove those of `paths` (tasks' workspaces) that no stored task names any
        more; how many directories went. Paths outside the root are never touched:
        records from before a change of `workspace_root` keep their old places."""
        candidates = await asyncio.to_thread(self._existing, paths)
        if not candidates:
            return 0
        unused = candidates - await store.workspaces_in_use(candidates)
        return await asyncio.to_thread(self._remove_all, sorted(unused))

    async def collect(self, store: TaskStore) -> int:
        """Remove this replica's task workspaces that no stored task names (deleted or
        expired through another replica, or while this one was down)."""
        found = await asyncio.to_thread(self._quiet_directories)
        return await self.remove_unused(store, found)

    def _existing(self, paths: Iterable[str]) -> set[str]:
        return {path for path in paths if self._inside(path) and os.path.lexists(path)}

    def _inside(self, path: str) -> bool:
        root = os.path.abspath(self.root)
        candidate = os.path.abspath(path)
        return candidate != root and os.path.commonpath([root, candidate]) == root

    def _quiet_directories(self) -> list[str]:
        """`<root>/<tenant key>/<name>` directories unchanged for quiet_s. Directories
        of the layout before tenant keys (`<root>/<tenant>/<name>`) are left to the
        deletion of their tasks: a tenant's name is no key."""
        settled = time.time() - self.quiet_s
        found: list[str] = []
        try:
            tenants = [e for e in os.scandir(self.root) if _TENANT_KEY.fullmatch(e.name)]
        except FileNotFoundError:
            return []
        for tenant in tenants:
            # A directory removed meanwhile (a deletion on this replica) is skipped.
            with contextlib.suppress(OSError):
                if not tenant.is_dir(follow_symlinks=False):
                    continue
                with os.scandir(tenant.path) as entries:
                    for entry in entries:
                        with contextlib.suppress(OSError):
                            if entry.stat(follow_symlinks=False).st_mtime < settled:
                                found.append(entry.path)
        return found

    def _remove_all(self, paths: list[str]) -> int:
        removed = 0
        for path in paths:
            try:
                _remove_tree(path)
                removed += 1
            except OSError as exc:
                # Logged, and left to the next sweep: one stuck directory must not
                # keep the others.
                log.error("task_workspace.remove_failed", error=exc.strerror)
                continue
            # The tenant's directory too, once its last workspace is gone.
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(path))
        return removed


def _remove_tree(path: str) -> None:
    # A command still running (a task that outlived its record) may add an entry
    # while the tree goes: try again. rmtree works through descriptors and never
    # follows a symlink out.
    for _ in range(3):
        if os.path.islink(path) or os.path.isfile(path):
            os.unlink(path)
        else:
            shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path):
            return
    raise OSError(errno.ENOTEMPTY, "the task workspace could not be removed")
