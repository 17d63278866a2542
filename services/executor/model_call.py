"""One streamed model call, collected: shared by the turn loop and the local task runner.

Both agent loops relay or log what streams in and then need the same facts: the
text so far (what the user already saw), the model's result if it came, and the
failure if the stream broke.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from threadline import errors
from threadline.v1 import common_pb2, llm_pb2

NO_RESULT = "the model stream ended without a result"


class StreamingModel(Protocol):
    def stream_chat(self, request: llm_pb2.ChatRequest) -> AsyncIterator[llm_pb2.ChatChunk]: ...


class ModelCall:
    """Collects one call's chunks; a failure of the stream is kept, not raised."""

    def __init__(self) -> None:
        self._text: list[str] = []
        #: The model's result (the `done` chunk), if the stream got that far.
        self.done: llm_pb2.ChatDone | None = None
        #: Why the stream broke, if it did.
        self.failure: errors.ThreadlineError | None = None

    @property
    def partial(self) -> str:
        """The text streamed so far."""
        return "".join(self._text)

    async def stream(
        self, llm: StreamingModel, request: llm_pb2.ChatRequest
    ) -> AsyncIterator[llm_pb2.ChatChunk]:
        """Relay every chunk but the result, collecting text and result on the way."""
        try:
            async for chunk in llm.stream_chat(request):
                kind = chunk.WhichOneof("chunk")
                if kind == "done":
                    self.done = chunk.done
                    continue
                if kind == "delta":
                    self._text.append(chunk.delta)
                yield chunk
        except errors.ThreadlineError as exc:
            self.failure = exc

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
