"""Capacity of one `threadline up` under its default configuration.

    python -m bench.capacity [--streams 100,300,1000] [--lengths 10,100,1000]
        [--set THREADLINE_X=VALUE ...] [--tree before=DIR --tree after=DIR]

Two measurements, each on a fresh stack (a `threadline up` process, default
configuration apart from ports and an API key) against the fake upstream in a
process of its own, measured from outside:

- streams: N concurrent Converse streams on N sessions, each answer taking
  about 10 s (50 tokens 0.2 s apart): completed / failed (by error), time to
  the `started` event and to the first delta (p50 / p99), the stack's CPU
  seconds and its memory (RSS before, peak during);
- turns: 16 clients run turns of a short answer (16 tokens, no delay) on
  sessions already holding L messages (imported), for each L: turns/s and the
  stack's CPU milliseconds per turn, side by side. Compaction is off here
  (memory.compact_threshold 0): the fake cannot write the summary it asks for,
  so every turn past the window would try it again and fail, where a real model
  moves the conversation to a short new session; what is measured is what a
  turn costs on a long log.

Stack CPU is the `threadline up` process's user + system time over the
measured window (all five services run in it); the client and the fake
upstream are separate processes and not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from google.protobuf import json_format

from bench.processes import cpu_seconds, free_port, process, wait_grpc, wait_http
from services.session.chain import GENESIS_HASH, seal_messages
from threadline.client import GatewayClient
from threadline.config import hash_api_key
from threadline.errors import ThreadlineError
from threadline.v1 import common_pb2

KEY = "bench-capacity-key"
#: The long answer: 50 tokens 0.2 s apart, about 10 s.
LONG_TOKENS, LONG_DELAY_S = 50, 0.2
SHORT_TOKENS = 16
CLIENTS = 16
SESSIONS_PER_CLIENT = 4
ROUNDS = 4
#: Channels the streams are spread over (as several client processes would).
CHANNELS = 8


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def rss_mb(pid: int, field_name: str = "VmRSS") -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class Stack:
    pid: int
    gateway: str


@contextlib.asynccontextmanager
async def fake_upstream(tokens: int, delay_s: float) -> AsyncIterator[str]:
    port = free_port()
    argv = [sys.executable, "-m", "threadline.testing.fake_upstream", "--port", str(port)]
    argv += ["--tokens", str(tokens), "--token-delay", str(delay_s)]
    async with process(*argv):
        await wait_http(f"http://127.0.0.1:{port}/v1/models")
        yield f"http://127.0.0.1:{port}/v1"


@contextlib.asynccontextmanager
async def threadline_up(upstream_url: str, tree: str = "", **settings: str) -> AsyncIterator[Stack]:
    """A `threadline up` process with the default configuration, on free ports, and
    `settings` (THREADLINE_* variables); run from the source tree `tree` if given."""
    ports = {name: free_port() for name in ("gateway", "executor", "llm_proxy", "session")}
    ports["memory"] = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("THREADLINE_")}
    env |= {f"THREADLINE_ADDRESSES__{n.upper()}": f"127.0.0.1:{p}" for n, p in ports.items()}
    env |= {
        "THREADLINE_LLM__UPSTREAM__BASE_URL": upstream_url,
        "THREADLINE_LLM__UPSTREAM__MODEL": "fake-model",
        "THREADLINE_GATEWAY__API_KEYS": json.dumps(
            [{"sha256": hash_api_key(KEY), "tenant": "bench"}]
        ),
        **settings,
    }
    if tree:
        # -P: the working directory does not go first on the path, the tree does.
        env["PYTHONPATH"] = tree
    with tempfile.TemporaryDirectory() as data_dir:
        env["THREADLINE_DATA_DIR"] = data_dir
        argv = [sys.executable, "-P", "-m", "threadline.cli", "up"]
        async with process(*argv, env=env) as pid:
            gateway = f"127.0.0.1:{ports['gateway']}"
            await wait_up(gateway)
            yield Stack(pid, gateway)


async def wait_up(gateway: str, timeout_s: float = 90) -> None:
    """Until the gateway answers: a loaded machine starts the stack slowly."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await wait_grpc(gateway)
            return
        except TimeoutError:
            if time.monotonic() > deadline:
                raise


@dataclass
class StreamResult:
    started_s: float | None = None
    first_delta_s: float | None = None
    error: str = ""


async def one_stream(client: GatewayClient, session_id: str) -> StreamResult:
    result = StreamResult()
    began = time.perf_counter()
    try:
        async for event in client.converse(session_id, "Tell me a long story."):
            kind = event.WhichOneof("event")
            if kind == "started" and result.started_s is None:
                result.started_s = time.perf_counter() - began
            elif kind == "delta" and result.first_delta_s is None:
                result.first_delta_s = time.perf_counter() - began
    except ThreadlineError as exc:
        result.error = f"{exc.code}: {exc.message}"[:160]
    return result


@dataclass
class Sampler:
    """The stack process's peak RSS, sampled while a measurement runs."""

    pid: int
    peak_mb: float = 0.0
    _task: asyncio.Task[None] | None = field(default=None, repr=False)

    async def _run(self) -> None:
        while True:
            self.peak_mb = max(self.peak_mb, rss_mb(self.pid))
            await asyncio.sleep(0.2)

    def __enter__(self) -> Sampler:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def streams_run(n: int, variant: Variant) -> float:
    """One run of `n` streams on a fresh stack; the stack's CPU per stream (seconds)."""
    async with (
        fake_upstream(LONG_TOKENS, LONG_DELAY_S) as upstream,
        threadline_up(upstream, variant.tree, **variant.settings) as stack,
        contextlib.AsyncExitStack() as exits,
    ):
        clients = [
            await exits.enter_async_context(GatewayClient(stack.gateway, api_key=KEY))
            for _ in range(CHANNELS)
        ]
        sessions = []
        for i in range(0, n, 50):
            batch = range(i, min(n, i + 50))
            made = await asyncio.gather(*(clients[j % CHANNELS].create_session() for j in batch))
            sessions += [s.id for s in made]
        rss_before = rss_mb(stack.pid)
        cpu_before, began = cpu_seconds(stack.pid), time.perf_counter()
        with Sampler(stack.pid) as sampler:
            results = await asyncio.gather(
                *(one_stream(clients[i % CHANNELS], s) for i, s in enumerate(sessions))
            )
        wall, cpu = time.perf_counter() - began, cpu_seconds(stack.pid) - cpu_before
    print(f"[{variant.label}] ", end="")
    report_streams(n, results, wall, cpu, rss_before, sampler.peak_mb)
    return cpu / n


def report_streams(
    n: int, results: list[StreamResult], wall: float, cpu: float, rss: float, peak: float
) -> None:
    failed = [r for r in results if r.error]
    started = [r.started_s for r in results if r.started_s is not None]
    first = [r.first_delta_s for r in results if r.first_delta_s is not None]
    print(
        f"streams N={n:5d}: completed {n - len(failed):5d}, failed {len(failed):4d} | "
        f"started p50 {statistics.median(started or [float('nan')]):6.2f} s "
        f"p99 {pct(started, 0.99):6.2f} s | first delta p50 "
        f"{statistics.median(first or [float('nan')]):6.2f} s p99 {pct(first, 0.99):6.2f} s | "
        f"wall {wall:5.1f} s | stack CPU {cpu:6.1f} s ({cpu / n * 1000:5.1f} ms/stream) | "
        f"RSS {rss:5.0f} -> peak {peak:5.0f} MB",
        flush=True,
    )
    for error, count in collections.Counter(r.error for r in failed).most_common(3):
        print(f"    {count} x {error}")


def session_lines(template: list[str], length: int) -> list[str]:
    """An export of a session holding `length` alternating user/assistant messages."""
    session = json.loads(template[0])
    batch = []
    for i in range(length):
        user = i % 2 == 0
        msg = common_pb2.Message(
            role=common_pb2.ROLE_USER if user else common_pb2.ROLE_ASSISTANT,
            content=(f"Question {i}: how does the harbour change with the tides? " * 3)
            if user
            else (f"Answer {i}: the water rises and falls twice a day, and boats wait. " * 6),
        )
        batch.append(msg)
    now = time.time_ns() // 1000 - length * 1000
    head = seal_messages(
        batch,
        parent_hash=GENESIS_HASH,
        first_seq=0,
        now_micros=now,
        token_count=lambda m: len(m.content) // 4 + 4,
    )
    session["session"]["head"] = head
    session["session"]["messageCount"] = length
    lines = [json.dumps(session)]
    lines += [json.dumps({"message": json_format.MessageToDict(m)}) for m in batch]
    return lines


async def client_turns(client: GatewayClient, sessions: list[str], rounds: int) -> int:
    """Turns one client runs, one at a time, over its sessions in turn; the count.

    A turn that compacted its session goes on in a new one: the client follows it.
    """
    done = 0
    for round_ in range(rounds):
        for index, session_id in enumerate(sessions):
            async for event in client.converse(session_id, f"And then, round {round_}?"):
                if event.WhichOneof("event") == "done" and event.done.session_id:
                    sessions[index] = event.done.session_id
            done += 1
    return done


async def turns_run(lengths: Sequence[int], variant: Variant) -> dict[int, float]:
    """Turns at each session length on one fresh stack; the stack's CPU per turn."""
    per_turn: dict[int, float] = {}
    async with (
        fake_upstream(SHORT_TOKENS, 0.0) as upstream,
        threadline_up(
            upstream, variant.tree, THREADLINE_MEMORY__COMPACT_THRESHOLD="0", **variant.settings
        ) as stack,
        contextlib.AsyncExitStack() as exits,
    ):
        clients = [
            await exits.enter_async_context(GatewayClient(stack.gateway, api_key=KEY))
            for _ in range(CLIENTS)
        ]
        template = await clients[0].export_session((await clients[0].create_session()).id)
        for length in lengths:
            lines = session_lines(template, length)
            owned = [
                [(await client.import_session(lines)).id for _ in range(SESSIONS_PER_CLIENT)]
                for client in clients
            ]
            # One turn on each session first: what a session's first turn does once
            # (memory's triggers, a compaction of a long session) is not measured.
            await asyncio.gather(
                *(client_turns(c, s, 1) for c, s in zip(clients, owned, strict=True))
            )
            cpu_before, began = cpu_seconds(stack.pid), time.perf_counter()
            counts = await asyncio.gather(
                *(client_turns(c, s, ROUNDS) for c, s in zip(clients, owned, strict=True))
            )
            wall, cpu = time.perf_counter() - began, cpu_seconds(stack.pid) - cpu_before
            turns = sum(counts)
            per_turn[length] = cpu / turns
            print(
                f"[{variant.label}] turns at length {length:5d}: {turns} turns, "
                f"{turns / wall:6.1f} turns/s, stack CPU {cpu / turns * 1000:5.1f} ms/turn",
                flush=True,
            )
    return per_turn


@dataclass(frozen=True)
class Variant:
    """A stack to measure: source tree ("" = this one) and settings."""

    label: str
    tree: str = ""
    settings: dict[str, str] = field(default_factory=dict)


async def main(streams: Sequence[int], lengths: Sequence[int], variants: list[Variant]) -> None:
    print(f"{os.cpu_count()} CPUs; answers of {LONG_TOKENS} tokens {LONG_DELAY_S} s apart")
    for n in streams:
        per_stream = [await streams_run(n, v) for v in variants]
        for variant, cpu in zip(variants[1:], per_stream[1:], strict=True):
            ratio = cpu / per_stream[0]
            print(f"    CPU per stream {variant.label} / {variants[0].label}: {ratio:.2f}")
    if lengths:
        per_turn = [await turns_run(lengths, v) for v in variants]
        for variant, by_length in zip(variants[1:], per_turn[1:], strict=True):
            ratios = ", ".join(f"{n}: {by_length[n] / per_turn[0][n]:.2f}" for n in lengths)
            print(f"CPU per turn {variant.label} / {variants[0].label} by length: {ratios}")
        for variant, by_length in zip(variants, per_turn, strict=True):
            growth = by_length[lengths[-1]] / by_length[lengths[0]]
            print(
                f"[{variant.label}] CPU per turn at {lengths[-1]} / at {lengths[0]}: {growth:.2f}"
            )


def _numbers(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=_numbers, default=[100, 300, 1000])
    parser.add_argument("--lengths", type=_numbers, default=[10, 100, 1000])
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="THREADLINE_X=VALUE",
        help="a setting for the stack, as its environment variable (repeatable)",
    )
    parser.add_argument(
        "--tree",
        action="append",
        default=[],
        metavar="LABEL=DIR",
        help="measure the stack of this source tree too, side by side (repeatable); "
        "ratios are to the first one",
    )
    args = parser.parse_args()
    settings = dict(item.partition("=")[::2] for item in args.set)
    trees = [item.partition("=")[::2] for item in args.tree] or [("this tree", "")]
    variants = [Variant(label, tree, settings) for label, tree in trees]
    asyncio.run(main(args.streams, args.lengths, variants))
