"""A `redis-server` of the test run's own, on a free port, gone when the run ends.

Two test runs on one machine must not share a Redis: each flushes its database
before every test, and pub/sub channels are global across database numbers, so
one run would delete the other's keys and receive the other's events.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from tests.ports import free_ports

#: How long redis-server may take to answer PING after it was started.
START_TIMEOUT_S = 10.0
#: Attempts at a port: another process may bind the free one before redis-server does.
PORT_ATTEMPTS = 3


class RedisServerError(RuntimeError):
    """redis-server is missing or did not come up; the message says why."""


def _die_with_parent() -> list[str]:
    """A command prefix that has Linux SIGTERM redis-server when the test run dies,
    even by SIGKILL. setpriv sets it before exec, where a `preexec_fn` doing the same
    is not safe in a process with threads (grpc's): the child can crash."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM"] if setpriv is not None else []


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except redis.exceptions.ConnectionError:
        return False


def start_redis(directory: Path, port: int) -> tuple[subprocess.Popen[bytes], str]:
    """redis-server on `port`, once it answers PING; raises if it exits first."""
    log = directory / f"redis-{port}.log"
    url = f"redis://127.0.0.1:{port}/0"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [
                *_die_with_parent(),
                *("redis-server", "--port", str(port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(directory)),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _answers(url):
        if server.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            raise RedisServerError(
                f"redis-server on port {port} exited with code {server.returncode}: "
                + " | ".join(tail)
            )
        if time.monotonic() > deadline:
            stop_redis(server)
            raise RedisServerError(f"redis-server on port {port} not answering PING in time")
        time.sleep(0.02)  # polling PING: the server has no readiness signal we can wait on
    return server, url


def stop_redis(server: subprocess.Popen[bytes]) -> None:
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[str]:
    """Start redis-server (no persistence, files in `directory`); yield its URL."""
    if shutil.which("redis-server") is None:
        raise RedisServerError(
            "redis-server is not on PATH: run ./scripts/ensure_redis.sh, or set REDIS_URL"
        )
    errors: list[str] = []
    for _ in range(PORT_ATTEMPTS):
        (port,) = free_ports(1)
        try:
            server, url = start_redis(directory, port)
        except RedisServerError as exc:
            errors.append(str(exc))
            continue
        try:
            yield url
        finally:
            stop_redis(server)
        return
    raise RedisServerError("; ".join(errors))
