"""Turns per second with one and with two replicas of session and executor.

    python -m bench.replica_throughput [--conversations 16] [--seconds 15] [--rounds 2]
        [--tokens 8] [--postgres-url postgresql://postgres@127.0.0.1:5432/postgres]

As deployed: every service in its own `threadline serve` process, a fake model
server answering `--tokens` tokens at once, a `redis-server` of this run's own
(turn leases, events) and the session, memory and task stores on PostgreSQL (a
database per stack, created and dropped by this run). Two stacks run side by
side: one with one replica of each service, one with two replicas of session
and executor (each replica on its own port, THREADLINE_LISTEN_PORT; callers
name both, `ipv4:127.0.0.1:P1,127.0.0.1:P2`, and round-robin over them). The
load windows alternate between the stacks (1, 2, 2, 1, ...), each with fresh
sessions, so drift on a shared machine hits both alike; the idle stack only
waits.

Each window drives `--conversations` conversations through the gateway without
pause for `--seconds`. Printed: turns/s of each stack and their ratio, and the
CPU each process used in the windows (per turn and as a share of the
replicas), which shows whether both replicas took calls. Memory's background
jobs are off (its Recall still runs on every turn): the figure is the turn path.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import yaml

from bench.processes import (
    busy_ticks,
    cpu_seconds,
    free_port,
    postgres_database,
    process,
    wait_grpc,
    wait_http,
)
from tests.redis_server import start_redis, stop_redis
from threadline import errors
from threadline.client import GatewayClient
from threadline.config import SERVICE_NAMES, ServiceName, hash_api_key
from threadline.stack import START_ORDER
from threadline.v1 import common_pb2

KEY = "bench-key"
MODEL = "bench-model"
#: The services that run as several replicas in the second stack.
REPLICATED = ("session", "executor")


@dataclass
class Stack:
    """One deployment: its processes by label (e.g. `session-2`), its gateway, its database."""

    replicas: int
    gateway: str
    database: str
    pids: dict[str, int] = field(default_factory=dict)


@dataclass
class Window:
    turns: int
    failures: list[str]
    seconds: float
    cpu: dict[str, float]  # process label -> CPU seconds in the window
    busy_cores: float = 0.0  # the whole machine's, every process on it


def _target(ports: list[int]) -> str:
    if len(ports) == 1:
        return f"127.0.0.1:{ports[0]}"
    return "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in ports)


def _config(
    data: Path,
    fake_url: str,
    redis_url: str,
    database: str,
    ports: dict[ServiceName, list[int]],
) -> dict[str, object]:
    return {
        "data_dir": str(data),
        "redis_url": redis_url,
        "log_level": "warning",
        "addresses": {name: _target(ports[name]) for name in SERVICE_NAMES},
        "gateway": {"api_keys": [{"sha256": hash_api_key(KEY), "tenant": "bench"}]},
        "llm": {"upstream": {"base_url": fake_url, "model": MODEL}},
        "session": {"database": database},
        # Background work off, so a window measures turns only.
        "memory": {
            "database": database,
            "consolidate_fraction": 0,
            "idle_consolidate_s": 0,
            "extract_threshold": 0,
            "compact_threshold": 0,
        },
        "executor": {"tasks": {"database": database}},
    }


async def _start_stack(
    children: AsyncExitStack,
    tmp: Path,
    replicas: int,
    fake_url: str,
    redis_url: str,
    database: str,
) -> Stack:
    ports: dict[ServiceName, list[int]] = {
        name: [free_port() for _ in range(replicas if name in REPLICATED else 1)]
        for name in SERVICE_NAMES
    }
    config = tmp / f"stack-{replicas}.yaml"
    config.write_text(
        yaml.safe_dump(_config(tmp / f"data-{replicas}", fake_url, redis_url, database, ports))
    )
    stack = Stack(replicas, f"127.0.0.1:{ports['gateway'][0]}", database)
    for name in START_ORDER:
        for index, port in enumerate(ports[name], start=1):
            env = {**os.environ, "THREADLINE_LISTEN_PORT": str(port)}
            argv = (sys.executable, "-m", "threadline.cli", "serve", name, "--config", str(config))
            pid = await children.enter_async_context(process(*argv, env=env))
            label = f"{name}-{index}" if len(ports[name]) > 1 else name
            stack.pids[label] = pid
        for port in ports[name]:
            await wait_grpc(f"127.0.0.1:{port}")
    return stack


async def _postgres_backends(admin_url: str, database: str) -> list[int]:
    """The pids of the PostgreSQL backends serving `database` (a URL)."""
    conn = await asyncpg.connect(admin_url)
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1", database.rsplit("/", 1)[1]
        )
    finally:
        await conn.close()
    return [row["pid"] for row in rows]


def _cpu(pid: int) -> float:
    try:
        return cpu_seconds(pid)
    except OSError:  # gone (a pooled PostgreSQL connection closed)
        return 0.0


async def _conversation(
    client: GatewayClient, deadline: float, counted_from: float, seen: Window
) -> None:
    session = await client.create_session()
    i = 0
    while time.monotonic() < deadline:
        try:
            done = None
            async for event in client.converse(session.id, f"turn {i}: go on"):
                if event.WhichOneof("event") == "done":
                    done = event.done
            if done is None or done.finish_reason != common_pb2.FINISH_REASON_STOP:
                raise errors.Internal(f"turn ended without a complete answer: {done}")
            if counted_from <= time.monotonic() <= deadline:
                seen.turns += 1
        except errors.ThreadlineError as exc:
            seen.failures.append(f"{exc.code}: {exc.message[:120]}")
        i += 1


async def _window(
    stack: Stack,
    client: GatewayClient,
    conversations: int,
    seconds: float,
    others: dict[str, int],
    admin_url: str,
) -> Window:
    """`conversations` fresh conversations on the stack for a warm-up second and
    `seconds` more; turns completed and CPU used in those `seconds`."""
    began = time.monotonic()
    counted_from, deadline = began + 1.0, began + 1.0 + seconds
    seen = Window(0, [], seconds, {})
    load = asyncio.gather(
        *(_conversation(client, deadline, counted_from, seen) for _ in range(conversations))
    )
    await asyncio.sleep(counted_from - time.monotonic())
    pids = {**stack.pids, **others}
    before_pg = {pid: _cpu(pid) for pid in await _postgres_backends(admin_url, stack.database)}
    before = {label: _cpu(pid) for label, pid in pids.items()}
    busy, ticks = busy_ticks()
    await asyncio.sleep(deadline - time.monotonic())
    busy_after, ticks_after = busy_ticks()
    seen.cpu = {label: _cpu(pid) - before[label] for label, pid in pids.items()}
    # A pooled connection opened meanwhile counts from its start.
    backends = await _postgres_backends(admin_url, stack.database)
    seen.cpu["postgres (backends)"] = sum(_cpu(pid) - before_pg.get(pid, 0.0) for pid in backends)
    seen.busy_cores = (os.cpu_count() or 1) * (busy_after - busy) / (ticks_after - ticks)
    await load
    return seen


def _report(stacks: list[Stack], windows: dict[int, list[Window]], conversations: int) -> None:
    cores = os.cpu_count()
    print(
        f"{conversations} conversations without pause through the gateway; "
        f"{len(windows[1])} windows of {windows[1][0].seconds:.0f} s per stack, alternating"
    )
    print(
        f"NOTE: this machine has {cores} cores shared by every process below (and the "
        "bench client): two replicas cannot double throughput here; the ratio shows the "
        "cost of spreading calls over replicas, the CPU shares that both replicas take calls."
    )
    rates = {}
    for stack in stacks:
        runs = windows[stack.replicas]
        per_window = [w.turns / w.seconds for w in runs]
        rates[stack.replicas] = statistics.median(per_window)
        failures = [f for w in runs for f in w.failures]
        print(
            f"{stack.replicas} replica{'s' if stack.replicas > 1 else ' '} of session+executor: "
            f"{rates[stack.replicas]:7.1f} turns/s (windows: "
            f"{', '.join(f'{r:.1f}' for r in per_window)}), failed turns {len(failures)}"
        )
        for failure in sorted(set(failures)):
            print(f"    failure x{failures.count(failure)}: {failure}")
    print(f"ratio 2 replicas / 1 replica: {rates[2] / rates[1]:.2f}x")
    for stack in stacks:
        runs = windows[stack.replicas]
        seconds = sum(w.seconds for w in runs)
        turns = sum(w.turns for w in runs)
        cpu = {label: float(sum(w.cpu[label] for w in runs)) for label in runs[0].cpu}
        print(f"CPU, stack with {stack.replicas} replica(s), {turns} turns in {seconds:.0f} s:")
        print(f"    {'process':22}{'cores':>7}{'ms/turn':>9}{'share':>8}")
        for label, used in cpu.items():
            service = label.rsplit("-", 1)[0]
            group = [u for name, u in cpu.items() if name.rsplit("-", 1)[0] == service]
            together = sum(group)
            share = f"{used / together:7.0%}" if len(group) > 1 and together else ""
            print(f"    {label:22}{used / seconds:7.2f}{used * 1000 / max(turns, 1):9.2f} {share}")
        print(
            f"    {'all':22}{sum(cpu.values()) / seconds:7.2f}"
            f"{sum(cpu.values()) * 1000 / max(turns, 1):9.2f}"
        )
        busy = statistics.median(w.busy_cores for w in runs)
        print(f"    machine busy (every process on it): {busy:.2f} of {os.cpu_count()} cores")


async def main(
    conversations: int, seconds: float, rounds: int, tokens: int, admin_url: str
) -> None:
    fake_port = free_port()
    fake_url = f"http://127.0.0.1:{fake_port}/v1"
    fake = (
        *(sys.executable, "-m", "threadline.testing.fake_upstream", "--port", str(fake_port)),
        *("--model", MODEL, "--tokens", str(tokens)),
    )
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        redis, redis_url = start_redis(tmp, free_port())
        try:
            async with AsyncExitStack() as children:
                shared = {"bench client": os.getpid(), "redis": redis.pid}
                shared["fake model"] = await children.enter_async_context(process(*fake))
                await wait_http(f"{fake_url}/models")
                stacks = []
                for replicas in (1, 2):
                    database = await children.enter_async_context(postgres_database(admin_url))
                    # A Redis database per stack: its events and leases stay apart.
                    stack_redis = redis_url.rsplit("/", 1)[0] + f"/{replicas}"
                    stacks.append(
                        await _start_stack(children, tmp, replicas, fake_url, stack_redis, database)
                    )
                clients = {
                    s.replicas: await children.enter_async_context(
                        GatewayClient(s.gateway, api_key=KEY)
                    )
                    for s in stacks
                }
                windows: dict[int, list[Window]] = {1: [], 2: []}
                for round_ in range(rounds):
                    for stack in stacks if round_ % 2 == 0 else stacks[::-1]:
                        windows[stack.replicas].append(
                            await _window(
                                stack,
                                clients[stack.replicas],
                                conversations,
                                seconds,
                                shared,
                                admin_url,
                            )
                        )
        finally:
            stop_redis(redis)
    _report(stacks, windows, conversations)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=15.0, help="per window")
    parser.add_argument("--rounds", type=int, default=2, help="windows per stack")
    parser.add_argument("--tokens", type=int, default=8, help="tokens per fake answer")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="admin URL: the run creates and drops its databases there",
    )
    args = parser.parse_args()
    asyncio.run(main(args.conversations, args.seconds, args.rounds, args.tokens, args.postgres_url))
