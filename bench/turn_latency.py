"""One turn's latency through all five services against the fake upstream.

    python -m bench.turn_latency [--turns 50] [--tokens 16]

Prints, side by side in one run, the upstream alone (direct httpx stream) and a
full turn through gateway → executor → session/memory/llm_proxy, and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from threadline.client import GatewayClient
from threadline.config import hash_api_key, load_settings
from threadline.logs import configure_logging
from threadline.stack import start_stack
from threadline.testing.fake_upstream import FakeUpstream, Script

KEY = "bench-key"


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


async def direct(base_url: str, turns: int) -> list[float]:
    times = []
    async with httpx.AsyncClient(base_url=base_url) as client:
        for _ in range(turns):
            started = time.perf_counter()
            body = {
                "model": "fake-model",
                "stream": True,
                "messages": [{"role": "user", "content": "hi"}],
            }
            async with client.stream("POST", "/chat/completions", json=body) as response:
                async for _line in response.aiter_lines():
                    pass
            times.append((time.perf_counter() - started) * 1000)
    return times


async def through_stack(gateway: str, turns: int) -> list[float]:
    times = []
    async with GatewayClient(gateway, api_key=KEY) as client:
        session = await client.create_session()
        for i in range(turns):
            started = time.perf_counter()
            async for _event in client.converse(session.id, f"turn {i}"):
                pass
            times.append((time.perf_counter() - started) * 1000)
    return times


async def main(turns: int, tokens: int) -> None:
    configure_logging("error")
    async with FakeUpstream(models=("fake-model",), default=Script(tokens=tokens)) as fake:
        with tempfile.TemporaryDirectory() as data_dir:
            settings = load_settings(
                environ={},
                overrides={
                    "data_dir": str(Path(data_dir)),
                    "log_level": "error",
                    "gateway": {"api_keys": [{"sha256": hash_api_key(KEY), "tenant": "bench"}]},
                    "llm": {"upstream": {"base_url": fake.base_url, "model": "fake-model"}},
                },
            )
            stack = await start_stack(settings, ephemeral_ports=True)
            try:
                await through_stack(stack.address("gateway"), 3)  # warm-up
                base = await direct(fake.base_url, turns)
                full = await through_stack(stack.address("gateway"), turns)
            finally:
                await stack.stop(1)
    print(f"{turns} turns of {tokens} tokens, sequential")
    print(f"{'':24}{'p50 ms':>10}{'p99 ms':>10}")
    print(f"{'upstream direct':24}{statistics.median(base):10.2f}{pct(base, 0.99):10.2f}")
    print(f"{'turn through threadline':24}{statistics.median(full):10.2f}{pct(full, 0.99):10.2f}")
    print(f"ratio p50: {statistics.median(full) / statistics.median(base):.1f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    asyncio.run(main(args.turns, args.tokens))
