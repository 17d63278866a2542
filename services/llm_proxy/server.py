"""Wiring for llm_proxy: upstream clients, limits, breakers, router, proxy, servicer."""

from __future__ import annotations

import grpc.aio
import redis.asyncio as aioredis

from services.llm_proxy.breaker import CircuitBreaker
from services.llm_proxy.limits import LocalBuckets, RedisBuckets, TokenBuckets, UpstreamLimiter
from services.llm_proxy.proxy import ChatProxy
from services.llm_proxy.retry import RetryPolicy
from services.llm_proxy.router import Router, UpstreamRuntime
from services.llm_proxy.servicer import LlmProxyServicer
from services.llm_proxy.upstream import Upstream
from threadline.config import ServiceName, Settings
from threadline.errors import FailedPrecondition
from threadline.events import EventBus, EventPublisher
from threadline.redis_client import connect_redis
from threadline.server import ServiceHost, build_server
from threadline.transport import listener_security
from threadline.v1 import llm_pb2, llm_pb2_grpc

SERVICE: ServiceName = "llm_proxy"


async def create(settings: Settings, bus: EventBus, *, address: str | None = None) -> ServiceHost:
    llm = settings.llm
    if not llm.all_upstreams:
        raise FailedPrecondition(
            "llm_proxy needs an upstream: set llm.upstream.base_url and llm.upstream.model "
            "(THREADLINE_LLM__UPSTREAM__BASE_URL, THREADLINE_LLM__UPSTREAM__MODEL) or llm.upstreams"
        )
    redis_client: aioredis.Redis | None = None
    buckets: TokenBuckets = LocalBuckets()
    if settings.redis_url:
        redis_client = connect_redis(settings.redis_url)
        buckets = RedisBuckets(redis_client)
    events = EventPublisher(bus, SERVICE)
    upstreams = {
        u.name: UpstreamRuntime(
            client=Upstream.create(u, events),
            limiter=UpstreamLimiter(
                u.name,
                buckets,
                max_concurrency=u.max_concurrency,
                rpm=u.rpm,
                tpm=u.tpm,
                max_wait_s=llm.rate_limit_wait_s,
            ),
            breaker=CircuitBreaker(
                failure_threshold=llm.circuit.failure_threshold, cooldown_s=llm.circuit.cooldown_s
            ),
        )
        for u in llm.all_upstreams
    }
    proxy = ChatProxy(
        Router(llm, upstreams),
        RetryPolicy.from_settings(llm.retry),
        events,
    )

    def register(server: grpc.aio.Server) -> list[str]:
        llm_pb2_grpc.add_LlmProxyServicer_to_server(LlmProxyServicer(proxy), server)
        return [llm_pb2.DESCRIPTOR.services_by_name["LlmProxy"].full_name]

    host, _ = build_server(
        SERVICE,
        register,
        address=address or settings.bind_address(SERVICE),
        security=listener_security(settings, SERVICE),
    )
    if redis_client is not None:
        host.on_stop(redis_client.aclose)
    for upstream in upstreams.values():
        host.on_stop(upstream.client.close)
    # Closers run last-registered first: settlements finish before Redis closes.
    host.on_stop(proxy.settled)
    return host
