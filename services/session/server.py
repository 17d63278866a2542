"""Wiring for the session service: the store (SQLite, Redis or PostgreSQL), retention, servicer."""

from __future__ import annotations

import grpc.aio
import redis.asyncio as aioredis

from services.session.retention import Retention
from services.session.servicer import SessionsServicer
from services.session.sqlite_store import SqliteSessionStore
from services.session.store import SessionStore
from services.session.tokens import TokenEstimator
from threadline.config import ServiceName, Settings
from threadline.events import EventBus, EventPublisher
from threadline.redis_client import connect_redis
from threadline.server import ServiceHost, build_server
from threadline.store_urls import PostgresUrl, RedisUrl, SqliteUrl
from threadline.telemetry.stores import backend_of, instrumented
from threadline.transport import listener_security
from threadline.v1 import session_pb2, session_pb2_grpc

SERVICE: ServiceName = "session"


async def open_store(settings: Settings) -> tuple[SessionStore, aioredis.Redis | None]:
    """The configured backend, open; and the Redis client to close after it, if any."""
    store_url = settings.store_url("session")
    max_chars = settings.session.max_message_chars
    max_messages = settings.session.max_messages_per_append
    if isinstance(store_url, RedisUrl):
        from services.session.redis_store import RedisSessionStore

        client = connect_redis(store_url.url)
        redis_store = RedisSessionStore(
            client, max_message_chars=max_chars, max_messages_per_append=max_messages
        )
        return redis_store, client
    if isinstance(store_url, PostgresUrl):
        from services.session.postgres_store import PostgresSessionStore

        postgres_store = PostgresSessionStore(
            store_url.url,
            max_message_chars=max_chars,
            max_messages_per_append=max_messages,
            max_connections=store_url.pool_size,
        )
        await postgres_store.open()
        return postgres_store, None
    assert isinstance(store_url, SqliteUrl), "config accepts no other kind for sessions"
    store_url.path.parent.mkdir(parents=True, exist_ok=True)
    store = SqliteSessionStore(
        store_url.path, max_message_chars=max_chars, max_messages_per_append=max_messages
    )
    await store.open()
    return store, None


async def create(settings: Settings, bus: EventBus, *, address: str | None = None) -> ServiceHost:
    opened, redis_client = await open_store(settings)
    store = instrumented(opened, "session", backend_of(opened))
    events = EventPublisher(bus, SERVICE)
    retention = Retention(
        store,
        events,
        ttl_s=settings.session.ttl_s,
        max_sessions_per_tenant=settings.session.max_sessions_per_tenant,
        interval_s=settings.session.cleanup_interval_s,
    )
    servicer = SessionsServicer(store, TokenEstimator(), events, retention)

    def register(server: grpc.aio.Server) -> list[str]:
        session_pb2_grpc.add_SessionsServicer_to_server(servicer, server)
        return [session_pb2.DESCRIPTOR.services_by_name["Sessions"].full_name]

    host, _ = build_server(
        SERVICE,
        register,
        address=address or settings.bind_address(SERVICE),
        security=listener_security(settings, SERVICE),
    )
    retention.start()
    if redis_client is not None:
        host.on_stop(redis_client.aclose)
    host.on_stop(store.close)
    host.on_drain(lambda _grace_s: retention.stop())
    return host
