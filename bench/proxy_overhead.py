"""What llm_proxy adds: direct-to-upstream vs through llm_proxy, side by side.

    python -m bench.proxy_overhead [--tokens 256] [--streams 1,16,64] [--rounds 3]
        [--token-ms 0]

The fake upstream and llm_proxy each run as their own process (as deployed);
this process is the client (the direct path reads like a lean consumer: aiohttp,
the HTTP stack llm_proxy reads with, and one JSON decode per event).
For each concurrency level it runs the direct and
the proxied case alternately, `--rounds` times, and reports time to first token
(p50, p99), the TTFT the proxy adds, and relayed tokens per second as a share of
direct, and the proxy's own time per request as it reports it
(`ChatDone.proxy_overhead_ms`: its time not spent waiting on the upstream or the
client). Targets (issue 3): added TTFT p50 <= 2 ms and p99 <= 10 ms at 64
streams; relayed throughput >= 80% of direct. `--token-ms 10` paces the fake
upstream at 100 tokens/s, as a model server streams; target (issue 16): added
TTFT p99 <= 20 ms at 64 paced streams.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp

from bench.processes import free_port, process, wait_grpc, wait_http
from threadline.channels import connect
from threadline.v1 import common_pb2, llm_pb2, llm_pb2_grpc

MODEL = "fake-model"


@dataclass
class Sample:
    ttft_ms: float
    tokens: int
    seconds: float
    #: The proxy's own time for the request, as it reported it (proxied only).
    overhead_ms: float = 0.0


async def direct_once(client: aiohttp.ClientSession, url: str) -> Sample:
    """One answer straight from the upstream, read as a lean consumer would.

    aiohttp (the proxy's own HTTP stack), SSE events split on blank lines and
    each JSON-decoded for its text: the least a caller must do to use the answer,
    so the direct figure is not held back by a heavier client.
    """
    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "go"}]}
    started = time.perf_counter()
    first = 0.0
    tokens = 0
    pending = b""
    async with client.post(url, json=body) as response:
        async for chunk in response.content.iter_any():
            *events, pending = (pending + chunk).split(b"\n\n")
            for event in events:
                if not event.startswith(b"data: {"):
                    continue
                choices = json.loads(event[6:])["choices"]
                if choices and choices[0]["delta"].get("content"):
                    tokens += 1
                    if not first:
                        first = time.perf_counter()
    return Sample((first - started) * 1000, tokens, time.perf_counter() - started)


async def proxied_once(stub: llm_pb2_grpc.LlmProxyAsyncStub) -> Sample:
    request = llm_pb2.ChatRequest(
        model=MODEL, messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content="go")]
    )
    started = time.perf_counter()
    first = overhead = 0.0
    tokens = 0
    async for chunk in stub.StreamChat(request):
        kind = chunk.WhichOneof("chunk")
        if kind == "delta" and not first:
            first = time.perf_counter()
        elif kind == "done":
            # Deltas may carry several tokens each (the proxy merges what arrives together).
            tokens = chunk.done.usage.completion_tokens
            overhead = chunk.done.proxy_overhead_ms
    elapsed = time.perf_counter() - started
    return Sample((first - started) * 1000, tokens, elapsed, overhead)


async def level(streams: int, once: Callable[[], Awaitable[Sample]]) -> tuple[list[Sample], float]:
    started = time.perf_counter()
    samples = await asyncio.gather(*(once() for _ in range(streams)))
    return list(samples), time.perf_counter() - started


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(
    streams: int, direct: tuple[list[Sample], float], proxied: tuple[list[Sample], float]
) -> None:
    """Both paths' rows, what the proxy adds, and its own time, for one level."""
    for name, (samples, seconds) in (("direct", direct), ("proxy", proxied)):
        ttfts = [s.ttft_ms for s in samples]
        rate = sum(s.tokens for s in samples) / seconds
        print(
            f"{streams:>8} {name:>8} {statistics.median(ttfts):>8.2f}ms "
            f"{pct(ttfts, 0.99):>7.2f}ms {rate:>10.0f}"
        )
    d_ttft = [s.ttft_ms for s in direct[0]]
    p_ttft = [s.ttft_ms for s in proxied[0]]
    d_rate = sum(s.tokens for s in direct[0]) / direct[1]
    p_rate = sum(s.tokens for s in proxied[0]) / proxied[1]
    print(
        f"{streams:>8} {'added':>8} "
        f"{statistics.median(p_ttft) - statistics.median(d_ttft):>8.2f}ms "
        f"{pct(p_ttft, 0.99) - pct(d_ttft, 0.99):>7.2f}ms "
        f"{p_rate / d_rate:>9.0%} of direct"
    )
    own = [s.overhead_ms for s in proxied[0]]
    print(f"{streams:>8} {'own time':>8} {statistics.median(own):>8.2f}ms {pct(own, 0.99):>7.2f}ms")


async def main(tokens: int, levels: list[int], rounds: int, token_ms: float) -> None:
    upstream_port, proxy_port = free_port(), free_port()
    base_url = f"http://127.0.0.1:{upstream_port}/v1"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("THREADLINE_")},
        "THREADLINE_LOG_LEVEL": "error",
        "THREADLINE_ADDRESSES__LLM_PROXY": f"127.0.0.1:{proxy_port}",
        "THREADLINE_LLM__UPSTREAM__BASE_URL": base_url,
        "THREADLINE_LLM__UPSTREAM__MODEL": MODEL,
    }
    fake = (
        sys.executable,
        "-m",
        "threadline.testing.fake_upstream",
        "--port",
        str(upstream_port),
        "--tokens",
        str(tokens),
        "--model",
        MODEL,
        "--token-delay",
        str(token_ms / 1000),
    )
    proxy = (sys.executable, "-m", "threadline.cli", "serve", "llm_proxy")
    async with process(*fake), process(*proxy, env=env):
        await wait_http(f"{base_url}/models")
        await wait_grpc(f"127.0.0.1:{proxy_port}")
        url = f"{base_url}/chat/completions"
        connector = aiohttp.TCPConnector(limit=256)
        async with aiohttp.ClientSession(connector=connector) as client:
            channel = connect(f"127.0.0.1:{proxy_port}")
            stub = llm_pb2_grpc.LlmProxyStub(channel)
            await level(4, lambda: direct_once(client, url))  # warm-up both paths
            await level(4, lambda: proxied_once(stub))
            pace = f", {1000 / token_ms:g} tokens/s" if token_ms else ""
            print(
                f"{tokens} tokens per answer{pace}; fake upstream and llm_proxy in their own "
                "processes"
            )
            print(f"{'streams':>8} {'path':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'tok/s':>10}")
            for streams in levels:
                direct: list[Sample] = []
                proxied: list[Sample] = []
                direct_time = proxied_time = 0.0
                for _ in range(rounds):
                    samples, seconds = await level(streams, lambda: direct_once(client, url))
                    direct += samples
                    direct_time += seconds
                    samples, seconds = await level(streams, lambda: proxied_once(stub))
                    proxied += samples
                    proxied_time += seconds
                report(streams, (direct, direct_time), (proxied, proxied_time))
            await channel.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--streams", default="1,16,64")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--token-ms", type=float, default=0.0, help="ms between tokens; 0 = unpaced"
    )
    args = parser.parse_args()
    levels = [int(s) for s in args.streams.split(",")]
    asyncio.run(main(args.tokens, levels, args.rounds, args.token_ms))
