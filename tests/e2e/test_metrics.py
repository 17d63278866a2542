"""/metrics of each service run as its own process: its per-RPC series after a call,
and only the metric families it owns."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ACME_KEY
from tests.ports import free_ports
from tests.processes import service_env, start_service, wait_healthy
from tests.waiting import eventually
from threadline.client import GatewayClient
from threadline.config import ServiceName
from threadline.stack import START_ORDER
from threadline.testing.fake_upstream import FakeUpstream, Script

pytestmark = pytest.mark.slow

#: A method each service answers during one turn.
CALLED = {
    "gateway": "/threadline.v1.Gateway/Converse",
    "executor": "/threadline.v1.Executor/RunTurn",
    "llm_proxy": "/threadline.v1.LlmProxy/StreamChat",
    "session": "/threadline.v1.Sessions/Append",
    "memory": "/threadline.v1.Memory/Recall",
}
#: Family prefixes only their owner exports (families carry no `_total` suffix here).
OWNED = {
    "threadline_llm_attempts": "llm_proxy",
    "threadline_turns": "executor",
    "threadline_memory_jobs_queued": "memory",
}
STORES = {"session": "session", "memory": "memory", "executor": "tasks"}

Samples = dict[str, list[tuple[dict[str, str], float]]]


async def scrape(client: httpx.AsyncClient, port: int) -> Samples:
    reply = await client.get(f"http://127.0.0.1:{port}/metrics")
    reply.raise_for_status()
    samples: Samples = {}
    for family in text_string_to_metric_families(reply.text):
        samples[family.name] = [(s.labels, s.value) for s in family.samples]
    return samples


def handled_ok(samples: Samples, service: str, method: str) -> float:
    return sum(
        value
        for labels, value in samples.get("threadline_rpc_handled", [])
        if labels == {"service": service, "method": method, "code": "OK"}
    )


async def test_each_service_exports_its_per_rpc_series_and_only_its_families(
    tmp_path: Path, fake_upstream: FakeUpstream, redis_url: str, redis_client: aioredis.Redis
) -> None:
    fake_upstream.default = Script(text="Counted.")
    env = service_env(tmp_path, fake_upstream.base_url, redis_url)
    ports = dict(zip(START_ORDER, free_ports(len(START_ORDER)), strict=True))
    (tmp_path / "logs").mkdir()
    procs = [
        await start_service(
            name, env | {"THREADLINE_METRICS_PORT": str(ports[name])}, tmp_path / "logs"
        )
        for name in START_ORDER
    ]
    try:
        for name in START_ORDER:
            await wait_healthy(env[f"THREADLINE_ADDRESSES__{name.upper()}"])
        async with GatewayClient(env["THREADLINE_ADDRESSES__GATEWAY"], api_key=ACME_KEY) as gw:
            session = await gw.create_session()
            events = [e async for e in gw.converse(session.id, "Count this.")]
        assert events[-1].WhichOneof("event") == "done"

        async with httpx.AsyncClient(timeout=5) as http:
            for name in START_ORDER:

                async def counted(name: ServiceName = name) -> Samples | None:
                    samples = await scrape(http, ports[name])
                    return samples if handled_ok(samples, name, CALLED[name]) >= 1 else None

                samples = await eventually(counted, timeout=10)
                durations = samples["threadline_rpc_handling_seconds"]
                assert any(
                    labels.get("method") == CALLED[name] and labels.get("le") == "+Inf"
                    for labels, _ in durations
                ), name
                for prefix, owner in OWNED.items():
                    exported = any(family.startswith(prefix) for family in samples)
                    assert exported == (owner == name), f"{prefix} on {name}"
                stores = {
                    labels["store"] for labels, _ in samples.get("threadline_store_operations", [])
                }
                assert stores == ({STORES[name]} if name in STORES else set()), name
                if name == "executor":
                    assert [
                        value
                        for labels, value in samples["threadline_turns"]
                        if labels == {"outcome": "completed"}
                    ] == [1.0]
    finally:
        for proc in procs:
            proc.terminate()
        await asyncio.gather(*(proc.wait() for proc in procs))
