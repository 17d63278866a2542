"""Turn latency with and without memory consolidation running beside the turns.

    python -m bench.memory_interference [--sessions 32] [--turns 10] [--rounds 2]

All five services and the fake upstream in this process. Each round measures,
one after the other, `--sessions` concurrent conversations doing `--turns`
turns each, once quiet and once while consolidations run back to back on as
many other sessions (each with 400 messages to summarise, in chunks, the
summariser streaming 64 tokens a chunk), as many at once as memory.workers.
Prints p50/p99 per phase and the ratio of the p99s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

from threadline.client import GatewayClient
from threadline.config import hash_api_key, load_settings
from threadline.logs import configure_logging
from threadline.peers import MemoryClient, SessionClient
from threadline.stack import Stack, start_stack
from threadline.testing.fake_upstream import FakeUpstream, Script
from threadline.v1 import common_pb2, session_pb2

KEY = "bench-key"
TENANT = "bench"


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


async def conversations(gateway: str, sessions: int, turns: int) -> list[float]:
    async def one(client: GatewayClient) -> list[float]:
        session = await client.create_session()
        times = []
        for i in range(turns):
            started = time.perf_counter()
            async for _event in client.converse(session.id, f"turn {i}: tell me more"):
                pass
            times.append((time.perf_counter() - started) * 1000)
        return times

    async with GatewayClient(gateway, api_key=KEY) as client:
        results = await asyncio.gather(*(one(client) for _ in range(sessions)))
    return [t for r in results for t in r]


async def long_session(sessions: SessionClient, exchanges: int) -> str:
    created = await sessions.create(session_pb2.SessionsCreateRequest(tenant=TENANT))
    for _ in range(exchanges // 20):
        await add_exchanges(sessions, created.id, 20)
    return created.id


async def add_exchanges(sessions: SessionClient, session_id: str, n: int) -> None:
    head = (await sessions.get(TENANT, session_id)).session.head
    messages = []
    for i in range(n):
        messages.append(common_pb2.Message(role=common_pb2.ROLE_USER, content=f"q{i} " * 40))
        messages.append(common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, content=f"a{i} " * 40))
    await sessions.append(TENANT, session_id, head, messages)


async def consolidate_all(stack: Stack, session_ids: list[str], done: list[int]) -> None:
    """Ask for every session's consolidation at once: memory's workers take them in turn."""
    memory = MemoryClient(stack.address("memory"))

    async def one(session_id: str) -> None:
        await memory.consolidate(TENANT, session_id)
        done[0] += 1

    try:
        await asyncio.gather(*(one(s) for s in session_ids))
    finally:
        await memory.close()


async def main(n_sessions: int, turns: int, rounds: int, workers: int) -> None:
    configure_logging("error")
    async with FakeUpstream(models=("fake-model", "summarizer"), default=Script(tokens=16)) as fake:
        fake.route("summarizer", Script(tokens=64))
        with tempfile.TemporaryDirectory() as data_dir:
            settings = load_settings(
                environ={},
                overrides={
                    "data_dir": str(Path(data_dir)),
                    "log_level": "error",
                    "gateway": {"api_keys": [{"sha256": hash_api_key(KEY), "tenant": TENANT}]},
                    "llm": {
                        "upstream": {
                            "base_url": fake.base_url,
                            "models": ["fake-model", "summarizer"],
                        },
                        "default_route": "",
                    },
                    # Only the consolidations this benchmark asks for.
                    "memory": {
                        "model": "summarizer",
                        "consolidate_fraction": 0,
                        "idle_consolidate_s": 0,
                        "extract_threshold": 0,
                        "compact_threshold": 0,
                        "workers": workers,
                    },
                },
            )
            stack = await start_stack(settings, ephemeral_ports=True)
            try:
                gateway = stack.address("gateway")
                sessions = SessionClient(stack.address("session"))
                # Enough long sessions that consolidation never runs dry while measured.
                busy = [
                    [await long_session(sessions, 200) for _ in range(n_sessions)]
                    for _ in range(rounds)
                ]
                await sessions.close()
                await conversations(gateway, 4, 2)  # warm-up
                quiet: list[float] = []
                loaded: list[float] = []
                consolidations = [0]
                for round_sessions in busy:
                    quiet += await conversations(gateway, n_sessions, turns)
                    background = asyncio.create_task(
                        consolidate_all(stack, round_sessions, consolidations)
                    )
                    await asyncio.sleep(0.5)  # consolidations under way
                    loaded += await conversations(gateway, n_sessions, turns)
                    still_running = not background.done()
                    background.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await background
                    if not still_running:
                        print("warning: consolidation ran dry before the turns ended")
            finally:
                await stack.stop(1)
    print(
        f"{n_sessions} concurrent sessions x {turns} turns of 16 tokens, {rounds} rounds, "
        f"{workers} memory workers"
    )
    print(f"{'':36}{'p50 ms':>10}{'p99 ms':>10}")
    print(f"{'turns alone':36}{statistics.median(quiet):10.1f}{pct(quiet, 0.99):10.1f}")
    print(
        f"{'turns beside consolidation':36}{statistics.median(loaded):10.1f}"
        f"{pct(loaded, 0.99):10.1f}"
    )
    print(f"consolidations finished meanwhile: {consolidations[0]}")
    print(
        f"ratio p50: {statistics.median(loaded) / statistics.median(quiet):.2f}x, "
        f"p99: {pct(loaded, 0.99) / pct(quiet, 0.99):.2f}x (target p99 <= 1.10x)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=32)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="memory.workers")
    args = parser.parse_args()
    asyncio.run(main(args.sessions, args.turns, args.rounds, args.workers))
