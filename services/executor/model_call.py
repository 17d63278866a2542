"""One streamed model call, collected: shared by the turn loop and the local task runner.

Both agent loops relay or log what streams in and then need the same facts: the
text so far (what the user already saw), the model's result if it came, and the
failure if the stream broke. A call's reads can be interrupted (at shutdown): it
then ends like a stream cut by the upstream, with what had arrived.

A rollback chunk (llm_proxy restarted the answer on another target, or a
continuation started over) empties the text so far: what follows is the whole
answer, and the result holds only it. Tool-call deltas are never collected here
(the result lists the calls), so the discarded ones can never run.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Protocol

from threadline import errors
from threadline.v1 import common_pb2, llm_pb2

NO_RESULT = "the model stream ended without a result"


class StreamingModel(Protocol):
    def stream_chat(self, request: llm_pb2.ChatRequest) -> AsyncIterator[llm_pb2.ChatChunk]: ...


class ReadInterrupts:
    """Stops the model reads of the calls that use it, for one reason, once.

    A call is only ever cancelled while it waits for its next chunk, never while
    it hands a chunk on (the same trick as llm_proxy's read watchdog): so the
    cancellation lands in `read`, which turns it into the call's failure, and the
    caller goes on to store and report what it has. A call that is not reading
    when `fire` comes is stopped at its next read.
    """

    def __init__(self) -> None:
        self.reason: str | None = None
        self._reading: set[asyncio.Task[object]] = set()
        self._cancelled: set[asyncio.Task[object]] = set()

    def fire(self, reason: str) -> None:
        if self.reason is not None:
            return
        self.reason = reason
        for task in self._reading:
            self._cancelled.add(task)
            task.cancel()

    async def read(self, chunks: AsyncIterator[llm_pb2.ChatChunk]) -> llm_pb2.ChatChunk:
        if self.reason is not None:
            raise errors.Unavailable(self.reason)
        task = asyncio.current_task()
        assert task is not None
        self._reading.add(task)
        try:
            return await anext(chunks)
        except asyncio.CancelledError:
            # Ours alone (and nobody else's, e.g. the client leaving): an interruption.
            if task in self._cancelled and task.uncancel() == 0 and self.reason is not None:
                raise errors.Unavailable(self.reason) from None
            raise
        finally:
            self._reading.discard(task)
            self._cancelled.discard(task)


class ModelCall:
    """Collects one call's chunks; a failure of the stream is kept, not raised."""

    def __init__(self) -> None:
        self._text: list[str] = []
        #: Rollbacks seen: answers discarded before the one being collected.
        self.rollbacks = 0
        #: The model's result (the `done` chunk), if the stream got that far.
        self.done: llm_pb2.ChatDone | None = None
        #: Why the stream broke, if it did.
        self.failure: errors.ThreadlineError | None = None

    @property
    def partial(self) -> str:
        """The text streamed so far."""
        return self.text()

    def text(self) -> str:
        """The text streamed so far (as a method: a callable to build it only when needed)."""
        return "".join(self._text)

    async def stream(
        self,
        llm: StreamingModel,
        request: llm_pb2.ChatRequest,
        interrupts: ReadInterrupts | None = None,
    ) -> AsyncGenerator[llm_pb2.ChatChunk, None]:
        """Relay every chunk but the result, collecting text and result on the way."""
        chunks = aiter(llm.stream_chat(request))
        try:
            while True:
                try:
                    chunk = await (interrupts.read(chunks) if interrupts else anext(chunks))
                except StopAsyncIteration:
                    return
                kind = chunk.WhichOneof("chunk")
                if kind == "done":
                    self.done = chunk.done
                    continue
                if kind == "delta":
                    self._text.append(chunk.delta)
                elif kind == "rollback":
                    self._text.clear()
                    self.rollbacks += 1
                yield chunk
        except errors.ThreadlineError as exc:
            self.failure = exc
        finally:
            # An abandoned call (interrupted, or its caller gone) must end at llm_proxy too.
            if isinstance(chunks, AsyncGenerator):
                await chunks.aclose()

    def result(self) -> llm_pb2.ChatDone:
        """The model's result; a stream that broke after output ends INTERRUPTED with the
        partial text. One that broke before any output raises its failure: there is no
        answer to keep."""
        if self.failure is not None:
            if not self._text:
                raise self.failure
            return self._interrupted(self.failure.message)
        if self.done is None:
            return self._interrupted(NO_RESULT)
        return self.done

    def _interrupted(self, error: str) -> llm_pb2.ChatDone:
        return llm_pb2.ChatDone(
            finish_reason=common_pb2.FINISH_REASON_INTERRUPTED, content=self.partial, error=error
        )
