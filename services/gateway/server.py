"""Wiring for the gateway: authenticator, peers, servicer."""

from __future__ import annotations

import grpc.aio

from services.gateway.auth import ApiKeyAuthenticator
from services.gateway.servicer import GatewayServicer, InputLimits
from threadline.config import ServiceName, Settings
from threadline.events import EventBus
from threadline.peers import ExecutorClient, MemoryClient, SessionClient
from threadline.server import ServiceHost, build_server
from threadline.transport import channel_security, listener_security
from threadline.v1 import gateway_pb2, gateway_pb2_grpc

SERVICE: ServiceName = "gateway"


async def create(settings: Settings, bus: EventBus, *, address: str | None = None) -> ServiceHost:
    peers = channel_security(settings)
    sessions = SessionClient(settings.addresses.session, peers)
    executor = ExecutorClient(settings.addresses.executor, peers)
    memory = MemoryClient(settings.addresses.memory, peers)
    servicer = GatewayServicer(
        ApiKeyAuthenticator(settings.gateway.api_keys),
        sessions,
        executor,
        memory,
        bus,
        InputLimits(max_input_chars=settings.gateway.max_input_chars),
    )

    def register(server: grpc.aio.Server) -> list[str]:
        gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
        return [gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name]

    host, _ = build_server(
        SERVICE,
        register,
        address=address or settings.bind_address(SERVICE),
        security=listener_security(settings, SERVICE),
    )
    host.on_drain(lambda _grace_s: servicer.end_watches())
    host.on_stop(sessions.close)
    host.on_stop(executor.close)
    host.on_stop(memory.close)
    return host
