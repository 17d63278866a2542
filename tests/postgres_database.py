"""A PostgreSQL database of the test run's own, dropped when the run ends.

The machine's PostgreSQL (POSTGRES_URL, default postgresql://postgres@127.0.0.1:5432/
postgres) is shared with anything else on it: each run creates a database with a
random name and drops it at the end, so two runs never see each other's rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import Iterator

import asyncpg

ADMIN_URL = os.environ.get("POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


class PostgresUnavailable(RuntimeError):
    """The machine's PostgreSQL does not answer; the message says where it was looked for."""


async def _admin(statement: str) -> None:
    try:
        conn = await asyncpg.connect(ADMIN_URL, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        raise PostgresUnavailable(
            f"PostgreSQL at {ADMIN_URL} is not answering ({exc}); start it or set POSTGRES_URL"
        ) from exc
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """Create a database for this run; yield its URL; drop it (and its connections) after."""
    name = "threadline_test_" + uuid.uuid4().hex[:12]
    asyncio.run(_admin(f"CREATE DATABASE {name}"))
    try:
        yield ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        asyncio.run(_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
