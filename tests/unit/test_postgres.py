"""The PostgreSQL kernel on the machine's PostgreSQL: migrations under concurrent starts."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from threadline.errors import FailedPrecondition, Unavailable
from threadline.postgres import PostgresDatabase

V1 = ["CREATE TABLE {t} (id TEXT PRIMARY KEY)"]
V2 = ["ALTER TABLE {t} ADD COLUMN note TEXT NOT NULL DEFAULT ''"]


def _store(postgres_url: str, name: str, migrations: list[list[str]]) -> PostgresDatabase:
    return PostgresDatabase(postgres_url, name=name, migrations=migrations)


async def test_replicas_starting_at_once_migrate_once(postgres_url: str) -> None:
    name = "s" + uuid.uuid4().hex[:8]
    migrations = [[s.format(t=name) for s in V1], [s.format(t=name) for s in V2]]
    replicas = [_store(postgres_url, name, migrations) for _ in range(4)]

    await asyncio.gather(*(r.open() for r in replicas))
    try:
        async with replicas[0].transaction() as conn:
            versions = await conn.fetch(f"SELECT version FROM {name}_migrations ORDER BY 1")
            await conn.execute(f"INSERT INTO {name} (id, note) VALUES ('a', 'b')")
    finally:
        await asyncio.gather(*(r.close() for r in replicas))

    assert [row["version"] for row in versions] == [1, 2]


async def test_a_schema_newer_than_this_build_is_refused(postgres_url: str) -> None:
    name = "s" + uuid.uuid4().hex[:8]
    newer = _store(
        postgres_url, name, [[s.format(t=name) for s in V1], [s.format(t=name) for s in V2]]
    )
    await newer.open()
    await newer.close()

    older = _store(postgres_url, name, [[s.format(t=name) for s in V1]])
    with pytest.raises(FailedPrecondition, match="newer than this threadline knows"):
        await older.open()
    await older.close()


async def test_an_unreachable_server_is_unavailable_without_the_url() -> None:
    store = _store("postgresql://someone:secret@127.0.0.1:1/db", "sessions", [])

    with pytest.raises(Unavailable) as caught:
        await store.open()

    assert "secret" not in caught.value.message and "127.0.0.1" not in caught.value.message
