"""The bundled model server: one llama.cpp server child process, supervised.

`threadline up` starts it when no upstream is configured. When the child dies,
the supervisor logs the exit (status, log file, its last lines) at once and starts
it again on the same port, with exponential backoff, so llm_proxy's upstream URL
stays valid; turns in between fail with UNAVAILABLE naming the local model server.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import socket
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx

from threadline.config import Capabilities, TimeoutSettings, UpstreamSettings
from threadline.errors import FailedPrecondition, Unavailable
from threadline.local_model.catalogue import INSTALL_HINT, SMOLLM2_135M, BundledModel
from threadline.logs import get_logger

__all__ = ["LOCAL_UPSTREAM_NAME", "LocalModelServer", "local_model_installed"]

#: The upstream name llm_proxy reports, and what its errors call this server.
LOCAL_UPSTREAM_NAME = "local-model-server"
# llama_cpp.server also needs its [server] extra; checking those modules up front turns
# a traceback buried in the child's log into a FailedPrecondition that names the fix.
_SERVER_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context")
_STOP_GRACE_S = 5.0
_POLL_INTERVAL_S = 0.2
_LOG_TAIL_LINES = 20
_START_TIMEOUT_S = 180.0
# A free port found by binding port 0 can be taken by someone else before the
# server binds it; with an auto-picked port, retrying on a fresh one is safe.
_PORT_ATTEMPTS = 3
_ADDRESS_IN_USE = "address already in use"
#: A server that ran this long before it died restarts after the first delay again.
_HEALTHY_RUN_S = 60.0

_log = get_logger(__name__)


def local_model_installed(model: BundledModel = SMOLLM2_135M) -> bool:
    """True when llama.cpp's server and the model's package are installed; imports nothing."""
    modules = (*_SERVER_MODULES, model.module)
    return all(importlib.util.find_spec(name) is not None for name in modules)


class _PortInUse(Exception):
    """The server lost the race for an auto-picked port; the caller retries."""


class LocalModelServer:
    """A llama.cpp server child serving one bundled model, restarted when it dies.

    The child runs in its own process group so that stop() also reaches anything
    it forks, and so that a Ctrl-C in the terminal does not kill it before
    threadline has drained the RPCs that are still streaming from it.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        model: BundledModel = SMOLLM2_135M,
        host: str = "127.0.0.1",
        port: int = 0,
        n_ctx: int = 8192,
        log_path: Path | None = None,
        restart_delay_s: float = 1.0,
        max_restart_delay_s: float = 30.0,
    ) -> None:
        self._data_dir = data_dir
        self._model = model
        self._host = host
        self._requested_port = port
        self._n_ctx = n_ctx
        self._log_path = log_path or data_dir / "logs" / "llama-server.log"
        self._restart_delay_s = restart_delay_s
        self._max_restart_delay_s = max_restart_delay_s
        self._proc: asyncio.subprocess.Process | None = None
        self._log_offset = 0
        self._base_url: str | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        #: How many times the supervisor brought a dead server back.
        self.restarts = 0

    @property
    def base_url(self) -> str:
        """`http://host:port/v1`; valid from start() to stop(), restarts included."""
        if self._base_url is None:
            raise FailedPrecondition("the local model server is not running")
        return self._base_url

    @property
    def model(self) -> BundledModel:
        return self._model

    @property
    def pid(self) -> int | None:
        """The current child's pid; None while it is down or restarting."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    @property
    def log_path(self) -> Path:
        return self._log_path

    def upstream(self) -> UpstreamSettings:
        """How llm_proxy should treat this server."""
        return UpstreamSettings(
            name=LOCAL_UPSTREAM_NAME,
            base_url=self.base_url,
            model=self._model.alias,
            # A CPU model is slow to its first token under load; give it room.
            timeouts=TimeoutSettings(first_token_s=120, idle_between_chunks_s=60),
            capabilities=Capabilities(system_role=self._model.system_role),
        )

    async def wait_ready(self, timeout_s: float) -> None:
        """Wait until the server answers (again, after a restart)."""
        async with asyncio.timeout(timeout_s):
            await self._ready.wait()

    async def start(self, timeout_s: float = _START_TIMEOUT_S) -> str:
        """Launch the server, wait until it serves `GET /v1/models`, then supervise it."""
        if not local_model_installed(self._model):
            raise FailedPrecondition(
                f"no upstream is configured and the bundled local model is not installed: "
                f"{INSTALL_HINT}"
            )
        if self._base_url is not None:
            return self._base_url
        deadline = time.monotonic() + timeout_s
        model_path = await asyncio.to_thread(self._model.gguf_path, self._data_dir)
        attempts = _PORT_ATTEMPTS if self._requested_port == 0 else 1
        for attempt in range(1, attempts + 1):
            port = self._requested_port or _free_port(self._host)
            try:
                await self._launch(model_path, port, deadline)
            except _PortInUse as exc:
                if attempt == attempts:
                    raise Unavailable(str(exc), details={"log_path": str(self._log_path)}) from None
                _log.warning("local_model.port_taken", port=port, attempt=attempt)
                continue
            url_host = f"[{self._host}]" if ":" in self._host else self._host
            self._base_url = f"http://{url_host}:{port}/v1"
            self._supervisor = asyncio.create_task(
                self._supervise(model_path, port), name="local-model-supervisor"
            )
            return self._base_url
        raise AssertionError("unreachable")  # pragma: no cover

    def _argv(self, model_path: Path, port: int) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "threadline.local_model.llama_server",
            "--model",
            str(model_path),
            "--model_alias",
            self._model.alias,
            "--host",
            self._host,
            "--port",
            str(port),
            "--n_ctx",
            str(self._n_ctx),
            # The server defaults to keeping logits for every prompt token, which is
            # only needed for logprobs and costs RSS in proportion to the vocabulary.
            "--logits_all",
            "False",
        ]
        if self._model.chat_format is not None:
            argv += ["--chat_format", self._model.chat_format]
        return argv

    async def _launch(self, model_path: Path, port: int, deadline: float) -> None:
        argv = self._argv(model_path, port)
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        with self._log_path.open("ab") as log_file:
            # The log is appended to across restarts; error messages must only quote this run.
            log_offset = log_file.tell()
            log_file.write(f"--- threadline: {' '.join(argv)}\n".encode())
            log_file.flush()
            _log.info("local_model.starting", argv=argv, log_path=str(self._log_path))
            started = time.monotonic()
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        self._proc = proc
        self._log_offset = log_offset
        url_host = f"[{self._host}]" if ":" in self._host else self._host
        try:
            await self._wait_ready(proc, f"http://{url_host}:{port}/v1", deadline, log_offset)
        except BaseException:
            # Also on cancellation: a half-started server would otherwise outlive us.
            await _kill(proc)
            raise
        self._ready.set()
        _log.info(
            "local_model.ready",
            model=self._model.alias,
            port=port,
            pid=proc.pid,
            ready_s=round(time.monotonic() - started, 2),
        )

    async def _wait_ready(
        self, proc: asyncio.subprocess.Process, base_url: str, deadline: float, log_offset: int
    ) -> None:
        # trust_env=False: an HTTP(S)_PROXY in the environment must not capture loopback polls.
        async with httpx.AsyncClient(timeout=2.0, trust_env=False) as client:
            while True:
                if proc.returncode is not None:
                    tail = self._log_tail(log_offset)
                    message = (
                        f"local model server exited with {_exit_status(proc.returncode)} before "
                        f"it was ready; last lines of {self._log_path}:\n{tail}"
                    )
                    if _ADDRESS_IN_USE in tail.lower() and self._requested_port == 0:
                        raise _PortInUse(message)
                    raise Unavailable(message, details={"log_path": str(self._log_path)})
                with contextlib.suppress(httpx.TransportError):
                    response = await client.get(f"{base_url}/models")
                    if response.status_code == 200:
                        return
                if time.monotonic() >= deadline:
                    raise Unavailable(
                        f"local model server did not answer in time; "
                        f"last lines of {self._log_path}:\n{self._log_tail(log_offset)}",
                        details={"log_path": str(self._log_path)},
                    )
                await asyncio.sleep(_POLL_INTERVAL_S)

    async def _supervise(self, model_path: Path, port: int) -> None:
        """Wait for the child to die; report it and start it again with backoff."""
        delay = self._restart_delay_s
        while True:
            proc = self._proc
            assert proc is not None
            started = time.monotonic()
            await proc.wait()
            self._ready.clear()
            if time.monotonic() - started >= _HEALTHY_RUN_S:
                delay = self._restart_delay_s
            _log.error(
                "local_model.exited",
                pid=proc.pid,
                exit_status=_exit_status(proc.returncode),
                returncode=proc.returncode,
                log_path=str(self._log_path),
                last_lines=self._log_tail(self._log_offset).splitlines(),
            )
            while True:
                _log.warning("local_model.restarting", in_s=delay, restarts=self.restarts)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_restart_delay_s)
                try:
                    await self._launch(model_path, port, time.monotonic() + _START_TIMEOUT_S)
                except (Unavailable, _PortInUse, OSError) as exc:
                    _log.error("local_model.restart_failed", error=str(exc).splitlines()[0])
                    continue
                break
            self.restarts += 1

    def _log_tail(self, offset: int) -> str:
        try:
            with self._log_path.open("rb") as log_file:
                log_file.seek(offset)
                text = log_file.read().decode("utf-8", errors="replace")
        except OSError as exc:
            return f"(log unreadable: {exc})"
        return "\n".join(text.splitlines()[-_LOG_TAIL_LINES:])

    async def stop(self) -> None:
        """Stop supervising, SIGTERM the server's group, SIGKILL after 5 s; safe at any time."""
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
        proc, self._proc = self._proc, None
        self._base_url = None
        self._ready.clear()
        if proc is None:
            return
        if proc.returncode is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), _STOP_GRACE_S)
            except TimeoutError:
                _log.warning("local_model.stop_timeout", pid=proc.pid, grace_s=_STOP_GRACE_S)
                await _kill(proc)
        else:
            await proc.wait()
        _log.info("local_model.stopped", pid=proc.pid, returncode=proc.returncode)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def _kill(proc: asyncio.subprocess.Process) -> None:
    # Once the leader is reaped its pid (and so the group id) may be reused by an
    # unrelated process; the server forks no workers, so there is nothing to chase.
    if proc.returncode is None:
        _signal_group(proc.pid, signal.SIGKILL)
    await proc.wait()


def _exit_status(returncode: int | None) -> str:
    if returncode is None:
        return "no exit status"
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-returncode).name}"
        return f"signal {-returncode}"
    return f"code {returncode}"


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    # The server may exit between our returncode check and the signal.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port
