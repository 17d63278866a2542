"""Server bootstrap shared by every service: build, serve, drain on SIGTERM.

`build_server` returns a `ServiceHost` (the grpc.aio server with health and
reflection wired) and its bound port; tests bind port 0 and talk to the real
thing. `wait_for_shutdown_signal` returns on SIGTERM/SIGINT; `stop_in_order` then stops hosts
callers first: health flips to NOT_SERVING, new RPCs are refused, in-flight
ones get the grace period to finish, then resources close.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from threadline.interceptors import ServerContextInterceptor
from threadline.logs import get_logger

log = get_logger("threadline.server")

#: Registers servicers on the server and returns their full service names.
Register = Callable[[grpc.aio.Server], Iterable[str]]
Closer = Callable[[], Awaitable[None]]


@dataclass
class ServiceHost:
    name: str
    server: grpc.aio.Server
    health: HealthServicer
    port: int
    service_names: tuple[str, ...]
    #: Run after the server has drained, last registered first (e.g. close Redis last).
    closers: list[Closer] = field(default_factory=list)
    #: Run when draining starts, e.g. to end endless streams (event watches) at once.
    drain_hooks: list[Closer] = field(default_factory=list)
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)
    _stopping: bool = False

    async def start(self) -> None:
        await self.server.start()
        for service in ("", *self.service_names):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("service.listening", service=self.name, port=self.port)

    def on_stop(self, closer: Closer) -> None:
        self.closers.append(closer)

    def on_drain(self, hook: Closer) -> None:
        self.drain_hooks.append(hook)

    async def stop(self, grace_s: float) -> None:
        """Drain and close. Safe to call twice; the second call waits for the first."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        log.info("service.draining", service=self.name, grace_s=grace_s)
        await self.health.enter_graceful_shutdown()
        for hook in self.drain_hooks:
            await hook()
        await self.server.stop(grace_s)
        for closer in reversed(self.closers):
            try:
                await closer()
            except Exception:
                log.exception("service.close_failed", service=self.name)
        log.info("service.stopped", service=self.name)
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


def build_server(
    name: str,
    register: Register,
    *,
    address: str,
    max_message_bytes: int = 16 * 1024 * 1024,
) -> tuple[ServiceHost, int]:
    """Build (not start) a server for `register`'s servicers on `address` ("host:port")."""
    server = grpc.aio.server(
        interceptors=[ServerContextInterceptor()],
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
            # Clients reconnect now and then, so behind a Kubernetes Service (which
            # balances connections, not calls) new replicas get a share of the load.
            # No age grace is set: running streams (WatchEvents) finish undisturbed.
            ("grpc.max_connection_age_ms", 300_000),
        ],
    )
    service_names = tuple(register(server))
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            *service_names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"{name}: cannot bind {address}")
    return ServiceHost(name, server, health, port, service_names), port


async def wait_for_shutdown_signal() -> None:
    """Return on the first SIGTERM or SIGINT (Kubernetes stops pods with SIGTERM)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("shutdown.signalled")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def stop_in_order(hosts: Sequence[ServiceHost], grace_s: float) -> None:
    # Every host stops refusing new work at once, so no caller starts a turn that a
    # stopped callee could not finish; then each drains, callers first.
    for host in hosts:
        await host.health.enter_graceful_shutdown()
    for host in hosts:
        await host.stop(grace_s)
