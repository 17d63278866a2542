"""parse_store_url: what each store setting accepts, and what it says when it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from threadline.config import ConfigError, load_settings
from threadline.store_urls import (
    PostgresUrl,
    RedisUrl,
    SqliteUrl,
    check_store_url,
    parse_store_url,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            "sqlite:///var/lib/threadline/sessions.db",
            SqliteUrl(Path("/var/lib/threadline/sessions.db")),
        ),
        ("data/sessions.db", SqliteUrl(Path("data/sessions.db"))),
        ("/abs/sessions.db", SqliteUrl(Path("/abs/sessions.db"))),
        ("redis://redis:6379/0", RedisUrl("redis://redis:6379/0")),
        (
            "rediss://user:pw@redis.internal:6380/2",
            RedisUrl("rediss://user:pw@redis.internal:6380/2"),
        ),
    ],
)
def test_each_kind_parses(value: str, expected: SqliteUrl | RedisUrl) -> None:
    parsed = parse_store_url(value)

    assert parsed == expected
    assert parsed.kind == ("redis" if value.startswith("redis") else "sqlite")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "got an empty string"),
        ("sqlite://relative.db", r"expected sqlite:///path/file\.db, got 'sqlite://relative\.db'"),
        ("sqlite:///", r"expected sqlite:///path/file\.db, got 'sqlite:///'"),
        ("http://redis:6379", r"got 'http://redis:6379'"),
    ],
)
def test_malformed_urls_say_what_is_accepted(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_store_url(value)


def test_postgresql_urls_are_parsed_and_never_shown() -> None:
    parsed = parse_store_url("postgresql://app:secret@db:5432/threadline")

    assert parsed == PostgresUrl("postgresql://app:secret@db:5432/threadline")
    assert parsed.kind == "postgresql"
    assert "secret" not in repr(parsed)
    assert parse_store_url("postgres://db/threadline").kind == "postgresql"


def test_a_store_without_a_postgresql_backend_says_so() -> None:
    with pytest.raises(ValueError, match="this store has no postgresql backend, only sqlite"):
        parse_store_url("postgresql://db/threadline", kinds=["sqlite"])


def test_a_store_may_accept_fewer_kinds() -> None:
    assert parse_store_url("m.db", kinds=["sqlite"]) == SqliteUrl(Path("m.db"))
    with pytest.raises(ValueError, match="this store has no redis backend, only sqlite"):
        parse_store_url("redis://redis:6379/0", kinds=["sqlite"])


def test_check_leaves_an_empty_setting_to_the_default() -> None:
    assert check_store_url("") == ""
    assert check_store_url("sqlite:///x.db") == "sqlite:///x.db"
    with pytest.raises(ValueError):
        check_store_url("ftp://x")


def test_settings_resolve_each_store(tmp_path: Path) -> None:
    settings = load_settings(
        environ={
            "THREADLINE_DATA_DIR": str(tmp_path),
            "THREADLINE_SESSION__DATABASE": "redis://redis:6379/1",
            "THREADLINE_EXECUTOR__TASKS__DATABASE": f"sqlite://{tmp_path}/t.db",
        }
    )

    assert settings.store_url("session") == RedisUrl("redis://redis:6379/1")
    assert settings.store_url("memory") == SqliteUrl(tmp_path / "memory.db")
    assert settings.store_url("tasks") == SqliteUrl(tmp_path / "t.db")
    assert settings.sqlite_path("tasks") == tmp_path / "t.db"
    with pytest.raises(ValueError, match="session store is not configured for SQLite"):
        settings.sqlite_path("session")


@pytest.mark.parametrize(
    ("variable", "setting"),
    [
        ("THREADLINE_SESSION__DATABASE", "session.database"),
        ("THREADLINE_MEMORY__DATABASE", "memory.database"),
        ("THREADLINE_EXECUTOR__TASKS__DATABASE", "executor.tasks.database"),
    ],
)
def test_a_bad_url_fails_at_load_naming_the_setting(variable: str, setting: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={variable: "mysql://db/threadline"})

    assert f"{setting} ({variable}): " in str(caught.value)
    assert "'mysql://db/threadline'" in str(caught.value)


def test_a_refused_url_never_shows_its_password() -> None:
    with pytest.raises(ValueError) as caught:
        parse_store_url("postgresq://app:s3cret@db.internal:5432/threadline")

    assert "s3cret" not in str(caught.value)
    assert "postgresq://***@db.internal:5432/threadline" in str(caught.value)


def test_a_huge_refused_url_is_shown_cut() -> None:
    with pytest.raises(ValueError) as caught:
        parse_store_url("http://" + "x" * 100_000)

    assert len(str(caught.value)) < 400
