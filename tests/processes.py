"""Child processes: the environment threadline runs in, its health, whether a pid lives,
and the five services as five `threadline serve` processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import ACME_KEY, FAKE_MODEL
from tests.ports import free_ports
from tests.waiting import eventually
from threadline.config import SERVICE_NAMES, hash_api_key
from threadline.stack import START_ORDER


def threadline_environ(**settings: str) -> dict[str, str]:
    """This process's environment without its THREADLINE_* settings, plus `settings`.

    A child process then reads only what the test gives it: a THREADLINE_REDIS_URL
    in the developer's shell must not point a test's services at a shared Redis.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("THREADLINE_")}
    env.update(settings)
    return env


async def wait_healthy(address: str, timeout_s: float = 30) -> None:
    """Until the server at `address` reports SERVING on the standard health service."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        async def serving() -> bool:
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
            return False

        await eventually(serving, timeout=timeout_s, interval=0.05)


def alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie waiting for its parent (or init) to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def service_env(
    tmp_path: Path, upstream_url: str, redis_url: str, **settings: str
) -> dict[str, str]:
    """Settings for `threadline serve`, this test run's Redis among them, plus `settings`."""
    ports = free_ports(len(SERVICE_NAMES))
    return threadline_environ(
        **settings,
        THREADLINE_DATA_DIR=str(tmp_path / "data"),
        THREADLINE_REDIS_URL=redis_url,
        THREADLINE_LOG_LEVEL="warning",
        THREADLINE_LLM__UPSTREAM__BASE_URL=upstream_url,
        THREADLINE_LLM__UPSTREAM__MODEL=FAKE_MODEL,
        THREADLINE_GATEWAY__API_KEYS=json.dumps(
            [{"sha256": hash_api_key(ACME_KEY), "tenant": "acme"}]
        ),
        **{
            f"THREADLINE_ADDRESSES__{name.upper()}": f"127.0.0.1:{port}"
            for name, port in zip(SERVICE_NAMES, ports, strict=True)
        },
    )


async def start_service(
    name: str, env: dict[str, str], logs: Path | None = None, *, log_name: str = ""
) -> asyncio.subprocess.Process:
    """`threadline serve <name>` as a child process (not yet waited healthy); its output
    is appended to `logs/<log_name or name>.log`."""
    with contextlib.ExitStack() as files:
        out = (
            files.enter_context((logs / f"{log_name or name}.log").open("ab"))
            if logs is not None
            else asyncio.subprocess.DEVNULL
        )
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "threadline.cli",
            "serve",
            name,
            env=env,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )


@contextlib.asynccontextmanager
async def threadline_up(config: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """`threadline up --config <config>` as a child process; killed at the end if it runs."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "threadline.cli",
        "up",
        "--config",
        str(config),
        env=threadline_environ(),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


@contextlib.asynccontextmanager
async def serve_all(
    env: dict[str, str], logs: Path | None = None
) -> AsyncIterator[dict[str, asyncio.subprocess.Process]]:
    """Each service as its own `threadline serve` process, healthy; `logs` keeps their output.

    A test may replace a process in the dict it gets (a restarted service): whatever
    the dict holds at the end is stopped.
    """
    procs: dict[str, asyncio.subprocess.Process] = {}
    try:
        for name in START_ORDER:
            procs[name] = await start_service(name, env, logs)
        for name in START_ORDER:
            await wait_healthy(env[f"THREADLINE_ADDRESSES__{name.upper()}"])
        yield procs
    finally:
        for proc in procs.values():
            if proc.returncode is None:
                proc.terminate()
        for proc in procs.values():
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()
