"""What tracing costs a turn: the same stack exporting every span to a collector
(`tracing.otlp_endpoint` set), as by default (nothing exported: spans carry ids for
logs and events but record nothing) and with tracing off (`tracing.enabled=false`),
side by side.

    python -m bench.telemetry_overhead [--turns 40] [--tokens 16] [--sessions 4] [--rounds 3]

Three stacks of five `threadline serve` processes (SQLite, no Redis) share one fake
upstream; windows of `--sessions` concurrent sessions running `--turns` turns each
rotate between them, `--rounds` times, so drift on a shared machine hits all alike.
Metrics are on in all (the per-RPC counters cannot be switched off; they cost a
few counter updates per RPC). Printed: time to first delta and to the answer's
end (p50, p99), CPU of the five processes per turn, and ratios to tracing off.
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
from pathlib import Path

import yaml

from bench.processes import cpu_seconds, free_port, process, wait_grpc, wait_http
from bench.turn_latency import MODEL, pct, stack_config, stack_window
from threadline.config import SERVICE_NAMES, ServiceName
from threadline.stack import START_ORDER
from threadline.testing.otlp_collector import OtlpCollector

#: The paths compared: label -> the `tracing` settings of their stack (the collector's
#: endpoint is filled in at start).
PATHS: dict[str, dict[str, object]] = {
    "exported": {"otlp_endpoint": ""},  # every span recorded and sent to a collector
    "default": {},  # nothing exported: trace ids in logs and events, no span recorded
    "off": {"enabled": False},
}


def _config(data: Path, fake_url: str, ports: dict[ServiceName, int], tracing: object) -> object:
    return {**stack_config(data, fake_url, ports), "tracing": tracing}


async def start_stack(
    children: AsyncExitStack, tmp: Path, fake_url: str, label: str
) -> tuple[str, list[int]]:
    """Five `serve` processes: (the gateway's address, their pids)."""
    ports: dict[ServiceName, int] = {name: free_port() for name in SERVICE_NAMES}
    slug = label.replace(" ", "-")
    config = tmp / f"stack-{slug}.yaml"
    config.write_text(yaml.safe_dump(_config(tmp / slug, fake_url, ports, PATHS[label])))
    pids = []
    for name in START_ORDER:
        env = {**os.environ, "THREADLINE_LISTEN_PORT": str(ports[name])}
        argv = (sys.executable, "-m", "threadline.cli", "serve", name, "--config", str(config))
        pids.append(await children.enter_async_context(process(*argv, env=env)))
        await wait_grpc(f"127.0.0.1:{ports[name]}")
    return f"127.0.0.1:{ports['gateway']}", pids


class Measured:
    """One stack's samples: (ttfd ms, end ms) per turn and CPU seconds used."""

    def __init__(self, label: str, gateway: str, pids: list[int]) -> None:
        self.label, self.gateway, self.pids = label, gateway, pids
        self.samples: list[tuple[float, float]] = []
        self.cpu_s = 0.0

    async def window(self, sessions: int, turns: int) -> None:
        before = sum(cpu_seconds(pid) for pid in self.pids)
        self.samples += await stack_window(self.gateway, sessions, turns)
        self.cpu_s += sum(cpu_seconds(pid) for pid in self.pids) - before

    def row(self) -> list[float]:
        ttfd = [s[0] for s in self.samples]
        end = [s[1] for s in self.samples]
        cpu_ms = self.cpu_s * 1000 / len(self.samples)
        p50 = statistics.median
        return [p50(ttfd), pct(ttfd, 0.99), p50(end), pct(end, 0.99), cpu_ms]


def cells(values: list[float]) -> str:
    return "".join(f"{v:9.2f}" for v in values[:4]) + f"{values[4]:10.2f}"


async def main(turns: int, tokens: int, sessions: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with AsyncExitStack() as children:
            fake_port = free_port()
            fake = (sys.executable, "-m", "threadline.testing.fake_upstream")
            argv = (*fake, "--port", str(fake_port), "--tokens", str(tokens), "--model", MODEL)
            await children.enter_async_context(process(*argv))
            fake_url = f"http://127.0.0.1:{fake_port}/v1"
            await wait_http(fake_url + "/models")
            collector = await children.enter_async_context(OtlpCollector())
            PATHS["exported"]["otlp_endpoint"] = collector.endpoint
            paths = [
                Measured(label, *await start_stack(children, Path(tmp), fake_url, label))
                for label in PATHS
            ]
            for path in paths:
                await stack_window(path.gateway, 2, 3)  # warm-up: connections, caches
            started = time.perf_counter()
            for round_ in range(rounds):
                # Each round starts with another path, so no path always runs first.
                for path in paths[round_ % 3 :] + paths[: round_ % 3]:
                    await path.window(sessions, turns)
            print(
                f"{tokens}-token answers, {sessions} sessions x {turns} turns x {rounds} rounds"
                f" per path ({time.perf_counter() - started:.0f} s); ms"
            )
            print(f"{'path':<16}{'TTFD p50':>9}{'p99':>9}{'end p50':>9}{'p99':>9}{'CPU/turn':>10}")
            rows = {path.label: path.row() for path in paths}
            for label, row in rows.items():
                print(f"{label:<16}{cells(row)}")
            print(f"(the collector received {len(collector.spans)} spans)")
            for label in ("exported", "default"):
                ratios = [a / b for a, b in zip(rows[label], rows["off"], strict=True)]
                print(f"{label + ' / off':<16}{cells(ratios)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=40)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.turns, args.tokens, args.sessions, args.rounds))
