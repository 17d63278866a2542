"""A scriptable, fault-injecting fake of an OpenAI-compatible model server.

Written on raw asyncio streams rather than an HTTP framework because the
faults it injects (a reset before the status line, a stream cut between two
chunks, a half-written body) need control over every byte and over how the
socket is closed.

Per chat-completion request a `Script` is chosen: a route registered for the
request's model (`route`, `route_sequence`), else the next queued script
(`enqueue`), else `FakeUpstream.default`. GET /v1/models is never scripted.

Token accounting, so tests can predict usage:

- prompt_tokens = (characters of all message text contents) // 4 + 1 per
  message; text parts of multi-part contents count, other parts do not.
- completion_tokens = number of generated deltas: content tokens plus
  tool-call deltas (one carrying id and name, then one per arguments piece).
- With stream_options.continuous_usage_stats (vLLM's), every chunk carries the
  usage so far: completion_tokens = deltas sent up to and including it, so a
  stream cut after k deltas has reported prompt + k.

Streams use `Transfer-Encoding: chunked` with one SSE event per HTTP chunk,
as vLLM (uvicorn) and llama.cpp's server do, so a cut stream is a protocol error
the client can see, and connections are kept alive between requests.

Run standalone (benchmarks):
    python -m threadline.testing.fake_upstream --port 8099 --tokens 256
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import re
import signal
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from types import TracebackType
from typing import Any, Final, Literal, Self, get_args

__all__ = [
    "FakeUpstream",
    "Fault",
    "RecordedRequest",
    "Script",
    "estimate_prompt_tokens",
    "main",
]

Fault = Literal["none", "reset_before_headers", "silent", "cut", "stall", "malformed", "no_done"]
_FAULTS: Final = frozenset(get_args(Fault))

_MAX_HEAD_BYTES: Final = 64 * 1024
# Writing several SSE events per socket write keeps the fake from being the
# bottleneck of a benchmark; delays flush first, so timing stays exact.
_EVENTS_PER_FLUSH: Final = 16
_MALFORMED_EVENT: Final = b"data: {not json\n\n"
_DONE_EVENT: Final = b"data: [DONE]\n\n"
_TOKEN_RE: Final = re.compile(r"\s*\S+\s*")


@dataclass(frozen=True)
class Script:
    """What the fake does for one chat-completion request.

    A stream's data events are, in order: one per generated delta (indexes
    0 to n-1), the finish chunk (n), the usage chunk (n+1, if the request set
    stream_options.include_usage), then [DONE]. `fault_after` is an index in
    that list: `cut` and `stall` strike after that many events (so, below n,
    after that many deltas); `malformed` inserts `data: {not json` at that
    index and the stream goes on. An index past the last event never fires.

    For non-streaming responses `cut` and `stall` strike after half of the
    body, `malformed` replaces the body, and `no_done` does nothing.
    `reset_before_headers` and `silent` strike before any response, whatever
    the status. The request's max_tokens (or max_completion_tokens) is
    honoured: fewer deltas and finish_reason "length".
    """

    #: Answer text, streamed word by word (trailing whitespace kept).
    text: str | None = None
    #: Number of "tokN " tokens when `text` is None (none if `tool_calls` is set).
    tokens: int = 8
    status: int = 200
    #: Extra response headers, e.g. {"Retry-After": "2"}.
    headers: Mapping[str, str] = field(default_factory=dict)
    #: Body for a non-200 status: JSON for a mapping, sent as is (text/plain
    #: unless `headers` say otherwise) for a string, e.g. a proxy's HTML page;
    #: a generic OpenAI-style error if None.
    error_body: Mapping[str, Any] | str | None = None
    fault: Fault = "none"
    fault_after: int = 0
    #: Before the status line (a slow server); applies to every response.
    headers_delay_s: float = 0.0
    #: Between the response headers and the first delta.
    first_token_delay_s: float = 0.0
    #: Between two deltas.
    token_delay_s: float = 0.0
    #: (function name, arguments JSON) per call; finish_reason becomes "tool_calls".
    tool_calls: Sequence[tuple[str, str]] = ()
    #: None: "tool_calls" with tool calls, "length" when max_tokens cut the
    #: answer short, else "stop".
    finish_reason: str | None = None
    #: Send an SSE comment line (": ping") before every data event.
    sse_comments: bool = False
    #: Split every JSON data event over two `data:` lines.
    sse_multiline: bool = False

    def __post_init__(self) -> None:
        if self.fault not in _FAULTS:
            raise ValueError(f"unknown fault {self.fault!r}; expected one of {sorted(_FAULTS)}")
        if self.tokens < 0 or self.fault_after < 0:
            raise ValueError("tokens and fault_after must be >= 0")
        if not 200 <= self.status <= 599:
            raise ValueError(f"status {self.status} is not a final HTTP status")
        delays = (self.headers_delay_s, self.first_token_delay_s, self.token_delay_s)
        if min(delays) < 0:
            raise ValueError("delays must be >= 0")

    def content_tokens(self) -> list[str]:
        """The content deltas this script generates; they join back to `text`."""
        if self.text is not None:
            found: list[str] = _TOKEN_RE.findall(self.text)
            return found or ([self.text] if self.text else [])
        if self.tool_calls:
            return []
        return [f"tok{i} " for i in range(self.tokens)]

    @classmethod
    def error(
        cls,
        status: int,
        message: str,
        *,
        error_type: str = "server_error",
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Script:
        """An OpenAI-style error response: {"error": {message, type, param, code}}."""
        body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
        return cls(status=status, error_body=body, headers=dict(headers or {}))

    @classmethod
    def rate_limited(cls, retry_after: float | str | None = None) -> Script:
        """429; `retry_after` in seconds or as an HTTP date, header omitted if None."""
        headers = {} if retry_after is None else {"Retry-After": _header_value(retry_after)}
        return cls.error(
            429,
            "Rate limit reached for requests",
            error_type="requests",
            code="rate_limit_exceeded",
            headers=headers,
        )

    @classmethod
    def context_length_exceeded(cls, max_context_tokens: int = 8192) -> Script:
        """400 as OpenAI and vLLM send it when the prompt does not fit the model."""
        return cls.error(
            400,
            f"This model's maximum context length is {max_context_tokens} tokens. "
            "Please reduce the length of the messages.",
            error_type="invalid_request_error",
            code="context_length_exceeded",
            param="messages",
        )

    @classmethod
    def content_filter(cls) -> Script:
        """400 for a prompt refused by the provider's content filter."""
        return cls.error(
            400,
            "The response was filtered due to the prompt triggering the content management policy.",
            error_type="invalid_request_error",
            code="content_filter",
            param="prompt",
        )


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the fake received it."""

    method: str
    path: str
    #: Lower-cased names; repeated headers joined with ", ".
    headers: Mapping[str, str]
    #: Parsed JSON body; None when the body is empty or not JSON.
    body: Any
    raw_body: bytes
    #: time.monotonic() when the whole request had been read.
    received_at: float
    #: The script that served it (chat completions only).
    script: Script | None = None

    @property
    def model(self) -> str | None:
        model = self.body.get("model") if isinstance(self.body, dict) else None
        return model if isinstance(model, str) else None

    @property
    def stream(self) -> bool:
        return isinstance(self.body, dict) and self.body.get("stream") is True


def estimate_prompt_tokens(messages: object) -> int:
    """(characters of message text) // 4 + 1 per message; see the module docstring."""
    if not isinstance(messages, list):
        return 0
    chars = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    chars += len(part["text"])
    return chars // 4 + len(messages)


class _BadRequest(Exception):
    pass


class _Connection:
    """One client connection and a buffer filled by a background reader.

    The background reader is what lets a response notice, at any point,
    that the client went away: HTTP/1.1 clients send nothing while they wait
    for a response, so end-of-file on the socket means they gave up.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buffer = bytearray()
        self.eof = asyncio.Event()
        self._more = asyncio.Event()
        #: Set when the fake closes the connection itself: not a client disconnect.
        self.closing = False
        #: Whether the request being answered allows reusing the connection.
        self.keep_alive = True
        self.pump = asyncio.create_task(self._fill())

    async def _fill(self) -> None:
        try:
            while data := await self.reader.read(65536):
                self.buffer += data
                self._more.set()
        except OSError:
            pass
        finally:
            self.eof.set()
            self._more.set()

    async def _wait_more(self) -> bool:
        if self.eof.is_set():
            return False
        self._more.clear()
        await self._more.wait()
        return True

    async def read_until(self, separator: bytes, limit: int) -> bytes | None:
        while (index := self.buffer.find(separator)) < 0:
            if len(self.buffer) > limit:
                raise _BadRequest("request head too large")
            if not await self._wait_more():
                if self.buffer:
                    raise _BadRequest("connection closed mid-request")
                return None
        data = bytes(self.buffer[:index])
        del self.buffer[: index + len(separator)]
        return data

    async def read_exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if not await self._wait_more():
                raise _BadRequest("connection closed mid-body")
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    def abort(self, *, reset: bool = False) -> None:
        self.closing = True
        if reset:
            sock = self.writer.get_extra_info("socket")
            if sock is not None:
                # Linger 0 turns the close into a TCP RST, as a crashing or
                # overloaded proxy in front of a model server produces.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


class _Output:
    """Buffers response bytes so that many small events cost one write."""

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._pending: list[bytes] = []

    def add(self, data: bytes) -> None:
        self._pending.append(data)

    def add_chunk(self, data: bytes) -> None:
        self._pending.append(b"%x\r\n%b\r\n" % (len(data), data))

    async def flush(self) -> None:
        if self._pending:
            self._conn.writer.write(b"".join(self._pending))
            self._pending.clear()
        await self._conn.writer.drain()


async def _sleep(seconds: float) -> None:
    if seconds > 0:
        await asyncio.sleep(seconds)


async def _hang() -> None:
    # Ends only by cancellation: the client leaving or the server stopping.
    await asyncio.get_running_loop().create_future()


def _header_value(value: float | str) -> str:
    if isinstance(value, str):
        return value
    return str(int(value)) if float(value).is_integer() else str(value)


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _split_arguments(arguments: str) -> list[str]:
    # Real servers send arguments in several pieces; clients must concatenate.
    pieces = min(max(len(arguments), 1), 3)
    bounds = [len(arguments) * i // pieces for i in range(pieces + 1)]
    return [arguments[start:end] for start, end in itertools.pairwise(bounds)]


class FakeUpstream:
    """An OpenAI-compatible HTTP/1.1 server on 127.0.0.1 whose answers tests script.

    Use as `async with FakeUpstream() as fake:` or `await fake.start()` ...
    `await fake.stop()`; point clients at `fake.base_url`.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        models: Sequence[str] = ("fake-model",),
        default: Script | None = None,
        strict_models: bool = False,
    ) -> None:
        self.host = host
        self._requested_port = port
        self._models: list[str] = list(models)
        #: Served when no route matches and the queue is empty.
        self.default: Script = default if default is not None else Script()
        #: Answer 404 model_not_found for models neither listed nor routed.
        self.strict_models = strict_models
        self.requests: list[RecordedRequest] = []
        #: Times a client closed its connection while a response was pending.
        self.disconnects = 0
        #: Connections accepted since start (a client that pools them opens few).
        self.connections_accepted = 0
        self._routes: dict[str, deque[Script]] = {}
        self._queue: deque[Script] = deque()
        self._server: asyncio.Server | None = None
        self._port: int | None = None
        self._connections: dict[_Connection, asyncio.Task[Any]] = {}
        self._stopping = False
        self._changed = asyncio.Event()
        self._seq = 0

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("FakeUpstream already started")
        self._stopping = False
        self._server = await asyncio.start_server(
            self._handle, self.host, self._requested_port, reuse_address=True
        )
        self._port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Close the listener and every connection now, pending responses included."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping = True
        server.close()
        for conn in list(self._connections):
            conn.abort()
        # Aborting ends every handler (its reader sees end-of-file); cancelling
        # is the fallback for one that does not notice in time.
        tasks = list(self._connections.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=0.5)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        await server.wait_closed()

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

    async def serve_forever(self) -> None:
        if self._server is None:
            await self.start()
        assert self._server is not None
        await self._server.serve_forever()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FakeUpstream not started")
        return self._port

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, e.g. "http://127.0.0.1:41234/v1"."""
        return f"http://{self.host}:{self.port}/v1"

    # -- scripting ---------------------------------------------------------

    @property
    def models(self) -> list[str]:
        """Models listed by GET /v1/models: the constructor's plus routed ones."""
        return list(self._models)

    def route(self, model: str, script: Script) -> None:
        """Serve `script` to every request for `model` until unrouted."""
        self.route_sequence(model, [script])

    def route_sequence(self, model: str, scripts: Sequence[Script]) -> None:
        """Serve `scripts` in order to requests for `model`, then repeat the last."""
        if not scripts:
            raise ValueError("route_sequence needs at least one script")
        self._routes[model] = deque(scripts)
        if model not in self._models:
            self._models.append(model)

    def unroute(self, model: str) -> None:
        self._routes.pop(model, None)

    def enqueue(self, *scripts: Script) -> None:
        """Serve these, in order, to the next requests that match no route."""
        self._queue.extend(scripts)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def reset(self) -> None:
        """Forget routes, queue and recordings; keep the default and the listener."""
        self._routes.clear()
        self._queue.clear()
        self.requests.clear()
        self.disconnects = 0
        self._notify()

    def _next_script(self, model: str | None) -> Script:
        sequence = self._routes.get(model) if model is not None else None
        if sequence is not None:
            return sequence.popleft() if len(sequence) > 1 else sequence[0]
        if self._queue:
            return self._queue.popleft()
        return self.default

    # -- observation -------------------------------------------------------

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    def chat_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == "/v1/chat/completions"]

    async def wait_until(
        self,
        predicate: Callable[[], bool],
        timeout: float = 5.0,
    ) -> None:
        """Wait until `predicate()` holds; re-checked whenever the fake's state changes."""
        async with asyncio.timeout(timeout):
            while not predicate():
                await self._changed.wait()

    async def wait_for_requests(
        self,
        n: int,
        timeout: float = 5.0,
    ) -> list[RecordedRequest]:
        """Wait until at least `n` requests have been received; returns all of them."""
        await self.wait_until(lambda: len(self.requests) >= n, timeout)
        return list(self.requests)

    async def wait_for_disconnects(
        self,
        n: int,
        timeout: float = 5.0,
    ) -> None:
        await self.wait_until(lambda: self.disconnects >= n, timeout)

    def _notify(self) -> None:
        # Swap in a fresh event so every current waiter wakes exactly once.
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # -- connection handling -----------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Connection(reader, writer)
        task = asyncio.current_task()
        assert task is not None
        self._connections[conn] = task
        self.connections_accepted += 1
        self._notify()
        try:
            while not self._stopping:
                try:
                    request = await self._read_request(conn)
                except _BadRequest as exc:
                    await self._send_bad_request(conn, str(exc))
                    break
                if request is None or not await self._serve(conn, request):
                    break
        except (OSError, asyncio.CancelledError):
            # Only stop() cancels a handler. Ending quietly matters: on Python
            # 3.11 start_server calls task.exception() on the finished handler,
            # which raises (and logs an error) when the task ended cancelled.
            pass
        finally:
            await self._close(conn)

    async def _close(self, conn: _Connection) -> None:
        conn.closing = True
        conn.pump.cancel()
        if self._stopping:
            conn.writer.transport.abort()
        else:
            conn.writer.close()
        # Bounded: a client that stopped reading must not hold up stop().
        with contextlib.suppress(Exception, asyncio.CancelledError):
            async with asyncio.timeout(1.0):
                await conn.writer.wait_closed()
        with contextlib.suppress(asyncio.CancelledError):
            await conn.pump
        del self._connections[conn]
        self._notify()

    async def _read_request(self, conn: _Connection) -> tuple[RecordedRequest, bool] | None:
        """The next request and whether the connection may be kept alive after it."""
        head = await conn.read_until(b"\r\n\r\n", _MAX_HEAD_BYTES)
        if head is None:
            return None
        lines = head.decode("latin-1").split("\r\n")
        try:
            method, target, version = lines[0].split(" ")
        except ValueError:
            raise _BadRequest(f"bad request line {lines[0]!r}") from None
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise _BadRequest(f"bad header line {line!r}")
            name = name.strip().lower()
            value = value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value

        if "chunked" in headers.get("transfer-encoding", "").lower():
            raw_body = await self._read_chunked_body(conn)
        else:
            try:
                length = int(headers.get("content-length", "0"))
            except ValueError:
                raise _BadRequest("bad content-length") from None
            raw_body = await conn.read_exactly(length)

        body: Any = None
        if raw_body:
            with contextlib.suppress(ValueError):
                body = json.loads(raw_body)
        connection = headers.get("connection", "").lower()
        keep_alive = version == "HTTP/1.1" and "close" not in connection
        recorded = RecordedRequest(
            method=method.upper(),
            path=target.split("?", 1)[0],
            headers=headers,
            body=body,
            raw_body=raw_body,
            received_at=time.monotonic(),
        )
        return recorded, keep_alive

    async def _read_chunked_body(self, conn: _Connection) -> bytes:
        parts: list[bytes] = []
        while True:
            size_line = await conn.read_until(b"\r\n", _MAX_HEAD_BYTES)
            if size_line is None:
                raise _BadRequest("connection closed mid-body")
            try:
                size = int(size_line.split(b";", 1)[0], 16)
            except ValueError:
                raise _BadRequest("bad chunk size") from None
            if size == 0:
                # Trailers, if any, end with an empty line.
                while await conn.read_until(b"\r\n", _MAX_HEAD_BYTES):
                    pass
                return b"".join(parts)
            parts.append(await conn.read_exactly(size))
            await conn.read_exactly(2)

    async def _serve(self, conn: _Connection, request: tuple[RecordedRequest, bool]) -> bool:
        """Answer one request; True if the connection stays open for the next one.

        The response runs as a task raced against the client's end-of-file, so a
        client that gives up (cancelled stream, read timeout) is seen at once,
        whatever the response is doing, and counted in `disconnects`.
        """
        recorded, keep_alive = request
        conn.keep_alive = keep_alive
        respond = asyncio.create_task(self._respond(conn, recorded))
        gone = asyncio.create_task(conn.eof.wait())
        try:
            await asyncio.wait((respond, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not respond.done():
                respond.cancel()
                await asyncio.wait((respond,))
        if respond.cancelled():
            if not conn.closing:
                self.disconnects += 1
                self._notify()
            return False
        exc = respond.exception()
        if isinstance(exc, OSError):
            if not conn.closing:
                self.disconnects += 1
                self._notify()
            return False
        if exc is not None:
            raise exc
        return keep_alive and respond.result() and not conn.eof.is_set()

    async def _respond(self, conn: _Connection, recorded: RecordedRequest) -> bool:
        route = (recorded.method, recorded.path.rstrip("/"))
        if route == ("GET", "/v1/models"):
            self._record(recorded)
            data = [{"id": m, "object": "model", "owned_by": "fake"} for m in self._models]
            return await self._send_json(conn, 200, {"object": "list", "data": data})
        if route == ("POST", "/v1/chat/completions"):
            return await self._chat(conn, recorded)
        self._record(recorded)
        known = {"/v1/models", "/v1/chat/completions"}
        status = 405 if route[1] in known else 404
        return await self._send_json(
            conn, status, _error_body(f"{recorded.method} {recorded.path}", "invalid_request_error")
        )

    def _record(self, recorded: RecordedRequest) -> None:
        self.requests.append(recorded)
        self._notify()

    async def _chat(self, conn: _Connection, recorded: RecordedRequest) -> bool:
        body = recorded.body
        if not isinstance(body, dict):
            self._record(recorded)
            return await self._send_json(
                conn, 400, _error_body("body must be a JSON object", "invalid_request_error")
            )
        model = recorded.model
        if self.strict_models and model not in self._models:
            self._record(recorded)
            message = f"The model `{model}` does not exist."
            error = _error_body(message, "invalid_request_error", code="model_not_found")
            return await self._send_json(conn, 404, error)

        script = self._next_script(model)
        self._record(dataclasses.replace(recorded, script=script))
        if script.fault == "reset_before_headers":
            conn.abort(reset=True)
            return False
        if script.fault == "silent":
            await _hang()
        await _sleep(script.headers_delay_s)

        if script.status != 200:
            if isinstance(script.error_body, str):
                payload = script.error_body.encode()
                return await self._send(conn, script.status, payload, "text/plain", script)
            error_body = script.error_body or _error_body(_reason(script.status), "server_error")
            return await self._send_json(conn, script.status, error_body, script)

        self._seq += 1
        completion = _Completion(self._seq, script, body)
        if body.get("stream") is True:
            return await self._stream(conn, completion)
        delay = script.first_token_delay_s
        delay += script.token_delay_s * max(len(completion.deltas) - 1, 0)
        await _sleep(delay)
        return await self._send_json(conn, 200, completion.as_response(), script)

    async def _send_json(
        self, conn: _Connection, status: int, obj: object, script: Script | None = None
    ) -> bool:
        return await self._send(conn, status, _dumps(obj), "application/json", script)

    async def _send(
        self,
        conn: _Connection,
        status: int,
        payload: bytes,
        content_type: str,
        script: Script | None = None,
    ) -> bool:
        if script is not None and script.fault == "malformed":
            payload = b"{not json"
        headers = {"content-type": content_type, "content-length": str(len(payload))}
        out = _Output(conn)
        out.add(_head(status, headers, script, keep_alive=conn.keep_alive))
        if script is not None and script.fault in ("cut", "stall"):
            out.add(payload[: len(payload) // 2])
            await out.flush()
            if script.fault == "stall":
                await _hang()
            conn.closing = True
            conn.writer.close()
            return False
        out.add(payload)
        await out.flush()
        return True

    async def _send_bad_request(self, conn: _Connection, message: str) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            await self._send_json(conn, 400, _error_body(message, "invalid_request_error"))

    async def _stream(self, conn: _Connection, completion: _Completion) -> bool:
        script = completion.script
        out = _Output(conn)
        headers = {
            "content-type": "text/event-stream",
            "cache-control": "no-cache",
            "transfer-encoding": "chunked",
        }
        out.add(_head(200, headers, script, keep_alive=conn.keep_alive))
        # Headers go out before the first token, as with vLLM: a slow first
        # token is a read timeout on the body, not on the response.
        await out.flush()

        n_deltas = len(completion.deltas)
        for index, event in enumerate(completion.events(script)):
            if index == script.fault_after:
                if script.fault in ("cut", "stall"):
                    await out.flush()
                    if script.fault == "stall":
                        await _hang()
                    # Close (FIN after the buffered bytes), as a crashed server
                    # does; an abort would drop chunks already "sent".
                    conn.closing = True
                    conn.writer.close()
                    return False
                if script.fault == "malformed":
                    out.add_chunk(_MALFORMED_EVENT)
            # With no deltas at all, the finish chunk still waits for "the first token".
            delay = script.first_token_delay_s if index == 0 else 0.0
            if 0 < index < n_deltas:
                delay = script.token_delay_s
            if delay > 0:
                await out.flush()
                await asyncio.sleep(delay)
            if script.sse_comments:
                out.add_chunk(b": ping\n\n")
            out.add_chunk(event)
            if index % _EVENTS_PER_FLUSH == _EVENTS_PER_FLUSH - 1:
                await out.flush()
        out.add(b"0\r\n\r\n")
        await out.flush()
        if script.fault == "no_done":
            conn.closing = True
            conn.writer.close()
            return False
        return True


class _Completion:
    """The deltas and final payloads of one generated answer."""

    def __init__(self, seq: int, script: Script, body: dict[str, Any]) -> None:
        self.script = script
        self.id = f"chatcmpl-fake{seq:08d}"
        self.created = int(time.time())
        model = body.get("model")
        self.model = model if isinstance(model, str) else "fake-model"
        stream_options = body.get("stream_options")
        self.include_usage = (
            isinstance(stream_options, dict) and stream_options.get("include_usage") is True
        )
        self.continuous_usage = self.include_usage and (
            isinstance(stream_options, dict)
            and stream_options.get("continuous_usage_stats") is True
        )
        self.prompt_tokens = estimate_prompt_tokens(body.get("messages"))

        deltas: list[dict[str, Any]] = [{"content": t} for t in script.content_tokens()]
        self.tool_calls: list[dict[str, Any]] = []
        for i, (name, arguments) in enumerate(script.tool_calls):
            call_id = f"call_fake{seq:08d}_{i}"
            self.tool_calls.append(
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": arguments},
                }
            )
            head = {"index": i, "id": call_id, "type": "function"}
            deltas.append({"tool_calls": [{**head, "function": {"name": name, "arguments": ""}}]})
            for piece in _split_arguments(arguments):
                deltas.append({"tool_calls": [{"index": i, "function": {"arguments": piece}}]})

        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        truncated = isinstance(limit, int) and 0 <= limit < len(deltas)
        if truncated:
            assert isinstance(limit, int)
            deltas = deltas[:limit]
        self.deltas = deltas
        if script.finish_reason is not None:
            self.finish_reason = script.finish_reason
        elif truncated:
            self.finish_reason = "length"
        elif script.tool_calls:
            self.finish_reason = "tool_calls"
        else:
            self.finish_reason = "stop"

    @property
    def usage(self) -> dict[str, int]:
        return self._usage(len(self.deltas))

    def _usage(self, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }

    def _chunk(self, choices: list[dict[str, Any]], usage: object = None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = usage
        return chunk

    def events(self, script: Script) -> Iterator[bytes]:
        """SSE events in order: one per delta, the finish, usage if asked, [DONE]."""
        for index, delta in enumerate(self.deltas):
            if index == 0:
                delta = {"role": "assistant", **delta}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
            so_far = self._usage(index + 1) if self.continuous_usage else None
            yield _sse(self._chunk([choice], so_far), script)
        final_delta: dict[str, Any] = {} if self.deltas else {"role": "assistant"}
        final = {"index": 0, "delta": final_delta, "logprobs": None}
        so_far = self.usage if self.continuous_usage else None
        yield _sse(self._chunk([{**final, "finish_reason": self.finish_reason}], so_far), script)
        if self.include_usage:
            yield _sse(self._chunk([], self.usage), script)
        if script.fault != "no_done":
            yield _DONE_EVENT

    def as_response(self) -> dict[str, Any]:
        content = "".join(d["content"] for d in self.deltas if "content" in d)
        message: dict[str, Any] = {
            "role": "assistant",
            "content": content if content or not self.tool_calls else None,
        }
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": self.finish_reason,
                }
            ],
            "usage": self.usage,
        }


def _sse(obj: object, script: Script) -> bytes:
    payload = _dumps(obj)
    if script.sse_multiline:
        # SSE joins data lines with "\n", which JSON accepts as whitespace.
        first, sep, rest = payload.partition(b",")
        return b"data: " + first + sep + b"\ndata: " + rest + b"\n\n"
    return b"data: " + payload + b"\n\n"


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def _head(
    status: int, defaults: Mapping[str, str], script: Script | None, *, keep_alive: bool
) -> bytes:
    headers = dict(defaults)
    if not keep_alive:
        headers["connection"] = "close"
    if script is not None:
        # Script headers win, whatever their case, so a test can send a wrong
        # content-type or framing on purpose.
        overridden = {name.lower() for name in script.headers}
        headers = {k: v for k, v in headers.items() if k not in overridden}
        headers.update(script.headers)
    lines = [f"HTTP/1.1 {status} {_reason(status)}"]
    lines.extend(f"{name}: {value}" for name, value in headers.items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _error_body(message: str, type_: str, *, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


# -- CLI -------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m threadline.testing.fake_upstream",
        description="Serve a fake OpenAI-compatible upstream (default script) until stopped.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--tokens", type=int, default=256, help="tokens per answer")
    parser.add_argument("--text", default=None, help="answer text instead of --tokens")
    parser.add_argument("--token-delay", type=float, default=0.0, help="seconds between tokens")
    parser.add_argument(
        "--first-token-delay", type=float, default=0.0, help="seconds before the first token"
    )
    parser.add_argument("--model", action="append", default=None, help="model to list (repeatable)")
    parser.add_argument(
        "--model-tokens",
        action="append",
        default=[],
        metavar="MODEL=N",
        help="answer MODEL with N tokens instead of --tokens (repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        args.model_tokens = {
            model: int(n) for model, _, n in (item.partition("=") for item in args.model_tokens)
        }
    except ValueError:
        parser.error("--model-tokens takes MODEL=N with N a whole number")
    return args


async def _serve_until_signalled(args: argparse.Namespace) -> None:
    script = Script(
        text=args.text,
        tokens=args.tokens,
        token_delay_s=args.token_delay,
        first_token_delay_s=args.first_token_delay,
    )
    fake = FakeUpstream(
        host=args.host, port=args.port, models=args.model or ["fake-model"], default=script
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    for model, tokens in args.model_tokens.items():
        fake.route(model, dataclasses.replace(script, tokens=tokens))
    async with fake:
        print(f"fake upstream serving on {fake.base_url}", flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> None:
    asyncio.run(_serve_until_signalled(_parse_args(argv)))


if __name__ == "__main__":
    main()
