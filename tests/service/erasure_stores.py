"""Everything a test can read of a stack's stores, as text, to look for a phrase in.

Each reader dumps every row, key or file it can reach (not only the ones the code
under test is expected to touch), so a copy left somewhere unexpected is found.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis

from threadline.config import Settings
from threadline.store_urls import PostgresUrl, RedisUrl, SqliteUrl


def sqlite_rows(path: Path) -> list[str]:
    """Every row of every table of a SQLite file (read through SQLite, so the WAL too)."""
    if not path.exists():
        return []
    with contextlib.closing(sqlite3.connect(path)) as conn:
        tables = [
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        ]
        return [
            f"{table}: {row!r}"
            for table in tables
            for row in conn.execute(f'SELECT * FROM "{table}"')
        ]


def sqlite_bytes(path: Path) -> list[str]:
    """The database file and its WAL as they are on disk, free pages included."""
    return [
        f"{file}: {file.read_bytes()!r}"
        for file in (path, path.with_name(path.name + "-wal"))
        if file.exists()
    ]


async def postgres_rows(url: str) -> list[str]:
    """Every row of every table in the URL's schema (its search_path)."""
    conn = await asyncpg.connect(url)
    try:
        tables = await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
        )
        rows: list[str] = []
        for table in tables:
            name = table["table_name"]
            for row in await conn.fetch(f'SELECT * FROM "{name}"'):
                rows.append(f"{name}: {dict(row)!r}")
        return rows
    finally:
        await conn.close()


async def redis_values(client: aioredis.Redis) -> list[str]:
    """Every key of the database with its value, whatever its type."""
    out: list[str] = []
    async for raw_key in client.scan_iter(count=500):
        key = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
        kind = await client.type(key)
        kind = kind.decode() if isinstance(kind, bytes) else kind
        value: object
        if kind == "string":
            value = await client.get(key)
        elif kind == "hash":
            value = await client.hgetall(key)
        elif kind == "list":
            value = await client.lrange(key, 0, -1)
        elif kind == "set":
            value = await client.smembers(key)
        elif kind == "zset":
            value = await client.zrange(key, 0, -1)
        elif kind == "stream":
            value = await client.xrange(key)
        else:
            value = kind
        out.append(f"{key}: {value!r}")
    return out


def files_under(root: Path) -> list[str]:
    """Every file under root with its content."""
    out: list[str] = []
    for directory, _, names in os.walk(root):
        for name in names:
            path = Path(directory) / name
            out.append(f"{path}: {path.read_bytes()!r}")
    return out


async def everything(settings: Settings, redis_client: aioredis.Redis) -> list[str]:
    """What the stack's session, memory and task stores, Redis and workspaces hold."""
    found: list[str] = []
    for service in ("session", "memory", "tasks"):
        url = settings.store_url(service)
        if isinstance(url, SqliteUrl):
            found += sqlite_rows(url.path) + sqlite_bytes(url.path)
        elif isinstance(url, PostgresUrl):
            found += await postgres_rows(url.url)
        else:
            assert isinstance(url, RedisUrl)  # read with the rest of Redis below
    found += await redis_values(redis_client)
    found += files_under(Path(settings.executor.workspace_root))
    return found


async def holding(phrase: str, settings: Settings, redis_client: aioredis.Redis) -> list[str]:
    """The rows, keys and files that hold `phrase`, in any case."""
    return [
        item for item in await everything(settings, redis_client) if phrase.lower() in item.lower()
    ]
