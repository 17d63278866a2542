"""A fresh PostgreSQL schema per test, inside the run's database (tests/postgres_database.py).

The URL it yields sets `search_path` (asyncpg passes unknown URL parameters on as
server settings), so a store opened on it creates its tables, migrations table
included, in that schema: a clean state per test without dropping the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg


async def _admin(url: str, statement: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def postgres_schema(url: str) -> AsyncIterator[str]:
    """Create a schema in the database at `url`; yield a URL working in it; drop it after."""
    schema = f"test_{uuid.uuid4().hex[:12]}"
    await _admin(url, f"CREATE SCHEMA {schema}")
    try:
        yield f"{url}?search_path={schema}"
    finally:
        await _admin(url, f"DROP SCHEMA {schema} CASCADE")


@contextlib.contextmanager
def postgres_schema_outside_loop(url: str) -> Iterator[str]:
    """`postgres_schema` for a plain fixture, where no event loop runs."""
    schema = f"test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(url, f"CREATE SCHEMA {schema}"))
    try:
        yield f"{url}?search_path={schema}"
    finally:
        asyncio.run(_admin(url, f"DROP SCHEMA {schema} CASCADE"))
