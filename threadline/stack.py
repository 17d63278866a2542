"""Composition root: start services in dependency order, stop them callers first.

Used by `threadline up` (all five in one process, each on its own port; they call
each other in process, threadline/in_process.py), by `threadline serve <service>`
(one), and by tests (port 0).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from services.executor import server as executor_server
from services.gateway import server as gateway_server
from services.llm_proxy import server as llm_proxy_server
from services.memory import server as memory_server
from services.session import server as session_server
from threadline import in_process
from threadline.config import SERVICE_NAMES, ServiceName, Settings
from threadline.events import EventBus, EventPublisher, make_bus
from threadline.logs import get_logger
from threadline.server import ServiceHost, stop_in_order
from threadline.telemetry import metrics, tracing

log = get_logger(__name__)


Factory = Callable[..., Awaitable[ServiceHost]]

FACTORIES: dict[ServiceName, Factory] = {
    "llm_proxy": llm_proxy_server.create,
    "session": session_server.create,
    "memory": memory_server.create,
    "executor": executor_server.create,
    "gateway": gateway_server.create,
}
#: Callees before callers, so every service's peers are up when it starts.
START_ORDER: tuple[ServiceName, ...] = ("llm_proxy", "session", "memory", "executor", "gateway")


@dataclass
class Stack:
    settings: Settings
    bus: EventBus
    hosts: dict[ServiceName, ServiceHost] = field(default_factory=dict)
    owns_bus: bool = True
    _stopped: bool = False

    def address(self, service: ServiceName) -> str:
        return self.settings.addresses.of(service)

    def hurry(self) -> None:
        """Cut a stop in progress short: running turns end now, stored as interrupted."""
        for host in self.hosts.values():
            host.hurry()

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop callers first, so in-flight turns can still reach their callees. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.settings.grace_period_s if grace_s is None else grace_s
        ordered = [self.hosts[name] for name in reversed(START_ORDER) if name in self.hosts]
        for host in ordered:
            EventPublisher(self.bus, host.name).emit("service.stopping", grace_s=grace)
        await stop_in_order(ordered, grace)
        for name, host in self.hosts.items():
            in_process.unregister(self.address(name), host.local)
        for host in ordered:
            EventPublisher(self.bus, host.name).emit("service.stopped")
        if self.owns_bus:
            await self.bus.close()


async def start_stack(
    settings: Settings,
    *,
    services: Sequence[ServiceName] = SERVICE_NAMES,
    bus: EventBus | None = None,
    ephemeral_ports: bool = False,
) -> Stack:
    """Start `services`; with `ephemeral_ports` each binds port 0 and peers learn the port."""
    owns_bus = bus is None
    if bus is None:
        bus = make_bus(
            settings.redis_url,
            buffer_size=settings.events.buffer_size,
            stream_maxlen=settings.events.stream_maxlen,
            stream_max_age_s=settings.events.stream_max_age_s,
            namespace=settings.events.namespace,
        )
        await bus.start()
    stack = Stack(settings, bus, owns_bus=owns_bus)
    only = services[0] if len(services) == 1 else None
    tracing.install(settings.tracing, f"threadline-{only}" if only else "threadline")
    if settings.metrics_port:
        metrics.serve(settings.metrics_port, settings.listen_host, services)
    try:
        for name in START_ORDER:
            if name not in services:
                continue
            started = time.perf_counter()
            address = f"{settings.listen_host}:0" if ephemeral_ports else None
            host = await FACTORIES[name](stack.settings, bus, address=address)
            await host.start()
            stack.hosts[name] = host
            if ephemeral_ports:
                addresses = stack.settings.addresses.model_copy(
                    update={name: f"{settings.listen_host}:{host.port}"}
                )
                stack.settings = stack.settings.model_copy(update={"addresses": addresses})
            if settings.in_process_calls:
                # Its peers in this process, started after it, call it here directly.
                in_process.register(stack.address(name), host.local)
            EventPublisher(bus, name).emit(
                "service.started",
                port=host.port,
                startup_ms=int((time.perf_counter() - started) * 1000),
            )
    except BaseException:
        await stack.stop(0)
        raise
    return stack
