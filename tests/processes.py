"""Child processes: the environment threadline runs in, its health, whether a pid lives."""

from __future__ import annotations

import contextlib
import os

import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.waiting import eventually


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
