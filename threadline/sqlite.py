"""SQLite as every store here uses it: one file, WAL, synchronous=FULL, explicit
transactions, and forward migrations counted by `PRAGMA user_version`.

Stores run all of their SQLite work on one dedicated thread, so writes serialise
without locks and the event loop never blocks on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ParamSpec, TypeVar

from threadline.errors import FailedPrecondition, Unavailable
from threadline.logs import get_logger

P = ParamSpec("P")
T = TypeVar("T")
log = get_logger(__name__)

#: Each migration is a list of statements; migration N brings the file to version N.
Migrations = Sequence[Sequence[str]]


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection, begin: str = "BEGIN") -> Iterator[sqlite3.Connection]:
    conn.execute(begin)
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def open_database(
    path: Path,
    *,
    name: str,
    migrations: Migrations,
    busy_timeout_ms: int = 5_000,
    foreign_keys: bool = False,
) -> sqlite3.Connection:
    """Open (creating) `path` and migrate it forward; `name` says whose file it is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: no implicit transactions; every one is explicit.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.row_factory = sqlite3.Row
        # First, so that the pragmas and the migration wait for other processes.
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise FailedPrecondition(f"{name} {path}: WAL journal mode unavailable (got {mode})")
        # FULL: an acknowledged write survives kill -9 and power loss.
        conn.execute("PRAGMA synchronous = FULL")
        if foreign_keys:
            conn.execute("PRAGMA foreign_keys = ON")
        migrate(conn, path=path, name=name, migrations=migrations)
    except BaseException:
        conn.close()
        raise
    return conn


def migrate(conn: sqlite3.Connection, *, path: Path, name: str, migrations: Migrations) -> None:
    # One transaction for all pending steps: a failed migration leaves the file
    # exactly as it was, never half-migrated.
    latest = len(migrations)
    with transaction(conn, "BEGIN IMMEDIATE"):
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > latest:
            raise FailedPrecondition(
                f"{name} {path} has schema version {version}; this build supports up to {latest}"
            )
        for target, step in enumerate(migrations[version:], start=version + 1):
            try:
                for statement in step:
                    conn.execute(statement)
            except sqlite3.DatabaseError as exc:
                raise FailedPrecondition(
                    f"{name} {path}: migration to schema version {target} failed: {exc}"
                ) from exc
        if version < latest:
            conn.execute(f"PRAGMA user_version = {latest}")
            log.info(
                "sqlite.migrated",
                store=name,
                path=str(path),
                version_from=version,
                version_to=latest,
            )


class SqliteThread:
    """The one thread a store's SQLite work runs on: writes serialise without locks
    and the event loop never waits on the disk."""

    def __init__(self, name: str, thread_name: str) -> None:
        self.name = name
        self._thread_name = thread_name
        self._executor: ThreadPoolExecutor | None = None

    async def start(self, open_fn: Callable[[], None]) -> None:
        if self._executor is not None:
            raise RuntimeError(f"{self.name} is already open")
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._thread_name)
        try:
            await asyncio.get_running_loop().run_in_executor(executor, open_fn)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        self._executor = executor

    async def stop(self, close_fn: Callable[[], None]) -> None:
        """Run `close_fn` after every statement already submitted. Safe twice."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(executor, close_fn)
        finally:
            executor.shutdown(wait=False)

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        executor = self._executor
        if executor is None:
            raise Unavailable(f"{self.name} is not open")
        call = functools.partial(fn, *args, **kwargs)
        try:
            # If the caller is cancelled the statement still runs to completion: a
            # write may commit unseen, and a retry then sees its effect.
            return await asyncio.get_running_loop().run_in_executor(executor, call)
        except sqlite3.OperationalError as exc:
            # Locked, disk full, I/O error: the caller may retry later.
            raise Unavailable(f"{self.name}: {exc}") from exc
