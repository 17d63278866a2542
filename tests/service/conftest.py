"""Helpers for the service tests: upstream settings with short timeouts, private
stacks, an event recorder, clients of the running services, a turn through the
executor.

Each test module overrides the root `settings` / `stack` fixtures to start only
the services it exercises; the `events` fixture below then records what the
module's stack publishes on its bus, and `sessions`, `memory`, `executor` and
`llm` are clients of the module's stack.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from tests.builders import TENANT
from tests.conftest import FAKE_MODEL
from threadline.channels import streaming
from threadline.config import SERVICE_NAMES, ServiceName, Settings
from threadline.events import (
    EventBus,
    EventPublisher,
    InProcessEventBus,
    Subscription,
    attributes_of,
)
from threadline.peers import ExecutorClient, LlmClient, MemoryClient, SessionClient
from threadline.stack import Stack, start_stack
from threadline.v1 import executor_pb2
from threadline.v1.events_pb2 import LifecycleEvent

_MARKER = "test.marker"


def upstream_config(
    base_url: str,
    *,
    connect_s: float = 1.0,
    first_token_s: float = 3.0,
    idle_between_chunks_s: float = 2.0,
    total_s: float = 30.0,
) -> dict[str, Any]:
    """The `llm.upstream` settings section for the fake, with the given timeouts."""
    return {
        "name": "fake",
        "base_url": base_url,
        "model": FAKE_MODEL,
        "timeouts": {
            "connect_s": connect_s,
            "first_token_s": first_token_s,
            "idle_between_chunks_s": idle_between_chunks_s,
            "total_s": total_s,
        },
    }


@contextlib.asynccontextmanager
async def private_stack(
    settings: Settings, services: Sequence[ServiceName] = SERVICE_NAMES
) -> AsyncIterator[Stack]:
    """`services` on port 0 with an in-process event bus.

    Redis (settings.redis_url) still backs turn leases and rate limits. Only the
    events stay private: Redis pub/sub channels are shared by everything on that
    server, another test run included, and these tests assert exactly which
    events their own stack published.
    """
    bus = InProcessEventBus()
    stack = await start_stack(settings, services=services, bus=bus, ephemeral_ports=True)
    try:
        yield stack
    finally:
        await stack.stop(1.0)
        await bus.close()


class EventRecorder:
    """Every lifecycle event a bus delivers from the moment it is opened."""

    def __init__(self, bus: EventBus, subscription: Subscription) -> None:
        self.events: list[LifecycleEvent] = []
        self._bus = bus
        self._subscription = subscription
        self._changed = asyncio.Event()
        self._pump = asyncio.create_task(self._read(), name="event-recorder")

    async def _read(self) -> None:
        async for event in self._subscription:
            self.events.append(event)
            self._changed.set()

    def of_type(self, type_: str, *, session_id: str | None = None) -> list[LifecycleEvent]:
        return [
            e
            for e in self.events
            if e.type == type_ and (session_id is None or e.session_id == session_id)
        ]

    def types(self, prefix: str = "") -> list[str]:
        """Types seen, in order, except service lifecycle and test markers."""
        return [
            e.type
            for e in self.events
            if e.type.startswith(prefix) and not e.type.startswith(("service.", _MARKER))
        ]

    async def wait_for(
        self,
        type_: str,
        *,
        count: int = 1,
        session_id: str | None = None,
        timeout: float = 5.0,
    ) -> list[LifecycleEvent]:
        """The events of `type_` once at least `count` of them have arrived."""
        async with asyncio.timeout(timeout):
            while len(self.of_type(type_, session_id=session_id)) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.of_type(type_, session_id=session_id)

    async def settle(self, timeout: float = 5.0) -> None:
        """Wait until every event published before this call has been received.

        The bus sends events in publish order, so once a marker published now
        comes back, nothing published earlier is still on its way: absence
        checks after this are meaningful.
        """
        marker = EventPublisher(self._bus, "tests").emit(_MARKER, nonce=uuid.uuid4().hex)
        async with asyncio.timeout(timeout):
            while not any(e.id == marker.id for e in self.events):
                self._changed.clear()
                await self._changed.wait()

    async def close(self) -> None:
        self._pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._pump
        await self._subscription.close()


def attrs(event: LifecycleEvent) -> dict[str, Any]:
    return attributes_of(event)


@pytest.fixture
async def events(stack: Stack) -> AsyncIterator[EventRecorder]:
    recorder = EventRecorder(stack.bus, await stack.bus.subscribe())
    # The subscription is live once a marker published after it comes back.
    await recorder.settle()
    yield recorder
    await recorder.close()


@pytest.fixture
async def sessions(stack: Stack) -> AsyncIterator[SessionClient]:
    client = SessionClient(stack.address("session"))
    yield client
    await client.close()


@pytest.fixture
async def memory(stack: Stack) -> AsyncIterator[MemoryClient]:
    client = MemoryClient(stack.address("memory"))
    yield client
    await client.close()


@pytest.fixture
async def executor(stack: Stack) -> AsyncIterator[ExecutorClient]:
    client = ExecutorClient(stack.address("executor"))
    yield client
    await client.close()


@pytest.fixture
async def llm(stack: Stack) -> AsyncIterator[LlmClient]:
    client = LlmClient(stack.address("llm_proxy"))
    yield client
    await client.close()


async def run_turn(
    executor: ExecutorClient, session_id: str, text: str, tenant: str = TENANT
) -> list[executor_pb2.TurnEvent]:
    """Every event of one turn, as the gateway would relay them."""
    request = executor_pb2.RunTurnRequest(tenant=tenant, session_id=session_id, input=text)
    return [e async for e in streaming(executor.run_turn(request))]


def kinds(events: list[executor_pb2.TurnEvent]) -> list[str | None]:
    return [e.WhichOneof("event") for e in events]
