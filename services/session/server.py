"""Wiring for the session service: SQLite store, servicer, server."""

from __future__ import annotations

import grpc.aio

from services.session.servicer import SessionsServicer
from services.session.sqlite_store import SqliteSessionStore
from services.session.tokens import TokenEstimator
from threadline.config import ServiceName, Settings
from threadline.events import EventBus, EventPublisher
from threadline.server import ServiceHost, build_server
from threadline.v1 import session_pb2, session_pb2_grpc

SERVICE: ServiceName = "session"


async def create(settings: Settings, bus: EventBus, *, address: str | None = None) -> ServiceHost:
    path = settings.sqlite_path("session")
    path.parent.mkdir(parents=True, exist_ok=True)
    store = SqliteSessionStore(
        path,
        max_message_chars=settings.session.max_message_chars,
        max_messages_per_append=settings.session.max_messages_per_append,
    )
    await store.open()
    servicer = SessionsServicer(store, TokenEstimator(), EventPublisher(bus, SERVICE))

    def register(server: grpc.aio.Server) -> list[str]:
        session_pb2_grpc.add_SessionsServicer_to_server(servicer, server)
        return [session_pb2.DESCRIPTOR.services_by_name["Sessions"].full_name]

    host, _ = build_server(
        SERVICE,
        register,
        address=address or settings.bind_address(SERVICE),
    )
    host.on_stop(store.close)
    return host
