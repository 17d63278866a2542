"""Threadline as replicas: every service but the gateway twice, each replica its own
`threadline serve` process on its own port, callers balancing over both.

Peers are addressed as `ipv4:127.0.0.1:P1,127.0.0.1:P2`, the form a fixed list of
replicas takes (in Kubernetes, `dns:///` names a headless Service instead); each
replica listens on its own port (`THREADLINE_LISTEN_PORT`) and has a data dir of
its own, like a pod.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

from tests.ports import free_ports
from tests.processes import start_service, wait_healthy
from threadline.stack import START_ORDER

REPLICATED = ("session", "memory", "executor", "llm_proxy")

#: A replica: (service, index).
Replica = tuple[str, int]


class Replicas:
    """The processes of a replicated stack; `kill` and `start` one replica at a time."""

    def __init__(self, env: dict[str, str], data: Path, logs: Path, count: int = 2) -> None:
        self.env = dict(env)
        self.logs = logs
        self.ports: dict[Replica, int] = {}
        for name in REPLICATED:
            ports = free_ports(count)
            for index, port in enumerate(ports):
                self.ports[(name, index)] = port
            self.env[f"THREADLINE_ADDRESSES__{name.upper()}"] = "ipv4:" + ",".join(
                f"127.0.0.1:{port}" for port in ports
            )
        self.ports[("gateway", 0)] = int(env["THREADLINE_ADDRESSES__GATEWAY"].rpartition(":")[2])
        self._data = data
        self.procs: dict[Replica, asyncio.subprocess.Process] = {}

    @property
    def replicas(self) -> list[Replica]:
        order: dict[str, int] = {name: i for i, name in enumerate(START_ORDER)}
        return sorted(self.ports, key=lambda replica: (order[replica[0]], replica[1]))

    def address(self, replica: Replica) -> str:
        return f"127.0.0.1:{self.ports[replica]}"

    def env_of(self, replica: Replica) -> dict[str, str]:
        name, index = replica
        return {
            **self.env,
            "THREADLINE_LISTEN_PORT": str(self.ports[replica]),
            "THREADLINE_DATA_DIR": str(self._data / f"{name}-{index}"),
        }

    async def start(self, replica: Replica) -> None:
        name, index = replica
        self.procs[replica] = await start_service(
            name, self.env_of(replica), self.logs, log_name=f"{name}-{index}"
        )

    async def wait_healthy(self, replica: Replica, timeout_s: float = 30) -> None:
        """Until the replica serves; fails at once, with its log's end, if it exited."""
        serving = asyncio.create_task(wait_healthy(self.address(replica), timeout_s))
        exited = asyncio.create_task(self.procs[replica].wait())
        await asyncio.wait([serving, exited], return_when=asyncio.FIRST_COMPLETED)
        if not serving.done():
            serving.cancel()
            name, index = replica
            tail = (self.logs / f"{name}-{index}.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{name}-{index} exited ({exited.result()}):\n{tail}")
        exited.cancel()
        serving.result()

    async def kill(self, replica: Replica, sig: int) -> None:
        proc = self.procs[replica]
        proc.send_signal(sig)
        await proc.wait()

    async def start_all(self, replicas: Iterable[Replica] | None = None) -> None:
        chosen = list(self.replicas if replicas is None else replicas)
        for replica in chosen:
            await self.start(replica)
        await asyncio.gather(*(self.wait_healthy(r) for r in chosen))

    async def stop_all(self) -> None:
        procs = [p for p in self.procs.values() if p.returncode is None]
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()


@contextlib.asynccontextmanager
async def serve_replicas(
    env: dict[str, str], tmp_path: Path, count: int = 2
) -> AsyncIterator[Replicas]:
    """The replicated stack, every replica healthy; stopped at the end."""
    logs = tmp_path / "logs"
    logs.mkdir(exist_ok=True)
    stack = Replicas(env, tmp_path / "data", logs, count)
    try:
        await stack.start_all()
        yield stack
    finally:
        await stack.stop_all()
