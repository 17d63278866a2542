"""Redis restarted under load: what callers and operators see.

    python -m bench.redis_restart [--seconds 60] [--clients 8] [--down 1.0]

As deployed: a fake model server, the five services (`threadline serve`) and a
`redis-server` of this run's own, each in its own process. Clients take turns
without pause; Redis is stopped twice (SIGTERM, then SIGKILL; no persistence, so
it comes back empty) and started again after `--down` seconds. Printed: turns
and failed turns, the slowest turn, acknowledged answers missing from the logs,
how long sessions stayed busy afterwards, and how soon events and memory
consolidations resumed after each restart.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bench.processes import free_port, process, wait_grpc, wait_http
from threadline import errors
from threadline.client import GatewayClient
from threadline.config import SERVICE_NAMES, hash_api_key
from threadline.stack import START_ORDER
from threadline.v1 import common_pb2, memory_pb2

KEY = "bench-key"
MODEL = "bench-model"


@dataclass
class Seen:
    answers: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    failures: list[str] = field(default_factory=list)
    slowest_s: float = 0.0
    events: list[tuple[float, str]] = field(default_factory=list)


def _redis(port: int, directory: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            *("redis-server", "--port", str(port), "--bind", "127.0.0.1"),
            *("--save", "", "--appendonly", "no", "--dir", directory),
        ],
        stdout=subprocess.DEVNULL,
    )


def _config(data: Path, fake_url: str, redis_url: str, ports: dict[str, int]) -> dict[str, object]:
    return {
        "data_dir": str(data),
        "redis_url": redis_url,
        "log_level": "warning",
        "addresses": {name: f"127.0.0.1:{port}" for name, port in ports.items()},
        "gateway": {"api_keys": [{"sha256": hash_api_key(KEY), "tenant": "bench"}]},
        "llm": {"upstream": {"base_url": fake_url, "model": MODEL}},
        "memory": {"consolidate_fraction": 0.02, "scan_interval_s": 2, "claim_idle_s": 10},
    }


async def _turn(client: GatewayClient, session_id: str, text: str) -> str:
    done = None
    async for event in client.converse(session_id, text, max_tokens=16):
        if event.WhichOneof("event") == "done":
            done = event.done
    if done is None or done.finish_reason != common_pb2.FINISH_REASON_STOP:
        raise errors.Internal(f"turn ended without a complete answer: {done}")
    return done.content


async def _converse(
    client: GatewayClient, session_id: str, stop: asyncio.Event, seen: Seen
) -> None:
    while not stop.is_set():
        began = time.monotonic()
        try:
            seen.answers[session_id].append(await _turn(client, session_id, "tell me more"))
        except errors.ThreadlineError as exc:
            seen.failures.append(f"{exc.code}: {exc.message[:120]}")
        seen.slowest_s = max(seen.slowest_s, time.monotonic() - began)


async def _watch(client: GatewayClient, seen: Seen) -> None:
    async for event in client.watch_events():
        seen.events.append((time.monotonic(), event.type))


async def _until_free(client: GatewayClient, session_id: str) -> float:
    """Seconds until the session takes a turn."""
    began = time.monotonic()
    while True:
        try:
            await _turn(client, session_id, "still there?")
            return time.monotonic() - began
        except errors.Aborted:
            await asyncio.sleep(0.1)


def _queued(memory_db: Path) -> int:
    with contextlib.closing(sqlite3.connect(memory_db)) as conn:
        (count,) = conn.execute(
            "SELECT count(*) FROM jobs WHERE state = ?", (memory_pb2.JOB_STATE_QUEUED,)
        ).fetchone()
    return int(count)


async def main(seconds: float, clients: int, down_s: float) -> None:
    ports: dict[str, int] = {name: free_port() for name in SERVICE_NAMES}
    fake_port, redis_port = free_port(), free_port()
    fake_url = f"http://127.0.0.1:{fake_port}/v1"
    fake = (
        *(sys.executable, "-m", "threadline.testing.fake_upstream", "--port", str(fake_port)),
        *("--model", MODEL, "--tokens", "8", "--token-delay", "0.005"),
    )
    seen, back = Seen(), list[float]()
    with tempfile.TemporaryDirectory() as tmp:
        redis = _redis(redis_port, tmp)
        config = Path(tmp) / "threadline.yaml"
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        config.write_text(yaml.safe_dump(_config(Path(tmp) / "data", fake_url, redis_url, ports)))
        try:
            async with contextlib.AsyncExitStack() as children:
                await children.enter_async_context(process(*fake))
                await wait_http(f"{fake_url}/models")
                for name in START_ORDER:
                    argv = (sys.executable, "-m", "threadline.cli", "serve", name)
                    await children.enter_async_context(process(*argv, "--config", str(config)))
                for port in ports.values():
                    await wait_grpc(f"127.0.0.1:{port}")
                client = await children.enter_async_context(
                    GatewayClient(f"127.0.0.1:{ports['gateway']}", api_key=KEY)
                )
                sessions = [(await client.create_session()).id for _ in range(clients)]
                watch = asyncio.create_task(_watch(client, seen))
                stop = asyncio.Event()
                load = [asyncio.create_task(_converse(client, s, stop, seen)) for s in sessions]
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    await asyncio.sleep(seconds / 3)
                    redis.send_signal(sig)
                    await asyncio.to_thread(redis.wait)
                    await asyncio.sleep(down_s)
                    redis = _redis(redis_port, tmp)
                    back.append(time.monotonic())
                await asyncio.sleep(seconds / 3)
                stop.set()
                await asyncio.gather(*load)
                busy = await asyncio.gather(*(_until_free(client, s) for s in sessions))
                lost = 0
                for session_id in sessions:
                    detail = await client.get_session(session_id)
                    stored = [
                        m.content for m in detail.messages if m.role == common_pb2.ROLE_ASSISTANT
                    ]
                    lost += sum(1 for a in seen.answers[session_id] if a not in stored)
                for _ in range(100):
                    if _queued(Path(tmp) / "data" / "memory.db") == 0:
                        break
                    await asyncio.sleep(0.2)
                queued = _queued(Path(tmp) / "data" / "memory.db")
                watch.cancel()
        finally:
            redis.terminate()
            redis.wait()
    _report(seen, back, busy, lost, queued)


def _report(seen: Seen, back: list[float], busy: list[float], lost: int, queued: int) -> None:
    turns = sum(len(a) for a in seen.answers.values())
    print(f"turns answered {turns}, failed {len(seen.failures)}, slowest {seen.slowest_s:.2f} s")
    for failure in sorted(set(seen.failures)):
        print(f"  failure x{seen.failures.count(failure)}: {failure}")
    print(f"acknowledged answers missing from the logs: {lost}")
    print(f"sessions busy after the load: at most {max(busy):.2f} s")
    for name, when in zip(("SIGTERM", "SIGKILL"), back, strict=True):
        events = [at - when for at, _ in seen.events if at > when]
        jobs = [at - when for at, kind in seen.events if at > when and kind.startswith("memory.")]
        print(
            f"after {name}: first event {min(events, default=float('nan')):.2f} s, "
            f"first memory job event {min(jobs, default=float('nan')):.2f} s after Redis was back"
        )
    print(f"memory jobs left QUEUED: {queued}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="load in all")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--down", type=float, default=1.0, help="seconds Redis stays down")
    args = parser.parse_args()
    asyncio.run(main(args.seconds, args.clients, args.down))
