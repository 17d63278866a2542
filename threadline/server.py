"""Server bootstrap shared by every service: build, serve, drain on SIGTERM.

`build_server` returns a `ServiceHost` (the grpc.aio server with health and
reflection wired) and its bound port; tests bind port 0 and talk to the real
thing. `wait_for_shutdown_signal` returns on SIGTERM/SIGINT; `stop_in_order` then
starts every host draining at once (health NOT_SERVING, drain hooks told the grace
period) and stops them callers first: new RPCs are refused, in-flight ones get
the grace period to finish, then resources close. A second signal during the
drain hurries it (`on_signal_during`): hooks end their work now, and RPCs still
running shortly after are cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from threadline.in_process import MAX_MESSAGE_BYTES, LocalServer
from threadline.interceptors import ServerContextInterceptor
from threadline.logs import get_logger
from threadline.startup_errors import BindError

log = get_logger("threadline.server")

#: Registers servicers on the server and returns their full service names.
Register = Callable[[grpc.aio.Server], Iterable[str]]
Closer = Callable[[], Awaitable[None]]
#: Told, when draining starts, how long in-flight RPCs have before they are cancelled.
DrainHook = Callable[[float], Awaitable[None]]
#: After a hurry, how long RPCs have to send their last messages before cancellation.
HURRY_S = 1.0


@dataclass(frozen=True)
class ListenerSecurity:
    """How a listener is secured (threadline.transport builds it from settings)."""

    #: TLS credentials; None listens in plaintext.
    credentials: grpc.ServerCredentials | None = None
    #: Checks of who calls (threadline.service_auth), run after the request context is bound.
    interceptors: tuple[grpc.aio.ServerInterceptor, ...] = ()
    #: A plaintext listener serving only health, for probes that cannot speak TLS.
    health_address: str | None = None


@dataclass
class ServiceHost:
    name: str
    server: grpc.aio.Server
    health: HealthServicer
    port: int
    service_names: tuple[str, ...]
    #: The probe listener (ListenerSecurity.health_address), if any.
    health_server: grpc.aio.Server | None = None
    #: The same handlers, for peers in this process (threadline.in_process).
    local: LocalServer = field(default_factory=lambda: LocalServer(()))
    #: Run after the server has drained, last registered first (e.g. close Redis last).
    closers: list[Closer] = field(default_factory=list)
    #: Run when draining starts, e.g. to end endless streams (event watches) at once.
    drain_hooks: list[DrainHook] = field(default_factory=list)
    #: Run on a second shutdown signal: end in-flight work now.
    hurry_hooks: list[Callable[[], None]] = field(default_factory=list)
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)
    _stopping: bool = False
    _draining: asyncio.Task[None] | None = None
    _cancelling: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.server.start()
        if self.health_server is not None:
            await self.health_server.start()
        for service in ("", *self.service_names):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("service.listening", service=self.name, port=self.port)

    def on_stop(self, closer: Closer) -> None:
        self.closers.append(closer)

    def on_drain(self, hook: DrainHook) -> None:
        self.drain_hooks.append(hook)

    def on_hurry(self, hook: Callable[[], None]) -> None:
        self.hurry_hooks.append(hook)

    async def begin_drain(self, grace_s: float) -> None:
        """Refuse new work and start the drain hooks (they run in the background)."""
        if self._draining is not None:
            return
        log.info("service.draining", service=self.name, grace_s=grace_s)
        await self.health.enter_graceful_shutdown()
        hooks = [hook(grace_s) for hook in self.drain_hooks]
        self._draining = asyncio.create_task(_all(hooks), name=f"drain-{self.name}")

    def hurry(self) -> None:
        """End in-flight work now; what still runs `HURRY_S` later is cancelled."""
        for hook in self.hurry_hooks:
            hook()
        if self._stopping:
            asyncio.get_running_loop().call_later(HURRY_S, self._cancel_calls)

    def _cancel_calls(self) -> None:
        # grace None cancels every call at once, cutting short a stop() in progress.
        self.local.cancel_all()
        self._cancelling = asyncio.create_task(
            self.server.stop(None), name=f"cancel-calls-{self.name}"
        )

    async def stop(self, grace_s: float) -> None:
        """Drain and close. Safe to call twice; the second call waits for the first."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        await self.begin_drain(grace_s)
        await asyncio.gather(self.server.stop(grace_s), self.local.stop(grace_s))
        if self.health_server is not None:
            await self.health_server.stop(0)
        assert self._draining is not None
        await self._draining
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
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    security: ListenerSecurity | None = None,
) -> tuple[ServiceHost, int]:
    """Build (not start) a server for `register`'s servicers on `address` ("host:port").

    Without `security` it listens in plaintext and lets every caller in.
    """
    security = security or ListenerSecurity()
    # The request context first (with the RPC's server span), so it covers auth.
    interceptors = [ServerContextInterceptor(name), *security.interceptors]
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
            # Clients reconnect every 30 s, and a reconnect makes a `dns:///` target
            # resolve again, so callers find replicas added behind a headless Service
            # within that time (and a ClusterIP Service spreads connections anew).
            # No age grace is set: running streams (WatchEvents) finish undisturbed.
            ("grpc.max_connection_age_ms", 30_000),
        ],
    )
    local = LocalServer(interceptors)
    service_names = tuple(register(cast(grpc.aio.Server, _Registrar(server, local))))
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
    setting = f"addresses.{name} (THREADLINE_ADDRESSES__{name.upper()}) or listen_port"
    try:
        if security.credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, security.credentials)
    except RuntimeError:  # grpc's "Failed to bind to address"
        port = 0
    if port == 0:
        raise BindError(name, address, setting)
    host = ServiceHost(name, server, health, port, service_names, local=local)
    if security.health_address is not None:
        host.health_server = _health_server(name, health, security.health_address)
    return host, port


class _Registrar:
    """What generated `add_*Servicer_to_server` functions register on: the server, and
    the in-process server beside it."""

    def __init__(self, server: grpc.aio.Server, local: LocalServer) -> None:
        self._server = server
        self._local = local

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(handlers)
        self._local.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self._server.add_registered_method_handlers(service, handlers)
        self._local.add_registered_method_handlers(service, handlers)


def _health_server(name: str, health: HealthServicer, address: str) -> grpc.aio.Server:
    """A plaintext server with only the health service, sharing the main server's state."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:  # grpc's "Failed to bind to address"
        port = 0
    if port == 0:
        raise BindError(f"{name} health", address, "health_port (THREADLINE_HEALTH_PORT)")
    return server


async def _all(hooks: Sequence[Awaitable[None]]) -> None:
    for outcome in await asyncio.gather(*hooks, return_exceptions=True):
        if isinstance(outcome, BaseException):
            log.error("service.drain_hook_failed", exc_info=outcome)


@contextlib.contextmanager
def on_signal_during(callback: Callable[[], None]) -> Iterator[None]:
    """Call `callback` on SIGTERM or SIGINT while the block runs (a second signal
    during a drain), instead of dying at once with partial answers unstored."""
    loop = asyncio.get_running_loop()

    def signalled() -> None:
        log.warning("shutdown.hurried")
        callback()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signalled)
    try:
        yield
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


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
    # Every host starts draining at once, so no caller starts a turn that a stopped
    # callee could not finish, and every drain hook knows the deadline from the
    # start; then each stops, callers first.
    for host in hosts:
        await host.begin_drain(grace_s)
    for host in hosts:
        await host.stop(grace_s)
