"""Adapter for one OpenAI-compatible upstream over aiohttp: SSE in, typed events out.

Every way an upstream can fail becomes an `UpstreamFailure` that says whether a
retry can help; the proxy decides what to do with it.

aiohttp rather than httpx (used elsewhere) because this is the proxy's hot path:
its C HTTP parser reads a streamed answer for a quarter to a fifth of the CPU
httpx's pure-Python stack needs (`python -m bench.stack_floor`).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass

import aiohttp

from services.llm_proxy.openai_wire import (
    Finish,
    MalformedChunk,
    StreamEvent,
    TextDelta,
    ToolDelta,
    parse_chunk,
)
from services.llm_proxy.pool import ConnectionSlots
from services.llm_proxy.sse import SseParser
from threadline.config import UpstreamSettings
from threadline.errors import FailedPrecondition
from threadline.events import EventPublisher
from threadline.logs import get_logger

RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
#: How long the end of a body after [DONE] is waited for (see `_drain`).
_DRAIN_S = 0.05
_log = get_logger(__name__)


class UpstreamFailure(Exception):
    def __init__(
        self,
        reason: str,
        message: str,
        *,
        retryable: bool,
        status: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retryable = retryable
        self.status = status
        self.retry_after_s = retry_after_s


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds from now: either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _error_detail(response_body: bytes) -> tuple[str, str]:
    """(code, message) from an OpenAI-style error body, best effort."""
    try:
        body = json.loads(response_body)
    except ValueError:
        return "", response_body[:200].decode(errors="replace")
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("code") or error.get("type") or ""), str(error.get("message") or "")
    if isinstance(error, str):
        return "", error
    return "", str(body)[:200]


def classify_status(status: int, body: bytes, retry_after: str | None) -> UpstreamFailure:
    code, message = _error_detail(body)
    text = f"{code} {message}".lower()
    if status in RETRYABLE_STATUS:
        return UpstreamFailure(
            f"http_{status}",
            f"upstream answered {status}: {message or code}",
            retryable=True,
            status=status,
            retry_after_s=parse_retry_after(retry_after),
        )
    if "context_length" in text or "context length" in text or "maximum context" in text:
        return UpstreamFailure(
            "context_length_exceeded", message or code, retryable=False, status=status
        )
    if "content_filter" in text or "content filter" in text or "content_policy" in text:
        return UpstreamFailure("content_filter", message or code, retryable=False, status=status)
    return UpstreamFailure(
        f"http_{status}",
        f"upstream answered {status}: {message or code}",
        retryable=False,
        status=status,
    )


@dataclass
class Upstream:
    """One model server. Holds a pooled aiohttp session; close it on shutdown."""

    settings: UpstreamSettings
    client: aiohttp.ClientSession
    #: One per request being answered, first come first served (`pool`).
    connections: ConnectionSlots
    #: Where waits for a connection are reported (`llm.pool_wait`).
    events: EventPublisher | None = None

    @classmethod
    def create(cls, settings: UpstreamSettings, events: EventPublisher | None = None) -> Upstream:
        """Build the client; call with the event loop running."""
        headers = {}
        if settings.api_key_env:
            if settings.api_key is None:
                # Fail at start, not with a 401 on the first user's turn.
                raise FailedPrecondition(
                    f"upstream {settings.name!r}: environment variable {settings.api_key_env} "
                    "(llm.upstream.api_key_env) is not set"
                )
            key = settings.api_key.get_secret_value()
            if key:  # set but empty: an upstream that needs no key (Ollama, llama.cpp)
                headers["Authorization"] = f"Bearer {key}"
        timeouts = settings.timeouts
        size = settings.pool_size
        client = aiohttp.ClientSession(
            headers=headers,
            # Read waits are bounded by the first-token and idle timers below, per read.
            # `connect` would include a wait for a pooled connection; that wait is
            # `connections`' own, and a request holding a slot never waits in here.
            timeout=aiohttp.ClientTimeout(
                total=None, connect=timeouts.connect_s, sock_connect=timeouts.connect_s
            ),
            connector=aiohttp.TCPConnector(limit=size, limit_per_host=0),
            # No proxy variables, no cookies: the upstream is a fixed internal server.
            trust_env=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=True,
        )
        slots = ConnectionSlots(settings.name, size, timeouts.pool_wait_s)
        return cls(settings, client, slots, events)

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def url(self) -> str:
        return self.settings.base_url.rstrip("/") + "/chat/completions"

    async def close(self) -> None:
        await self.client.close()

    async def stream(self, body: dict[str, object]) -> AsyncIterator[StreamEvent]:
        """Stream one attempt. Raises UpstreamFailure; any event yielded was real output.

        Everything that arrived in one read is parsed together and consecutive text
        deltas are merged: a fast upstream costs one relayed message per read, not
        per token, while a slow one still gets every token through at once.
        """
        try:
            async with contextlib.AsyncExitStack() as exits:
                waited = await exits.enter_async_context(self.connections.hold())
                if waited:
                    self._report_wait(body, waited)
                # Taken before the request is sent (after any wait for a connection):
                # the first token is due this long after it.
                first_token_deadline = (
                    asyncio.get_running_loop().time() + self.settings.timeouts.first_token_s
                )
                response = await self._open(body, exits)
                # Keep-alives do not move it: the first token has its own deadline.
                watchdog = _ReadWatchdog(first_token_deadline)
                exits.callback(watchdog.close)
                async for event in self._events(response, watchdog):
                    yield event
        except (aiohttp.ClientError, OSError) as exc:
            raise self._transport_failure(exc) from None

    def _report_wait(self, body: dict[str, object], waited: float) -> None:
        """A request that had to wait for a connection: how long, and how many still do."""
        model, waiting = str(body.get("model", "")), self.connections.waits.depth
        size, waited_s = self.connections.size, round(waited, 3)
        if self.events is not None:
            self.events.emit(
                "llm.pool_wait",
                upstream=self.name,
                model=model,
                waited_s=waited_s,
                pool_size=size,
                waiting=waiting,
            )

    async def _open(
        self, body: dict[str, object], exits: contextlib.AsyncExitStack
    ) -> aiohttp.ClientResponse:
        """Send the request; a 200 response (closed with `exits`) or UpstreamFailure."""
        first_token_s = self.settings.timeouts.first_token_s
        try:
            # A server that takes the request and never answers must not hold the
            # caller past the first-token deadline (no read timeout is set).
            async with asyncio.timeout(first_token_s):
                response = await exits.enter_async_context(self.client.post(self.url, json=body))
        except aiohttp.ServerTimeoutError as exc:
            # aiohttp's own connect timeout is a TimeoutError too: not the first token's.
            raise self._transport_failure(exc) from None
        except TimeoutError:
            raise UpstreamFailure(
                "first_token_timeout",
                f"upstream sent nothing for {first_token_s:g}s (first token)",
                retryable=False,
            ) from None
        if response.status != 200:
            content = await response.read()
            raise classify_status(response.status, content, response.headers.get("retry-after"))
        return response

    async def _events(
        self, response: aiohttp.ClientResponse, watchdog: _ReadWatchdog
    ) -> AsyncIterator[StreamEvent]:
        """The response body's events, read by read, each read within its deadline."""
        loop = asyncio.get_running_loop()
        idle_s = self.settings.timeouts.idle_between_chunks_s
        parser = SseParser()
        reads = response.content.iter_any().__aiter__()
        output_seen = False
        finished = False
        while True:
            try:
                chunk = await watchdog.read(reads)
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise self._silence(output_seen) from None
            if output_seen:
                watchdog.deadline = loop.time() + idle_s
            datas = parser.feed(chunk)
            done = "[DONE]" in (d.strip() for d in datas)
            for event in _merged(d for d in datas if d.strip() != "[DONE]"):
                if not output_seen and isinstance(event, TextDelta | ToolDelta):
                    output_seen = True
                    watchdog.deadline = loop.time() + idle_s
                finished = finished or isinstance(event, Finish)
                yield event
            if done:
                await _drain(reads)
                return
        for event in _merged(parser.finish()):
            finished = finished or isinstance(event, Finish)
            yield event
        if not finished:
            # No [DONE] and no finish_reason: the answer was cut, however cleanly the
            # connection closed. (Finished but no [DONE] is finalised as it stands.)
            raise UpstreamFailure(
                "incomplete_stream",
                "the stream ended without a finish reason or [DONE]",
                retryable=True,
            )

    def _silence(self, output_seen: bool) -> UpstreamFailure:
        """A read that waited past its deadline: before the first token, or between two."""
        timeouts = self.settings.timeouts
        phase = "idle" if output_seen else "first_token"
        limit = timeouts.idle_between_chunks_s if output_seen else timeouts.first_token_s
        return UpstreamFailure(
            f"{phase}_timeout",
            f"upstream sent nothing for {limit:g}s ({phase.replace('_', ' ')})",
            retryable=False,
        )

    def _transport_failure(self, exc: aiohttp.ClientError | OSError) -> UpstreamFailure:
        """What a broken connection means for a retry (checked most specific first)."""
        if isinstance(exc, aiohttp.ClientConnectorError):
            # The socket error names an internal address: logs keep it, callers do not.
            _log.warning("llm.connect_failed", upstream=self.name, error=str(exc))
            return UpstreamFailure(
                "connect", f"cannot connect to upstream {self.name!r}", retryable=True
            )
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            connect_s = self.settings.timeouts.connect_s
            return UpstreamFailure(
                "connect_timeout",
                f"could not connect to upstream {self.name!r} within {connect_s:g}s",
                retryable=True,
            )
        if isinstance(exc, aiohttp.ClientPayloadError):
            # aiohttp words a body cut short as its parser's error (e.g.
            # "<TransferEncodingError: 400, message='Not enough data...'>"): that 400 is
            # aiohttp's, not a status the upstream sent, so it is not repeated here.
            _log.info("llm.stream_cut", upstream=self.name, error=str(exc))
            return UpstreamFailure(
                "reset",
                f"upstream {self.name!r} closed the connection mid-answer "
                "(the streamed response ended before its end)",
                retryable=True,
            )
        if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
            return UpstreamFailure(
                "reset",
                f"upstream {self.name!r} closed or reset the connection ({type(exc).__name__})",
                retryable=True,
            )
        _log.warning("llm.transport_failed", upstream=self.name, error=str(exc))
        return UpstreamFailure(
            "transport", f"upstream {self.name!r}: {type(exc).__name__}", retryable=True
        )


async def _drain(reads: AsyncIterator[bytes]) -> None:
    """Read the body's end after [DONE] so the connection goes back to the pool.

    Servers end the body right after [DONE] (usually in the same read); leaving it
    unread would close the connection and make the next request connect again.
    One that lingers is not waited on: its connection is closed instead.
    """
    with contextlib.suppress(TimeoutError, aiohttp.ClientError, OSError):
        async with asyncio.timeout(_DRAIN_S):
            async for _ in reads:
                pass


class _ReadWatchdog:
    """The deadline of a stream's next read, with one timer for the whole stream.

    Moving the deadline is a float store; the timer, when it fires early, re-arms
    itself for the current deadline. A per-read `asyncio.timeout` would schedule and
    cancel a timer for every chunk, a large share of the proxy's CPU on fast streams.
    The task is only ever cancelled while it waits in `read`, never elsewhere.
    """

    def __init__(self, deadline: float) -> None:
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self.deadline = deadline
        self.expired = False
        self._reading = False
        self._handle = self._loop.call_at(deadline, self._check)

    def _check(self) -> None:
        now = self._loop.time()
        if now < self.deadline:
            self._handle = self._loop.call_at(self.deadline, self._check)
        elif not self._reading:
            self._handle = self._loop.call_later(0.01, self._check)
        else:
            self.expired = True
            self._task.cancel()

    async def read(self, reads: AsyncIterator[bytes]) -> bytes:
        self._reading = True
        try:
            return await reads.__anext__()
        except asyncio.CancelledError:
            # Our own cancel (and no one else's) means the deadline passed.
            if self.expired and self._task.uncancel() == 0:
                raise TimeoutError from None
            raise
        finally:
            self._reading = False

    def close(self) -> None:
        self._handle.cancel()


def _merged(datas: Iterable[str]) -> Iterator[StreamEvent]:
    """Events of the given chunk payloads, consecutive text deltas joined into one."""
    text: list[str] = []
    for data in datas:
        if not data.strip():
            continue
        try:
            events = parse_chunk(data)
        except MalformedChunk as exc:
            if text:
                yield TextDelta("".join(text))
            raise UpstreamFailure("malformed_chunk", str(exc), retryable=True) from None
        for event in events:
            if isinstance(event, TextDelta):
                text.append(event.text)
                continue
            if text:
                yield TextDelta("".join(text))
                text = []
            yield event
    if text:
        yield TextDelta("".join(text))
