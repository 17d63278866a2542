"""Shared fixtures: real Redis, the scripted fake upstream, settings, a running stack."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

# Imported up front: hypothesis' pytest plugin otherwise imports it lazily in the
# terminal summary, where CPython 3.11.7's ast.parse can fail with "AST constructor
# recursion depth mismatch" (a CPython bug fixed in 3.11.8) under assertion rewriting.
import hypothesis  # noqa: F401
import pytest
import redis
import redis.asyncio as aioredis

from tests.postgres_database import PostgresUnavailable, postgres_database
from tests.redis_server import RedisServerError, redis_server
from threadline.client import GatewayClient
from threadline.config import Settings, hash_api_key, load_settings
from threadline.logs import configure_logging
from threadline.stack import Stack, start_stack
from threadline.testing.fake_upstream import FakeUpstream

ACME_KEY = "test-key-acme"
OTHER_KEY = "test-key-other"
ADMIN_KEY = "test-key-admin"
FAKE_MODEL = "fake-model"

configure_logging("warning")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """REDIS_URL when set, else a redis-server of this run's own (see tests/redis_server.py)."""
    if url := os.environ.get("REDIS_URL"):
        try:
            redis.Redis.from_url(url, socket_connect_timeout=2).ping()
        except redis.exceptions.ConnectionError as exc:
            pytest.fail(f"REDIS_URL={url} is not answering ({exc})", pytrace=False)
        yield url
        return
    with contextlib.ExitStack() as cleanup:
        try:
            url = cleanup.enter_context(redis_server(tmp_path_factory.mktemp("redis")))
        except RedisServerError as exc:
            pytest.fail(str(exc), pytrace=False)
        yield url


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL database of this run's own (see tests/postgres_database.py)."""
    with contextlib.ExitStack() as cleanup:
        try:
            url = cleanup.enter_context(postgres_database())
        except PostgresUnavailable as exc:
            pytest.fail(str(exc), pytrace=False)
        yield url


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A clean database per test (pub/sub channels are global: this run's tests run serially)."""
    client = aioredis.from_url(redis_url, decode_responses=True)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture
async def fake_upstream() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream(models=(FAKE_MODEL,)) as fake:
        yield fake


def make_settings(tmp_path: Path, upstream_url: str | None, **overrides: Any) -> Settings:
    data: dict[str, Any] = {
        "data_dir": str(tmp_path / "data"),
        "grace_period_s": 5.0,
        "log_level": "warning",
        "gateway": {
            "api_keys": [
                {"sha256": hash_api_key(ACME_KEY), "tenant": "acme"},
                {"sha256": hash_api_key(OTHER_KEY), "tenant": "other"},
                {"sha256": hash_api_key(ADMIN_KEY), "tenant": "ops", "admin": True},
            ],
            "max_input_chars": 2000,
        },
        "llm": {
            "retry": {"max_attempts": 3, "base_delay_s": 0.05, "max_delay_s": 0.2, "budget_s": 5},
        },
        # Memory's background jobs would take scripted answers meant for the test's own
        # requests: tests that exercise a trigger switch it on.
        "memory": {
            "consolidate_fraction": 0,
            "idle_consolidate_s": 0,
            "extract_threshold": 0,
            "compact_threshold": 0,
        },
    }
    if upstream_url is not None:
        data["llm"]["upstream"] = {
            "name": "fake",
            "base_url": upstream_url,
            "model": FAKE_MODEL,
            "timeouts": {
                "connect_s": 2,
                "first_token_s": 3,
                "idle_between_chunks_s": 2,
                "total_s": 30,
            },
        }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return load_settings(environ={}, overrides=data)


@pytest.fixture
def settings(tmp_path: Path, fake_upstream: FakeUpstream, redis_url: str) -> Settings:
    return make_settings(tmp_path, fake_upstream.base_url, redis_url=redis_url)


@pytest.fixture
async def stack(settings: Settings, redis_client: aioredis.Redis) -> AsyncIterator[Stack]:
    running = await start_stack(settings, ephemeral_ports=True)
    yield running
    await running.stop(1.0)


@pytest.fixture
async def gateway(stack: Stack) -> AsyncIterator[GatewayClient]:
    async with GatewayClient(stack.address("gateway"), api_key=ACME_KEY) as client:
        yield client


@pytest.fixture
def anyio_backend() -> Iterator[str]:
    yield "asyncio"
