"""PostgreSQL as every store here uses it: an asyncpg pool and versioned migrations.

A store owns a `PostgresDatabase`, opened from a `postgresql://` store URL, and
runs its statements on connections of its pool. Migrations are numbered lists of
statements recorded in `<store>_migrations`; several replicas may start at once:
each migrates under a transaction-scoped advisory lock named for the store, so one
applies what is missing and the others find it applied.

asyncpg rather than psycopg 3: it appended 1.2-1.3x faster on the shape of a
session append (`python -m bench.pg_driver`).
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from threadline.errors import FailedPrecondition, Unavailable
from threadline.logs import get_logger

log = get_logger(__name__)

#: Each migration is a list of statements; migration N brings the schema to version N.
Migrations = Sequence[Sequence[str]]
#: Errors that mean the server is away (restarting, failing over), not a bug.
UNREACHABLE = (OSError, asyncpg.CannotConnectNowError, asyncpg.ConnectionDoesNotExistError)


async def _keep_connection_state(conn: asyncpg.Connection) -> None:
    return None


class PostgresDatabase:
    """A pool of connections to one database, migrated for one store."""

    def __init__(
        self,
        url: str,
        *,
        name: str,
        migrations: Migrations,
        min_size: int = 1,
        max_size: int = 10,
    ) -> None:
        self._url = url
        self._name = name
        self._migrations = migrations
        self._min_size = min_size
        self._max_size = max_size
        self._pool: asyncpg.Pool | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise FailedPrecondition(f"the {self._name} store is not open")
        return self._pool

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self._url,
                min_size=self._min_size,
                max_size=self._max_size,
                # asyncpg resets every connection it takes back (RESET ALL, UNLISTEN,
                # unlock advisory locks): a round trip per call, a quarter of an append.
                # The stores keep no connection state (locks are transaction-scoped),
                # so there is nothing to reset.
                reset=_keep_connection_state,
            )
        except UNREACHABLE as exc:
            # The URL may hold a password: the message names the store, not the URL.
            raise Unavailable(f"the {self._name} store's PostgreSQL is unreachable") from exc
        await self._migrate()

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[PoolConnectionProxy]:
        """A connection in a transaction: committed when the block ends, else rolled back."""
        async with self.pool.acquire() as conn, conn.transaction():
            yield conn

    async def _migrate(self) -> None:
        table = f"{self._name}_migrations"
        lock = zlib.crc32(table.encode())
        async with self.transaction() as conn:
            # Held until commit: a replica starting at the same time waits here.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", lock)
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {table} "
                "(version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            current = await conn.fetchval(f"SELECT coalesce(max(version), 0) FROM {table}")
            if current > len(self._migrations):
                raise FailedPrecondition(
                    f"the {self._name} schema is at version {current}, newer than this "
                    f"threadline knows ({len(self._migrations)}): upgrade threadline"
                )
            for version in range(current + 1, len(self._migrations) + 1):
                for statement in self._migrations[version - 1]:
                    await conn.execute(statement)
                await conn.execute(f"INSERT INTO {table} (version) VALUES ($1)", version)
                log.info("postgres.migrated", store=self._name, version=version)
