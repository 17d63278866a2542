"""Relay batching: read the upstream in its own task, relay what has piled up.

A fast upstream outpaces the gRPC writes to our caller; instead of one message
per token, whatever arrived during the previous write goes out together. A slow
upstream (one token at a time) sees no added latency: a lone event is relayed
at once. The relay's waits for the upstream are timed on the request's clock
(`overhead`), so they are not counted as the proxy's own time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Generic, TypeVar

from services.llm_proxy.overhead import RequestClock

T = TypeVar("T")


class _End:
    pass


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class Batches(Generic[T]):
    def __init__(self, source: AsyncIterator[T], clock: RequestClock | None = None) -> None:
        self._source = source
        self._clock = clock
        self._queue: asyncio.Queue[T | _End | _Failed] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None

    async def _read(self) -> None:
        try:
            async for item in self._source:
                self._queue.put_nowait(item)
                # Let the relay send what is here before reading on: without this a
                # buffered answer would be read whole before its first token leaves.
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # handed to the consumer, raised there
            self._queue.put_nowait(_Failed(exc))
            return
        self._queue.put_nowait(_End())

    async def __aiter__(self) -> AsyncGenerator[list[T], None]:
        self._reader = asyncio.create_task(self._read(), name="upstream-reader")
        try:
            while True:
                if self._queue.empty() and self._clock is not None:
                    with self._clock.waiting():
                        first = await self._queue.get()
                else:
                    first = await self._queue.get()
                batch = [first]
                while not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                items: list[T] = []
                for entry in batch:
                    if isinstance(entry, _End):
                        if items:
                            yield items
                        return
                    if isinstance(entry, _Failed):
                        if items:
                            yield items
                        raise entry.error
                    items.append(entry)
                yield items
        finally:
            # The caller left or failed: stop reading so the upstream request ends now.
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
