"""A turn's latency through the five services against the fake upstream, side by side
with the upstream alone: time to the first delta and to the end of the answer.

    python -m bench.turn_latency [--turns 40] [--tokens 16] [--sessions 1,32]

As deployed: the fake model server and each of the five services run in their own
process (`threadline serve <service>`, SQLite stores, no Redis), or with `--up` all
five in one `threadline up` process (whose services call each other in process);
this process is the client. For each concurrency level, that many sessions each run `--turns`
turns one after the other, all sessions at once; the direct path is as many
concurrent clients streaming from the fake upstream (aiohttp, the first content
event is the first delta). Direct and through-threadline windows alternate,
`--rounds` times, so drift on a shared machine hits both alike.

`--baseline REF` also runs a second stack from the source of an earlier commit
(`git archive REF services threadline`, run from that tree instead of the
installed package; or a directory holding such a tree, e.g. this commit with
one change reverted), in windows alternating with this one's: the ratio of the
two is what a change did, measured under the same load.

Printed per level: time to first delta (TTFD) and to the answer's end, p50 and
p99, for both paths, and what threadline adds to the TTFD; then the CPU each
process spent per turn (what the level's windows through each stack cost, the
fake model's not counted), which bounds how many turns the machine's cores can
carry at once. Targets (issue 16): added TTFD <= 5 ms p50 at 1 session and <= 10 ms p50 at 32.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import yaml

from bench.processes import cpu_seconds, free_port, process, wait_grpc, wait_http
from threadline.client import GatewayClient
from threadline.config import SERVICE_NAMES, ServiceName, hash_api_key
from threadline.stack import START_ORDER

KEY = "bench-key"
MODEL = "bench-model"
#: Added TTFD p50 targets, by number of concurrent sessions.
TARGETS_MS = {1: 5.0, 32: 10.0}


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


async def direct_turn(client: aiohttp.ClientSession, url: str) -> tuple[float, float]:
    """(ms to the first content event, ms to the end) for one streamed answer."""
    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    started = time.perf_counter()
    first = 0.0
    async with client.post(url, json=body) as response:
        async for chunk in response.content.iter_any():
            if not first and b'"content"' in chunk:
                first = time.perf_counter()
    return (first - started) * 1000, (time.perf_counter() - started) * 1000


async def stack_turn(client: GatewayClient, session_id: str, text: str) -> tuple[float, float]:
    started = time.perf_counter()
    first = 0.0
    async for event in client.converse(session_id, text):
        if not first and event.WhichOneof("event") == "delta":
            first = time.perf_counter()
    return (first - started) * 1000, (time.perf_counter() - started) * 1000


async def direct_window(url: str, sessions: int, turns: int) -> list[tuple[float, float]]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as client:

        async def one() -> list[tuple[float, float]]:
            return [await direct_turn(client, url) for _ in range(turns)]

        return [s for per in await asyncio.gather(*(one() for _ in range(sessions))) for s in per]


async def stack_window(gateway: str, sessions: int, turns: int) -> list[tuple[float, float]]:
    async with GatewayClient(gateway, api_key=KEY) as client:
        ids = [(await client.create_session()).id for _ in range(sessions)]

        async def one(session_id: str) -> list[tuple[float, float]]:
            return [await stack_turn(client, session_id, f"turn {i}") for i in range(turns)]

        return [s for per in await asyncio.gather(*(one(i) for i in ids)) for s in per]


def stack_config(data: Path, fake_url: str, ports: dict[ServiceName, int]) -> dict[str, object]:
    return {
        "data_dir": str(data),
        "log_level": "error",
        "addresses": {name: f"127.0.0.1:{ports[name]}" for name in SERVICE_NAMES},
        "gateway": {"api_keys": [{"sha256": hash_api_key(KEY), "tenant": "bench"}]},
        "llm": {"upstream": {"base_url": fake_url, "model": MODEL}},
        # Background work off: the figure is the turn path (Recall still runs).
        "memory": {
            "consolidate_fraction": 0,
            "idle_consolidate_s": 0,
            "extract_threshold": 0,
            "compact_threshold": 0,
        },
    }


#: Runs `threadline.cli` from the source tree given as the first argument instead of
#: the installed (editable) package: a baseline stack of an earlier commit.
_FROM_TREE = (
    "import runpy, sys; tree = sys.argv.pop(1); "
    "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
    "sys.path.insert(0, tree); runpy.run_module('threadline.cli', run_name='__main__')"
)


async def start_fake(children: AsyncExitStack, tokens: int, pids: dict[str, int]) -> str:
    """The fake upstream as a process (its pid into `pids`); its base URL."""
    fake_port = free_port()
    fake = (sys.executable, "-m", "threadline.testing.fake_upstream", "--port", str(fake_port))
    pids["fake model"] = await children.enter_async_context(
        process(*fake, "--tokens", str(tokens), "--model", MODEL)
    )
    fake_url = f"http://127.0.0.1:{fake_port}/v1"
    await wait_http(fake_url + "/models")
    return fake_url


async def start_stack(
    children: AsyncExitStack,
    tmp: Path,
    fake_url: str,
    pids: dict[str, int],
    tree: Path | None,
    one_process: bool = False,
) -> str:
    """The five services as processes (pids into `pids`), or all in one `threadline
    up` with `one_process`, from `tree` if given; the gateway's address."""
    ports: dict[ServiceName, int] = {name: free_port() for name in SERVICE_NAMES}
    config = tmp / "stack.yaml"
    config.write_text(yaml.safe_dump(stack_config(tmp / "data", fake_url, ports)))
    cli = ("-c", _FROM_TREE, str(tree)) if tree is not None else ("-m", "threadline.cli")
    if one_process:
        argv = (sys.executable, *cli, "up", "--config", str(config))
        pids["threadline up"] = await children.enter_async_context(process(*argv))
        for name in START_ORDER:
            await wait_grpc(f"127.0.0.1:{ports[name]}")
        return f"127.0.0.1:{ports['gateway']}"
    for name in START_ORDER:
        env = {**os.environ, "THREADLINE_LISTEN_PORT": str(ports[name])}
        argv = (sys.executable, *cli, "serve", name, "--config", str(config))
        pids[name] = await children.enter_async_context(process(*argv, env=env))
        await wait_grpc(f"127.0.0.1:{ports[name]}")
    return f"127.0.0.1:{ports['gateway']}"


def source_tree(ref: str, into: Path) -> Path:
    """`services` and `threadline` as they were at `ref` (git archive)."""
    into.mkdir()
    archive = subprocess.run(
        ["git", "archive", ref, "services", "threadline"], check=True, capture_output=True
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def report(sessions: int, rows: list[tuple[str, list[tuple[float, float]]]]) -> None:
    """Each path's rows, then what each stack adds to the first delta over direct."""
    for label, samples in rows:
        ttfd = [s[0] for s in samples]
        total = [s[1] for s in samples]
        print(
            f"{sessions:>8} {label:<28}{statistics.median(ttfd):9.2f}{pct(ttfd, 0.99):9.2f}"
            f"{statistics.median(total):9.2f}{pct(total, 0.99):9.2f}"
        )
    direct = [s[0] for s in rows[0][1]]
    for label, samples in rows[1:]:
        ttfd = [s[0] for s in samples]
        added_p50 = statistics.median(ttfd) - statistics.median(direct)
        added_p99 = pct(ttfd, 0.99) - pct(direct, 0.99)
        line = f"{sessions:>8} {'added: ' + label:<28}{added_p50:9.2f}{added_p99:9.2f}"
        target = TARGETS_MS.get(sessions)
        if target is not None:
            verdict = "met" if added_p50 <= target else f"missed by {added_p50 - target:.2f} ms"
            line += f"   target p50 <= {target:g} ms: {verdict}"
        print(line)
    if len(rows) == 3:
        ratio = statistics.median(s[0] for s in rows[1][1]) / statistics.median(
            s[0] for s in rows[2][1]
        )
        print(f"{sessions:>8} {'TTFD p50 this/baseline':<28}{ratio:9.2f}x")


async def level(
    sessions: int,
    turns: int,
    rounds: int,
    url: str,
    gateways: dict[str, str],
    pids: dict[str, dict[str, int]],
) -> None:
    """One concurrency level: windows alternate between direct and each stack."""
    samples: dict[str, list[tuple[float, float]]] = {"upstream direct": []}
    samples |= {label: [] for label in gateways}
    cpu = {label: dict.fromkeys(pids[label], 0.0) for label in gateways}
    for _ in range(rounds):
        samples["upstream direct"] += await direct_window(url, sessions, turns)
        for label, gateway in gateways.items():
            before = {name: cpu_seconds(pid) for name, pid in pids[label].items()}
            samples[label] += await stack_window(gateway, sessions, turns)
            for name, pid in pids[label].items():
                cpu[label][name] += cpu_seconds(pid) - before[name]
    report(sessions, list(samples.items()))
    totals = {}
    for label, by_process in cpu.items():
        turns_run = len(samples[label])
        per_turn = ", ".join(f"{k} {v / turns_run * 1000:.1f}" for k, v in by_process.items())
        totals[label] = sum(by_process.values()) / turns_run * 1000
        print(f"{'':9}CPU ms per turn, {label}: {per_turn}; stack {totals[label]:.1f}")
    if len(totals) == 2:
        this, base = totals.values()
        print(f"{'':9}stack CPU per turn this/baseline: {this / base:.2f}x")


async def main(
    turns: int,
    tokens: int,
    levels: list[int],
    rounds: int,
    baseline: str | None,
    one_process: bool,
) -> None:
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        async with AsyncExitStack() as children:
            fake_url = await start_fake(children, tokens, {})
            (tmp / "this").mkdir()
            pids: dict[str, dict[str, int]] = {"turn via threadline": {}}
            gateways = {
                "turn via threadline": await start_stack(
                    children, tmp / "this", fake_url, pids["turn via threadline"], None, one_process
                )
            }
            if baseline is not None:
                is_dir = await asyncio.to_thread(os.path.isdir, baseline)
                tree = Path(baseline) if is_dir else source_tree(baseline, tmp / "baseline-src")
                (tmp / "baseline").mkdir()
                label = f"baseline {baseline}"
                pids[label] = {}
                gateways[label] = await start_stack(
                    children, tmp / "baseline", fake_url, pids[label], tree, one_process
                )
            url = fake_url + "/chat/completions"
            for gateway in gateways.values():
                await stack_window(gateway, 2, 3)  # warm-up: connections, caches
            await direct_window(url, 2, 3)
            print(f"{tokens}-token answers, {turns} turns per session; ms")
            print(f"{'sessions':>8} {'path':<28}{'TTFD p50':>9}{'p99':>9}{'end p50':>9}{'p99':>9}")
            for sessions in levels:
                await level(sessions, turns, rounds, url, gateways, pids)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=40)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--sessions", default="1,32", help="concurrency levels")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--baseline",
        default=None,
        help="git ref, or a directory holding services/ and threadline/: also run a stack of "
        "that source, side by side",
    )
    parser.add_argument(
        "--up",
        action="store_true",
        help="each stack as one `threadline up` process instead of five `threadline serve`",
    )
    args = parser.parse_args()
    levels = [int(n) for n in args.sessions.split(",")]
    asyncio.run(main(args.turns, args.tokens, levels, args.rounds, args.baseline, args.up))
