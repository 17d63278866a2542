"""Wiring for memory: SQLite memory store, session and llm_proxy peers, servicer."""

from __future__ import annotations

import grpc.aio

from services.memory.consolidation import Consolidator
from services.memory.servicer import MemoryServicer
from services.memory.store import SqliteMemoryStore
from threadline.config import ServiceName, Settings
from threadline.events import EventBus, EventPublisher
from threadline.peers import LlmClient, SessionClient
from threadline.server import ServiceHost, build_server
from threadline.v1 import memory_pb2, memory_pb2_grpc

SERVICE: ServiceName = "memory"


async def create(settings: Settings, bus: EventBus, *, address: str | None = None) -> ServiceHost:
    path = settings.sqlite_path("memory")
    path.parent.mkdir(parents=True, exist_ok=True)
    store = SqliteMemoryStore(path)
    await store.open()
    sessions = SessionClient(settings.addresses.session)
    llm = LlmClient(settings.addresses.llm_proxy)
    consolidator = Consolidator(
        store=store,
        sessions=sessions,
        summariser=llm,
        events=EventPublisher(bus, SERVICE),
        model=settings.memory.model,
        max_summary_tokens=settings.memory.max_summary_tokens,
    )

    def register(server: grpc.aio.Server) -> list[str]:
        memory_pb2_grpc.add_MemoryServicer_to_server(MemoryServicer(consolidator), server)
        return [memory_pb2.DESCRIPTOR.services_by_name["Memory"].full_name]

    host, _ = build_server(
        SERVICE,
        register,
        address=address or settings.bind_address(SERVICE),
    )
    host.on_stop(store.close)
    host.on_stop(sessions.close)
    host.on_stop(llm.close)
    return host
