"""Wiring for the executor: peers, turn leases, turn runner, servicer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc.aio
import redis.asyncio as aioredis

from services.executor.leases import LocalTurnLeases, RedisTurnLeases, TurnLeases
from services.executor.servicer import ExecutorServicer
from services.executor.tools import ToolBox
from services.executor.turn import TurnLimits, TurnRunner
from services.executor.workspace import PermissionRule, Workspace
from threadline.config import ServiceName, Settings
from threadline.events import EventBus, EventPublisher
from threadline.ids import validate_session_id
from threadline.peers import LlmClient, MemoryClient, SessionClient
from threadline.server import ServiceHost, build_server
from threadline.v1 import executor_pb2, executor_pb2_grpc

SERVICE: ServiceName = "executor"


async def create(settings: Settings, bus: EventBus, *, address: str | None = None) -> ServiceHost:
    sessions = SessionClient(settings.addresses.session)
    memory = MemoryClient(settings.addresses.memory)
    llm = LlmClient(settings.addresses.llm_proxy)
    redis_client: aioredis.Redis | None = None
    leases: TurnLeases
    if settings.redis_url:
        redis_client = aioredis.from_url(settings.redis_url)
        leases = RedisTurnLeases(redis_client, ttl_s=settings.executor.turn_lease_ttl_s)
    else:
        leases = LocalTurnLeases()
    tools: Callable[[str], ToolBox] | None = None
    if settings.executor.tools_enabled:
        executor = settings.executor
        root = (
            Path(executor.workspace_root)
            if executor.workspace_root
            else (settings.data_dir / "workspaces")
        )
        rules = [PermissionRule(rule.path, rule.permission) for rule in executor.tool_rules]

        def tools(session_id: str) -> ToolBox:
            # One directory per session: a session's tools never see another's files.
            validate_session_id(session_id)  # it becomes a path
            workspace = Workspace(root / session_id, rules, max_file_bytes=executor.max_file_bytes)
            return ToolBox(workspace, max_output_chars=executor.max_tool_output_chars)

    turns = TurnRunner(
        sessions=sessions,
        memory=memory,
        llm=llm,
        leases=leases,
        events=EventPublisher(bus, SERVICE),
        limits=TurnLimits(
            context_budget_tokens=settings.executor.context_budget_tokens,
            max_output_tokens=settings.executor.max_output_tokens,
            max_iterations=settings.executor.max_iterations,
        ),
        tools=tools,
    )

    def register(server: grpc.aio.Server) -> list[str]:
        executor_pb2_grpc.add_ExecutorServicer_to_server(ExecutorServicer(turns), server)
        return [executor_pb2.DESCRIPTOR.services_by_name["Executor"].full_name]

    host, _ = build_server(
        SERVICE,
        register,
        address=address or settings.bind_address(SERVICE),
    )
    # Closers run last-registered first: partial answers are stored before peers close.
    host.on_stop(sessions.close)
    host.on_stop(memory.close)
    host.on_stop(llm.close)
    if redis_client is not None:
        host.on_stop(redis_client.aclose)
    host.on_stop(turns.drain)
    return host
