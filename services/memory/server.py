"""Wiring for memory: store, session and llm_proxy peers, job queue and leases, servicer."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass

import grpc.aio
import redis.asyncio as aioredis

from services.memory import job_metrics
from services.memory.compaction import Compactor
from services.memory.consolidation import Consolidator, SummaryModel
from services.memory.erasure import memory_erasures
from services.memory.extraction import Extractor
from services.memory.jobs import JobSettings, MemoryJobs
from services.memory.pacing import Pacer, TurnActivity
from services.memory.postgres_store import PostgresMemoryStore
from services.memory.queue import JobQueue, LocalJobQueue, RedisJobQueue
from services.memory.servicer import MemoryServicer
from services.memory.store import MemoryStore, SqliteMemoryStore
from services.memory.triggers import Thresholds
from threadline.config import MemorySettings, ServiceName, Settings
from threadline.events import EventBus, EventPublisher
from threadline.leases import Leases, LocalLeases, RedisLeases
from threadline.peers import LlmClient, SessionClient
from threadline.redis_client import connect_redis
from threadline.server import ServiceHost, build_server
from threadline.store_urls import PostgresUrl, SqliteUrl, StoreUrl
from threadline.telemetry.stores import backend_of, instrumented
from threadline.transport import channel_security, listener_security
from threadline.v1 import memory_pb2, memory_pb2_grpc

SERVICE: ServiceName = "memory"


async def create(settings: Settings, bus: EventBus, *, address: str | None = None) -> ServiceHost:
    config = settings.memory
    opened = await open_store(settings.store_url("memory"))
    store = instrumented(opened, "memory", backend_of(opened))
    job_metrics.install()
    peers = channel_security(settings)
    sessions = SessionClient(settings.addresses.session, peers)
    llm = LlmClient(settings.addresses.llm_proxy, peers)
    worker = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
    shared = _coordination(settings, worker)
    # Consolidation and extraction give way to turns; compaction (a turn may wait) does not.
    turns = TurnActivity()
    consolidator, extractor, compactor = _job_domain(
        config, store, sessions, llm, Pacer(config.duty_cycle, busy=turns.busy)
    )
    jobs = MemoryJobs(
        store=store,
        sessions=sessions,
        queue=shared.queue,
        compactions=shared.compactions,
        leases=shared.leases,
        events=EventPublisher(bus, SERVICE),
        consolidator=consolidator,
        extractor=extractor,
        compactor=compactor,
        settings=_job_settings(config),
        worker=worker,
    )
    register = _registrar(_servicer(config, jobs, store, turns, sessions))
    host, _ = build_server(
        SERVICE,
        register,
        address=address or settings.bind_address(SERVICE),
        security=listener_security(settings, SERVICE),
    )
    # Closers run last-registered first: the workers stop before what they use closes.
    if shared.redis is not None:
        host.on_stop(shared.redis.aclose)
    host.on_stop(llm.close)
    host.on_stop(sessions.close)
    host.on_stop(store.close)
    host.on_stop(jobs.stop)
    erasures = memory_erasures(store, sessions, config.erasure_poll_s)
    host.on_stop(erasures.stop)
    await jobs.start()
    erasures.start()
    return host


async def open_store(url: StoreUrl) -> SqliteMemoryStore | PostgresMemoryStore:
    """The memory store `memory.database` names, open; config allows no other kind."""
    if isinstance(url, PostgresUrl):
        store: SqliteMemoryStore | PostgresMemoryStore = PostgresMemoryStore(
            url.url, max_connections=url.pool_size
        )
    elif isinstance(url, SqliteUrl):
        store = SqliteMemoryStore(url.path)
    else:
        raise ValueError(f"memory has no {url.kind} backend")
    await store.open()
    return store


@dataclass(frozen=True)
class _Coordination:
    """How replicas share the work: job queues and session leases, in Redis when configured."""

    queue: JobQueue
    compactions: JobQueue
    leases: Leases
    #: The connection the queues and leases use, closed at shutdown; None in-process.
    redis: aioredis.Redis | None = None


def _coordination(settings: Settings, worker: str) -> _Coordination:
    if not settings.redis_url:
        return _Coordination(LocalJobQueue(), LocalJobQueue(), LocalLeases())
    config = settings.memory
    redis_client = connect_redis(settings.redis_url)
    return _Coordination(
        queue=RedisJobQueue(redis_client, consumer=worker, claim_idle_s=config.claim_idle_s),
        compactions=RedisJobQueue(
            redis_client,
            consumer=worker,
            claim_idle_s=config.claim_idle_s,
            stream="threadline:memory:compactions",
        ),
        leases=RedisLeases(
            redis_client, ttl_s=config.lease_ttl_s, prefix="threadline:memory:lease:"
        ),
        redis=redis_client,
    )


def _job_domain(
    config: MemorySettings,
    store: MemoryStore,
    sessions: SessionClient,
    llm: LlmClient,
    pacer: Pacer,
) -> tuple[Consolidator, Extractor, Compactor]:
    """What the jobs do: consolidation and extraction (paced), and compaction."""
    summaries = SummaryModel(
        llm=llm,
        model=config.model,
        max_summary_tokens=config.max_summary_tokens,
        window_tokens=config.summary_window_tokens,
    )
    consolidator = Consolidator(store, sessions, summaries, config.max_failures, pacer)
    extractor = Extractor(
        store,
        sessions,
        llm,
        config.model,
        max_output_tokens=config.max_summary_tokens * 2,
        window_tokens=config.summary_window_tokens,
        pacer=pacer,
    )
    compactor = Compactor(
        store,
        sessions,
        llm,
        summaries,
        retained_tokens=config.compact_retained_tokens,
        max_failures=config.max_failures,
    )
    return consolidator, extractor, compactor


def _job_settings(config: MemorySettings) -> JobSettings:
    return JobSettings(
        thresholds=Thresholds(
            consolidate_fraction=config.consolidate_fraction,
            extract_threshold=config.extract_threshold,
            compact_threshold=config.compact_threshold,
        ),
        idle_consolidate_s=config.idle_consolidate_s,
        job_timeout_s=config.job_timeout_s,
        workers=config.workers,
        compaction_workers=config.compaction_workers,
        scan_interval_s=config.scan_interval_s,
        lease_ttl_s=config.lease_ttl_s,
        claim_idle_s=config.claim_idle_s,
        failed_job_pause_s=config.failed_job_pause_s,
    )


def _servicer(
    config: MemorySettings,
    jobs: MemoryJobs,
    store: MemoryStore,
    turns: TurnActivity,
    sessions: SessionClient,
) -> MemoryServicer:
    return MemoryServicer(
        jobs,
        store,
        sessions,
        # A waiting caller gets the answer even when the job first waits for a lease
        # and, while turns run, rests between its steps (rests are not in the timeout).
        wait_timeout_s=config.job_timeout_s / config.duty_cycle + 2 * config.lease_ttl_s,
        recall_budget_tokens=config.recall_budget_tokens,
        turns=turns,
    )


def _registrar(servicer: MemoryServicer) -> Callable[[grpc.aio.Server], list[str]]:
    def register(server: grpc.aio.Server) -> list[str]:
        memory_pb2_grpc.add_MemoryServicer_to_server(servicer, server)
        return [memory_pb2.DESCRIPTOR.services_by_name["Memory"].full_name]

    return register
