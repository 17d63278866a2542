"""Wiring for llm_proxy: upstream client, proxy, servicer, server."""

from __future__ import annotations

import grpc.aio

from services.llm_proxy.proxy import ChatProxy
from services.llm_proxy.retry import RetryPolicy
from services.llm_proxy.servicer import LlmProxyServicer
from services.llm_proxy.upstream import Upstream
from threadline.config import ServiceName, Settings
from threadline.errors import FailedPrecondition
from threadline.events import EventBus, EventPublisher
from threadline.server import ServiceHost, build_server
from threadline.v1 import llm_pb2, llm_pb2_grpc

SERVICE: ServiceName = "llm_proxy"


async def create(settings: Settings, bus: EventBus, *, address: str | None = None) -> ServiceHost:
    if settings.llm.upstream is None:
        raise FailedPrecondition(
            "llm_proxy needs an upstream: set llm.upstream.base_url and llm.upstream.model "
            "(THREADLINE_LLM__UPSTREAM__BASE_URL, THREADLINE_LLM__UPSTREAM__MODEL)"
        )
    upstream = Upstream.create(settings.llm.upstream)
    proxy = ChatProxy(
        upstream, RetryPolicy.from_settings(settings.llm.retry), EventPublisher(bus, SERVICE)
    )

    def register(server: grpc.aio.Server) -> list[str]:
        llm_pb2_grpc.add_LlmProxyServicer_to_server(LlmProxyServicer(proxy), server)
        return [llm_pb2.DESCRIPTOR.services_by_name["LlmProxy"].full_name]

    host, _ = build_server(
        SERVICE,
        register,
        address=address or settings.bind_address(SERVICE),
    )
    host.on_stop(upstream.close)
    return host
