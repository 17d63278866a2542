"""Store URLs: where a durable store (sessions, memory, tasks) keeps its state.

One parser for every setting that names a store (`session.database`,
`memory.database`, `executor.tasks.database`); config validates with it at load
time and each service's wiring builds its store from what it returns.

    sqlite:///path/file.db   a SQLite file: the path is what follows "sqlite://",
                             so this one is absolute
    path/file.db             a SQLite file, as a plain path
    redis://host:port/db     a Redis server (rediss:// for TLS)
    postgresql://user@host:port/db
                             a PostgreSQL database (postgres:// too; the password,
                             if any, is best left to PGPASSWORD or a .pgpass file)

An empty setting means the store's default SQLite file under data_dir; that is
resolved by `Settings.store_url`, not here. A new backend is one more dataclass
in `StoreUrl`, its schemes in `_parse_server`, and a branch where stores are built.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

StoreKind = Literal["sqlite", "redis", "postgresql"]
STORE_KINDS: tuple[StoreKind, ...] = ("sqlite", "redis", "postgresql")

#: How each kind is written, for error messages.
_SHAPES: dict[StoreKind, tuple[str, ...]] = {
    "sqlite": ("sqlite:///path/file.db", "a file path"),
    "redis": ("redis://host:port/db",),
    "postgresql": ("postgresql://user@host:port/db",),
}


@dataclass(frozen=True)
class SqliteUrl:
    """A SQLite file, for a store that runs in one place (or shares the file)."""

    kind: ClassVar[StoreKind] = "sqlite"
    path: Path


@dataclass(frozen=True)
class RedisUrl:
    """A Redis server, for a store shared by replicas."""

    kind: ClassVar[StoreKind] = "redis"
    #: As configured (redis:// or rediss://), for `threadline.redis_client.connect_redis`.
    url: str


@dataclass(frozen=True)
class PostgresUrl:
    """A PostgreSQL database, for a store shared by replicas."""

    kind: ClassVar[StoreKind] = "postgresql"
    #: As configured, for `threadline.postgres.PostgresDatabase`.
    url: str
    #: Connections this process may open to it, per store (`postgres_pool_size`).
    pool_size: int = 10

    def __repr__(self) -> str:
        # The URL may carry a password: never print it.
        return "PostgresUrl(<redacted>)"


StoreUrl = SqliteUrl | RedisUrl | PostgresUrl


def parse_store_url(value: str, *, kinds: Collection[StoreKind] = STORE_KINDS) -> StoreUrl:
    """`value` as a store URL of one of `kinds`.

    Raises ValueError saying what is accepted: config turns it into an error
    naming the setting and its variable.
    """
    shapes = [shape for kind in kinds for shape in _SHAPES[kind]]
    expected = " or ".join([", ".join(shapes[:-1]), shapes[-1]] if len(shapes) > 1 else shapes)
    if not value:
        raise ValueError(f"expected {expected}, got an empty string")
    url = _parse(value, expected)
    if url.kind not in kinds:
        raise ValueError(
            f"this store has no {url.kind} backend, only {', '.join(kinds)}: "
            f"expected {expected}, got {_shown(value)}"
        )
    return url


def check_store_url(value: str, *, kinds: Collection[StoreKind] = STORE_KINDS) -> str:
    """A store setting's value, unchanged, if it is empty (the store's default
    file) or a store URL of one of `kinds`; else ValueError as `parse_store_url`."""
    if value:
        parse_store_url(value, kinds=kinds)
    return value


def _parse(value: str, expected: str) -> StoreUrl:
    scheme, sep, rest = value.partition("://")
    if not sep:
        return SqliteUrl(Path(value))
    if scheme == "sqlite":
        # "sqlite:///p" is the file "/p"; "sqlite://p" would be a host, which SQLite has not.
        if not rest.startswith("/") or rest == "/":
            raise ValueError(f"expected sqlite:///path/file.db, got {_shown(value)}")
        return SqliteUrl(Path(rest))
    return _parse_server(scheme, value, expected)


def _parse_server(scheme: str, value: str, expected: str) -> StoreUrl:
    if scheme in ("redis", "rediss"):
        return RedisUrl(value)
    if scheme in ("postgresql", "postgres"):
        return PostgresUrl(value)
    raise ValueError(f"expected {expected}, got {_shown(value)}")


def _shown(value: str) -> str:
    """`value` fit for an error message: credentials masked, length bounded."""
    scheme, sep, rest = value.partition("://")
    if sep:
        authority, slash, path = rest.partition("/")
        if "@" in authority:
            authority = "***@" + authority.rpartition("@")[2]
        value = f"{scheme}://{authority}{slash}{path}"
    return repr(value if len(value) <= 120 else value[:120] + "...")
