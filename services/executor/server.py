"""Wiring for the executor: peers, turn leases, turn runner, servicer."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import grpc.aio
import redis.asyncio as aioredis

from services.executor import turn_metrics
from services.executor.servicer import ExecutorServicer
from services.executor.tasks.classifier import AgentType, Classifier
from services.executor.tasks.command_runner import CommandRunner
from services.executor.tasks.erasure import TaskErasure
from services.executor.tasks.local_runner import LocalRunner
from services.executor.tasks.pool import TaskPool
from services.executor.tasks.postgres_store import PostgresTaskStore
from services.executor.tasks.records import Runner
from services.executor.tasks.service import ByAgentType, TaskService
from services.executor.tasks.store import RedisTaskStore, SqliteTaskStore, TaskStore
from services.executor.tasks.workspaces import TaskWorkspaces
from services.executor.turns.admission import TurnQueue
from services.executor.turns.drafts import Drafts, LocalDrafts, RedisDrafts
from services.executor.turns.leases import TurnLeases
from services.executor.turns.session_workspaces import SessionWorkspaces
from services.executor.turns.tools import ToolBox
from services.executor.turns.turn import TurnLimits, TurnRunner
from services.executor.turns.workspace import PermissionRule, Workspace
from threadline.config import ExecutorSettings, ServiceName, Settings, TaskSettings
from threadline.events import EventBus, EventPublisher
from threadline.leases import LocalLeases, RedisLeases
from threadline.peers import LlmClient, MemoryClient, SessionClient
from threadline.redis_client import connect_redis
from threadline.server import ServiceHost, build_server
from threadline.store_urls import PostgresUrl, RedisUrl
from threadline.telemetry.stores import backend_of, instrumented
from threadline.transport import channel_security, listener_security
from threadline.v1 import executor_pb2, executor_pb2_grpc

SERVICE: ServiceName = "executor"
#: The tools over a workspace directory.
ToolBoxes = Callable[[str], ToolBox]


async def create(settings: Settings, bus: EventBus, *, address: str | None = None) -> ServiceHost:
    peers = channel_security(settings)
    sessions = SessionClient(settings.addresses.session, peers)
    memory = MemoryClient(settings.addresses.memory, peers)
    llm = LlmClient(settings.addresses.llm_proxy, peers)
    redis_client = connect_redis(settings.redis_url) if settings.redis_url else None
    events = EventPublisher(bus, SERVICE)
    toolbox = _toolboxes(settings)
    drafts = _drafts(redis_client)
    workspaces = SessionWorkspaces(
        _workspace_root(settings) / "sessions", toolbox, settings.executor.max_file_bytes
    )
    turns = TurnRunner(
        sessions=sessions,
        memory=memory,
        llm=llm,
        leases=_turn_leases(settings, redis_client),
        events=events,
        limits=_turn_limits(settings),
        tools=workspaces.offered if settings.executor.tools_enabled else None,
        prices=_prices(settings.executor),
        drafts=drafts,
    )
    opened, task_redis = await open_task_store(settings)
    task_store = instrumented(opened, "tasks", backend_of(opened))
    turn_metrics.install()
    pool = TaskPool(
        task_store,
        task_runners(settings.executor.tasks, llm, toolbox, settings.executor, events),
        events,
        max_concurrency=settings.executor.tasks.max_concurrency,
        max_queue=settings.executor.tasks.max_queue,
        prices=_prices(settings.executor),
    )
    task_service = _task_service(settings, task_store, pool, llm, events)
    queue = TurnQueue(
        settings.executor.max_running_turns, settings.executor.max_queued_turns, events
    )
    servicer = ExecutorServicer(turns, task_service, pool, task_store, queue)

    def register(server: grpc.aio.Server) -> list[str]:
        executor_pb2_grpc.add_ExecutorServicer_to_server(servicer, server)
        return [executor_pb2.DESCRIPTOR.services_by_name["Executor"].full_name]

    host, port = build_server(
        SERVICE,
        register,
        address=address or settings.bind_address(SERVICE),
        security=listener_security(settings, SERVICE),
    )
    # The replica's name in the task store: the same after a restart, distinct between
    # replicas (in Kubernetes the hostname is the pod's name; on one machine, the port).
    await pool.start(f"{socket.gethostname()}:{port}")
    task_service.erasure.start()
    # Workspaces of sessions deleted while this replica was down go at the first pass.
    await workspaces.start(sessions, settings.executor.erasure_poll_s, forget=drafts.drop)
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
    # Before the store closes (closers run last-registered first).
    host.on_stop(task_service.erasure.stop)
    host.on_stop(workspaces.stop)
    host.on_drain(pool.stop)
    host.on_drain(turns.shutdown)
    host.on_hurry(turns.hurry)
    return host


def _task_service(
    settings: Settings, store: TaskStore, pool: TaskPool, llm: LlmClient, events: EventPublisher
) -> TaskService:
    """Submitting tasks, and removing them (DeleteTask, tenant erasure, retention)."""
    tasks = settings.executor.tasks
    workspaces = TaskWorkspaces(_workspace_root(settings) / "tasks")
    erasure = TaskErasure(
        store, pool, workspaces, events, retention_s=tasks.retention_s, sweep_s=tasks.sweep_s
    )
    return TaskService(pool, _classifier(tasks, llm), tasks.agent_types, workspaces, erasure)


def _drafts(redis_client: aioredis.Redis | None) -> Drafts:
    if redis_client is None:
        return LocalDrafts()
    return RedisDrafts(redis_client, prefix="threadline:turn-draft:")


def _turn_leases(settings: Settings, redis_client: aioredis.Redis | None) -> TurnLeases:
    if redis_client is None:
        return TurnLeases(LocalLeases())
    ttl_s = settings.executor.turn_lease_ttl_s
    return TurnLeases(RedisLeases(redis_client, ttl_s=ttl_s, prefix="threadline:turn:"))


def _turn_limits(settings: Settings) -> TurnLimits:
    executor = settings.executor
    return TurnLimits(
        context_budget_tokens=executor.context_budget_tokens,
        max_output_tokens=executor.max_output_tokens,
        max_iterations=executor.max_iterations,
        compact_request_threshold=executor.compact_request_threshold,
        # A compaction waits for its job: the job's own timeout, plus a lease wait.
        compact_timeout_s=settings.memory.job_timeout_s + 2 * settings.memory.lease_ttl_s,
    )


def _workspace_root(settings: Settings) -> Path:
    configured = settings.executor.workspace_root
    return Path(configured) if configured else settings.data_dir / "workspaces"


def _toolboxes(settings: Settings) -> ToolBoxes:
    """The tools over a workspace directory, under the configured permission rules."""
    executor = settings.executor
    rules = [PermissionRule(rule.path, rule.permission) for rule in executor.tool_rules]

    def toolbox(directory: str) -> ToolBox:
        workspace = Workspace(Path(directory), rules, max_file_bytes=executor.max_file_bytes)
        return ToolBox(
            workspace,
            max_output_chars=executor.max_tool_output_chars,
            max_message_chars=settings.session.max_message_chars,
        )

    return toolbox


def _prices(executor: ExecutorSettings) -> dict[str, tuple[float, float]]:
    return {m: (p.input_per_1k, p.output_per_1k) for m, p in executor.prices.items()}


def _classifier(tasks: TaskSettings, llm: LlmClient) -> Classifier:
    agent_types = [
        AgentType(name, s.description, s.runner) for name, s in tasks.agent_types.items()
    ]
    return Classifier(
        llm, agent_types, default=tasks.default_agent_type, model=tasks.classifier_model
    )


async def open_task_store(settings: Settings) -> tuple[TaskStore, aioredis.Redis | None]:
    """The configured task store, open; and its Redis client, if any, for the caller to close."""
    store_url = settings.store_url("tasks")
    if isinstance(store_url, RedisUrl):
        client = connect_redis(store_url.url)
        return RedisTaskStore(client), client
    if isinstance(store_url, PostgresUrl):
        postgres = PostgresTaskStore(store_url.url, max_connections=store_url.pool_size)
        await postgres.open()
        return postgres, None
    store_url.path.parent.mkdir(parents=True, exist_ok=True)
    store = SqliteTaskStore(store_url.path)
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
