"""SQLite as every store here uses it: one file, WAL, synchronous=FULL, explicit
transactions, and forward migrations counted by `PRAGMA user_version`.

A store owns a `SqliteDatabase` and runs all of its SQLite work through it, on
one dedicated thread, so writes serialise without locks and the event loop never
blocks on disk. The store's statements are plain functions taking the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

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
        # Deleted rows are overwritten with zeros in the pages that held them, not
        # just unlinked: erased text is not left in the file's free space.
        conn.execute("PRAGMA secure_delete = ON")
        # Cascades where a schema declares them; a store still deletes a session's
        # rows explicitly, since a tool that opens the file without this skips them.
        conn.execute("PRAGMA foreign_keys = ON")
        migrate(conn, path=path, name=name, migrations=migrations)
    except BaseException:
        conn.close()
        raise
    return conn


def truncate_wal(conn: sqlite3.Connection) -> None:
    """Copy the WAL into the database and cut the WAL file to zero bytes.

    After an erasure: secure_delete zeroes the pages in the database, but the WAL
    still holds the frames that wrote the rows until it is reset, and a reset only
    rewinds, overwriting old frames as new ones come. Best effort: a reader in another
    process (a replica sharing the file) keeps the WAL until it is done, and the
    next erasure's call takes what this one could not.
    """
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()


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


class SqliteDatabase:
    """One store's SQLite file and the one thread its connection lives on.

    `open()` connects on that thread with the pragmas every store shares (WAL,
    synchronous=FULL, secure_delete, busy timeout, foreign keys) and migrates the
    file forward; `run(fn, *args)` calls `fn(conn, *args)` there, so writes
    serialise without locks and the event loop never waits on the disk (`erase`
    also truncates the WAL after a deletion); `close()` runs
    `PRAGMA optimize` and closes, after every statement already submitted.
    """

    def __init__(
        self, path: Path, name: str, migrations: Migrations, *, busy_timeout_ms: int = 5_000
    ) -> None:
        self.path = path
        #: Whose file it is, for errors and logs ("session store").
        self.name = name
        # "session store" -> "session-sqlite_0": a thread dump says whose file it waits on.
        self._thread_name = f"{name.split()[0]}-sqlite"
        self._migrations = migrations
        self._busy_timeout_ms = busy_timeout_ms
        self._executor: ThreadPoolExecutor | None = None
        # Created, used and closed on the worker thread only.
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        """Open the file, set the pragmas and apply pending migrations."""
        if self._executor is not None:
            raise RuntimeError(f"{self.name} is already open")
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._thread_name)
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self._open_sync)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        self._executor = executor

    async def close(self) -> None:
        """Close after every statement already submitted. Safe twice."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self._close_sync)
        finally:
            executor.shutdown(wait=False)

    async def erase(
        self,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """`run` for a statement that deletes what must not stay on disk: the WAL is
        truncated after it (`truncate_wal`)."""

        def erasing(conn: sqlite3.Connection) -> T:
            result = fn(conn, *args, **kwargs)
            truncate_wal(conn)
            return result

        return await self.run(erasing)

    async def run(
        self,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """`fn(conn, *args, **kwargs)` on the worker thread."""
        executor = self._executor
        if executor is None:
            raise Unavailable(f"{self.name} is not open")
        call = functools.partial(self._call, fn, *args, **kwargs)
        try:
            # If the caller is cancelled the statement still runs to completion: a
            # write may commit unseen, and a retry then sees its effect.
            return await asyncio.get_running_loop().run_in_executor(executor, call)
        except sqlite3.OperationalError as exc:
            # Locked, disk full, I/O error: the caller may retry later.
            raise Unavailable(f"{self.name}: {exc}") from exc

    # -- worker thread ---------------------------------------------------------------

    def _call(
        self,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        if self._conn is None:
            raise Unavailable(f"{self.name} is not open")
        return fn(self._conn, *args, **kwargs)

    def _open_sync(self) -> None:
        self._conn = open_database(
            self.path,
            name=self.name,
            migrations=self._migrations,
            busy_timeout_ms=self._busy_timeout_ms,
        )

    def _close_sync(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            # Keeps the query planner's statistics current, cheaply, as SQLite advises.
            conn.execute("PRAGMA optimize")
        finally:
            conn.close()
