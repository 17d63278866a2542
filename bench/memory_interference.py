"""Turn latency with and without memory consolidation running beside the turns.

    python -m bench.memory_interference [--sessions 32] [--busy-sessions 48]
        [--turns 10] [--rounds 10] [--workers 2] [--duty-cycle 0.1] [--token-ms 0]

As deployed: the fake model server and each of the five services run in their
own process (`threadline serve <service>`); this process is the client. Each
round measures, one after the other (the order alternates by round),
`--sessions` concurrent conversations
doing `--turns` turns each (16 tokens an answer), once quiet and once while
consolidations run back to back on other sessions (400 messages each,
summarised in chunks, 64 tokens a summary; `--busy-sessions` of them ready per
round), as many at once as memory.workers, each asked for when the last one
finished so that none is left to run into the next quiet phase.
`--token-ms` paces the fake model server's tokens (0: as fast as it can write,
which makes every service CPU-bound on this machine). Prints p50/p99 per
phase, the ratio of the p99s, and the CPU each process used in each phase.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import yaml

from bench.processes import cpu_seconds, free_port, process, wait_grpc, wait_http
from threadline.client import GatewayClient
from threadline.config import SERVICE_NAMES, MemorySettings, hash_api_key
from threadline.peers import MemoryClient, SessionClient
from threadline.v1 import common_pb2, session_pb2

KEY = "bench-key"
TENANT = "bench"
CHAT_MODEL = "fake-model"
SUMMARY_MODEL = "summarizer"


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
        head = (await sessions.get(TENANT, created.id)).session.head
        messages = []
        for i in range(20):
            messages.append(common_pb2.Message(role=common_pb2.ROLE_USER, content=f"q{i} " * 40))
            messages.append(
                common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, content=f"a{i} " * 40)
            )
        await sessions.append(TENANT, created.id, head, messages)
    return created.id


async def consolidate_until(
    memory: MemoryClient, pool: list[str], stop: asyncio.Event, in_flight: int, done: list[int]
) -> bool:
    """Keep `in_flight` consolidations going (one per memory worker) until `stop`.

    Each is asked for when the last finished, so no backlog is left queued in
    memory to run into the next quiet phase. False if the pool ran out first.
    """
    sessions = iter(pool)

    async def one_after_another() -> bool:
        while not stop.is_set():
            session_id = next(sessions, None)
            if session_id is None:
                return False
            await memory.consolidate(TENANT, session_id)
            done[0] += 1
        return True

    return all(await asyncio.gather(*(one_after_another() for _ in range(in_flight))))


def config(
    data_dir: Path, fake_url: str, ports: Mapping[str, int], workers: int, duty_cycle: float
) -> dict[str, object]:
    return {
        "data_dir": str(data_dir),
        "log_level": "error",
        "addresses": {name: f"127.0.0.1:{port}" for name, port in ports.items()},
        "gateway": {"api_keys": [{"sha256": hash_api_key(KEY), "tenant": TENANT}]},
        "llm": {
            "upstream": {"base_url": fake_url, "models": [CHAT_MODEL, SUMMARY_MODEL]},
            "default_route": "",
        },
        # Only the consolidations this benchmark asks for.
        "memory": {
            "model": SUMMARY_MODEL,
            "consolidate_fraction": 0,
            "idle_consolidate_s": 0,
            "extract_threshold": 0,
            "compact_threshold": 0,
            "workers": workers,
            "duty_cycle": duty_cycle,
        },
    }


class CpuMeter:
    """CPU seconds each child used during a phase."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.totals: dict[str, dict[str, float]] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        before = {n: cpu_seconds(p) for n, p in self.pids.items()}
        yield
        spent = self.totals.setdefault(name, dict.fromkeys(self.pids, 0.0))
        for n, p in self.pids.items():
            spent[n] += cpu_seconds(p) - before[n]


async def main(
    n_sessions: int,
    busy_sessions: int,
    turns: int,
    rounds: int,
    workers: int,
    duty_cycle: float,
    token_ms: float,
) -> None:
    ports: dict[str, int] = {name: free_port() for name in SERVICE_NAMES}
    fake_port = free_port()
    fake_url = f"http://127.0.0.1:{fake_port}/v1"
    fake = (
        sys.executable,
        "-m",
        "threadline.testing.fake_upstream",
        "--port",
        str(fake_port),
        "--tokens",
        "16",
        "--model",
        CHAT_MODEL,
        "--model",
        SUMMARY_MODEL,
        "--model-tokens",
        f"{SUMMARY_MODEL}=64",
        "--token-delay",
        str(token_ms / 1000),
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("THREADLINE_")}
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "threadline.yaml"
        config_path.write_text(
            yaml.safe_dump(config(Path(tmp) / "data", fake_url, ports, workers, duty_cycle))
        )
        pids: dict[str, int] = {}
        async with contextlib.AsyncExitStack() as children:
            pids["model server"] = await children.enter_async_context(process(*fake))
            await wait_http(f"{fake_url}/models")
            for name in SERVICE_NAMES:
                argv = (sys.executable, "-m", "threadline.cli", "serve", name)
                pids[name] = await children.enter_async_context(
                    process(*argv, "--config", str(config_path), env=env)
                )
            for port in ports.values():
                await wait_grpc(f"127.0.0.1:{port}")
            gateway = f"127.0.0.1:{ports['gateway']}"
            sessions = SessionClient(f"127.0.0.1:{ports['session']}")
            memory = MemoryClient(f"127.0.0.1:{ports['memory']}")
            # Enough long sessions that consolidation never runs dry while measured.
            busy = [
                [await long_session(sessions, 200) for _ in range(busy_sessions)]
                for _ in range(rounds)
            ]
            await sessions.close()
            await conversations(gateway, 4, 2)  # warm-up
            meter = CpuMeter(pids)
            quiet: list[float] = []
            loaded: list[float] = []
            #: p99 beside / p99 alone of each round: the two phases of a round share
            #: the machine's conditions, so their spread shows the noise.
            paired: list[float] = []
            consolidations = [0]

            async def alone() -> None:
                with meter.phase("alone"):
                    quiet.extend(await conversations(gateway, n_sessions, turns))

            async def beside(pool: list[str]) -> None:
                stop = asyncio.Event()
                background = asyncio.create_task(
                    consolidate_until(memory, pool, stop, workers, consolidations)
                )
                await asyncio.sleep(0.5)  # consolidations under way
                with meter.phase("beside"):
                    loaded.extend(await conversations(gateway, n_sessions, turns))
                stop.set()
                # The jobs in flight finish before the next quiet phase starts.
                if not await background:
                    print("warning: consolidation ran dry before the turns ended")

            for index, pool in enumerate(busy):
                before = len(quiet), len(loaded)
                # Alternate which phase goes first: the stores grow as the run goes on,
                # and a fixed order would make the second phase look slower.
                if index % 2 == 0:
                    await alone()
                    await beside(pool)
                else:
                    await beside(pool)
                    await alone()
                paired.append(pct(loaded[before[1] :], 0.99) / pct(quiet[before[0] :], 0.99))
            await memory.close()
    pace = f"{token_ms:g} ms a token" if token_ms else "unpaced"
    print(
        f"{n_sessions} concurrent sessions x {turns} turns of 16 tokens, {rounds} rounds, "
        f"{workers} memory workers at duty cycle {duty_cycle:g}, model server {pace}; "
        "one process per service"
    )
    print(f"{'':36}{'p50 ms':>10}{'p99 ms':>10}")
    print(f"{'turns alone':36}{statistics.median(quiet):10.1f}{pct(quiet, 0.99):10.1f}")
    print(
        f"{'turns beside consolidation':36}{statistics.median(loaded):10.1f}"
        f"{pct(loaded, 0.99):10.1f}"
    )
    print(f"consolidations finished meanwhile: {consolidations[0]}")
    print("CPU seconds per process:", end="")
    for phase, spent in meter.totals.items():
        print(f"\n  {phase:>7}: " + ", ".join(f"{n} {s:.1f}" for n, s in spent.items()), end="")
    print()
    print(
        "p99 ratio round by round: "
        + " ".join(f"{r:.2f}" for r in paired)
        + f" (median {statistics.median(paired):.2f}x)"
    )
    print(
        f"ratio p50: {statistics.median(loaded) / statistics.median(quiet):.2f}x, "
        f"p99: {pct(loaded, 0.99) / pct(quiet, 0.99):.2f}x (target p99 <= 1.10x)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=32)
    parser.add_argument(
        "--busy-sessions", type=int, default=48, help="sessions ready to consolidate per round"
    )
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2, help="memory.workers")
    parser.add_argument(
        "--duty-cycle",
        type=float,
        default=MemorySettings().duty_cycle,
        help="memory.duty_cycle (default: the setting's default)",
    )
    parser.add_argument("--token-ms", type=float, default=0.0, help="model server pacing")
    args = parser.parse_args()
    asyncio.run(
        main(
            args.sessions,
            args.busy_sessions,
            args.turns,
            args.rounds,
            args.workers,
            args.duty_cycle,
            args.token_ms,
        )
    )
