"""Continuing a cut answer on another target, and checking that it really continues.

A prefill-capable fallback is sent the request plus the partial answer as a
trailing assistant message. Some servers ignore that message (or the flags that
ask them to continue it) and answer from the start: relayed as is, the caller
would get the partial text followed by a full replay of it. `ContinuationCheck`
holds back the continuation's first characters until they show whether it
continues or starts over, so a replay is turned into a rollback before any of it
reaches the caller.
"""

from __future__ import annotations

from collections.abc import Iterator

from services.llm_proxy.router import ResolvedRoute, Target
from threadline.v1 import common_pb2, llm_pb2

#: How many characters of the partial answer a continuation is compared with: enough
#: that a genuine continuation practically never starts with the same characters.
PROBE_CHARS = 24


def continuation_request(request: llm_pb2.ChatRequest, partial: str) -> llm_pb2.ChatRequest:
    """The request again, with the cut answer as a trailing assistant message to continue."""
    continuation = llm_pb2.ChatRequest()
    continuation.CopyFrom(request)
    continuation.messages.append(
        common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, content=partial)
    )
    return continuation


def continuation_targets(route: ResolvedRoute, index: int) -> Iterator[Target]:
    """The targets after `index` that can continue a cut answer, one at a time.

    Lazy on purpose: letting a request through a half-open circuit reserves its
    probe, so the next target is only asked once the previous one has failed.
    """
    for target in route.targets[index + 1 :]:
        if target.upstream.settings.capabilities.prefill and target.upstream.breaker.allow():
            yield target


class ContinuationCheck:
    """Decides from its first characters whether a continuation continues `partial`.

    Text chunks are held until the decision; other chunks (attempt information)
    pass at once, and a tool-call delta decides "continues" (it cannot be a replay
    of text). The decision is made as soon as the text seen either differs from the
    start of the partial answer (a continuation) or matches `PROBE_CHARS` of it (a
    replay), or at the end of the stream (a replay if the text it sent is a
    non-empty start of the partial answer).
    """

    def __init__(self, partial: str) -> None:
        self._probe = partial.lstrip()[:PROBE_CHARS]
        self._seen = ""
        self._held: list[llm_pb2.ChatChunk] = []
        #: None until decided; then whether the continuation started over.
        self.replayed: bool | None = None if self._probe else False

    @property
    def decided(self) -> bool:
        return self.replayed is not None

    @property
    def held(self) -> bool:
        """Is text held back that the caller has not seen?"""
        return bool(self._held)

    def feed(self, chunk: llm_pb2.ChatChunk) -> list[llm_pb2.ChatChunk]:
        """The chunks the caller may see now."""
        if self.replayed is not None:
            return [chunk]
        kind = chunk.WhichOneof("chunk")
        if kind == "tool_call_delta":
            return self._decide(False, chunk)
        if kind != "delta":
            return [chunk]
        self._held.append(chunk)
        self._seen += chunk.delta
        seen = self._seen.lstrip()
        if not self._probe.startswith(seen[: len(self._probe)]):
            return self._decide(False)
        if len(seen) >= len(self._probe):
            return self._decide(True)
        return []

    def end(self) -> list[llm_pb2.ChatChunk]:
        """The stream ended: decide on what was seen and release it."""
        if self.replayed is not None:
            return []
        return self._decide(bool(self._seen.strip()))

    def _decide(self, replayed: bool, *more: llm_pb2.ChatChunk) -> list[llm_pb2.ChatChunk]:
        self.replayed = replayed
        released, self._held = [*self._held, *more], []
        return released
