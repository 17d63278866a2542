"""Wiring for the executor: peers, turn leases, turn runner, servicer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc.aio
import redis.asyncio as aioredis

from services.executor.servicer import ExecutorServicer
from services.executor.tasks.classifier import AgentType, Classifier
from services.executor.tasks.command_runner import CommandRunner
from services.executor.tasks.local_runner import LocalRunner
from services.executor.tasks.pool import TaskPool
from services.executor.tasks.records import Runner
from services.executor.tasks.service import ByAgentType, TaskService
from services.executor.tasks.store import RedisTaskStore, SqliteTaskStore, TaskStore
from services.executor.turns.leases import TurnLeases
from services.executor.turns.tools import ToolBox
from services.executor.turns.turn import TurnLimits, TurnRunner
from services.executor.turns.workspace import PermissionRule, Workspace
from threadline.config import ExecutorSettings, ServiceName, Settings, TaskSettings
from threadline.events import EventBus, EventPublisher
from threadline.ids import validate_session_id
from threadline.leases import LocalLeases, RedisLeases
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
        leases = TurnLeases(
            RedisLeases(
                redis_client, ttl_s=settings.executor.turn_lease_ttl_s, prefix="threadline:turn:"
            )
        )
    else:
        leases = TurnLeases(LocalLeases())
    executor = settings.executor
    root = (
        Path(executor.workspace_root)
        if executor.workspace_root
        else settings.data_dir / ("workspaces")
    )
    rules = [PermissionRule(rule.path, rule.permission) for rule in executor.tool_rules]

    def toolbox(directory: Path) -> ToolBox:
        workspace = Workspace(directory, rules, max_file_bytes=executor.max_file_bytes)
        return ToolBox(workspace, max_output_chars=executor.max_tool_output_chars)

    tools: Callable[[str], ToolBox] | None = None
    if executor.tools_enabled:

        def tools(session_id: str) -> ToolBox:
            # One directory per session: a session's tools never see another's files.
            validate_session_id(session_id)  # it becomes a path
            return toolbox(root / "sessions" / session_id)

    prices = {m: (p.input_per_1k, p.output_per_1k) for m, p in executor.prices.items()}
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
            compact_request_threshold=settings.executor.compact_request_threshold,
            # A compaction waits for its job: the job's own timeout, plus a lease wait.
            compact_timeout_s=settings.memory.job_timeout_s + 2 * settings.memory.lease_ttl_s,
        ),
        tools=tools,
        prices=prices,
    )

    events = EventPublisher(bus, SERVICE)
    task_store, task_redis = await open_task_store(settings)
    pool = TaskPool(
        task_store,
        task_runners(executor.tasks, llm, lambda path: toolbox(Path(path)), executor, turns.events),
        events,
        max_concurrency=executor.tasks.max_concurrency,
        max_queue=executor.tasks.max_queue,
        prices=prices,
    )
    classifier = Classifier(
        llm,
        [
            AgentType(name, spec.description, spec.runner)
            for name, spec in executor.tasks.agent_types.items()
        ],
        default=executor.tasks.default_agent_type,
        model=executor.tasks.classifier_model,
    )
    task_service = TaskService(pool, classifier, executor.tasks.agent_types, root / "tasks")
    await pool.start()
    servicer = ExecutorServicer(turns, task_service, pool, task_store)

    def register(server: grpc.aio.Server) -> list[str]:
        executor_pb2_grpc.add_ExecutorServicer_to_server(servicer, server)
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
    if task_redis is not None:
        host.on_stop(task_redis.aclose)
    host.on_stop(task_store.close)
    host.on_drain(lambda: pool.stop(settings.grace_period_s))
    return host


async def open_task_store(settings: Settings) -> tuple[TaskStore, aioredis.Redis | None]:
    database = settings.executor.tasks.database
    if database.startswith(("redis://", "rediss://")):
        client = aioredis.from_url(database)
        return RedisTaskStore(client), client
    path = Path(database.removeprefix("sqlite://")) if database else settings.data_dir / "tasks.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    store = SqliteTaskStore(path)
    await store.open()
    return store, None


def task_runners(
    tasks: TaskSettings,
    llm: LlmClient,
    toolbox: Callable[[str], ToolBox],
    executor: ExecutorSettings,
    events: EventPublisher,
) -> dict[str, Runner]:
    """A runner per kind, each dispatching on the task's agent type."""
    local: dict[str, Runner] = {}
    command: dict[str, Runner] = {}
    for name, spec in tasks.agent_types.items():
        if spec.runner == "command":
            command[name] = CommandRunner(spec.argv, timeout_s=spec.timeout_s)
        else:
            local[name] = LocalRunner(
                llm,
                toolbox,
                model=spec.model,
                max_iterations=executor.max_iterations,
                max_tokens=executor.max_output_tokens,
                events=events,
            )
    return {"local": ByAgentType("local", local), "command": ByAgentType("command", command)}
