"""What a turn needs from the other services (satisfied by threadline.peers clients)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from threadline.peer_protocols import SessionGetter
from threadline.v1 import common_pb2, llm_pb2, memory_pb2, session_pb2


class Sessions(SessionGetter, Protocol):
    async def append(
        self,
        tenant: str,
        session_id: str,
        expected_head: str,
        messages: Sequence[common_pb2.Message],
        *,
        request_id: str = ...,
        calibration: session_pb2.CalibrateRequest | None = ...,
    ) -> session_pb2.AppendResponse: ...

    async def build_context(
        self, request: session_pb2.BuildContextRequest
    ) -> session_pb2.BuildContextResponse: ...


class Memory(Protocol):
    async def recall(
        self,
        tenant: str,
        session_id: str,
        *,
        query: str = ...,
        budget_tokens: int = ...,
        session_checked: bool = ...,
    ) -> memory_pb2.RecallResponse: ...

    async def compact(
        self, request: memory_pb2.JobRequest, *, timeout: float | None = ...
    ) -> memory_pb2.Job: ...

    async def record_activity(
        self, request: memory_pb2.RecordActivityRequest, *, timeout: float | None = ...
    ) -> memory_pb2.RecordActivityResponse: ...


class Llm(Protocol):
    def stream_chat(
        self, request: llm_pb2.ChatRequest, *, timeout: float | None = ...
    ) -> AsyncIterator[llm_pb2.ChatChunk]: ...

    async def list_models(self, *, timeout: float | None = ...) -> llm_pb2.ListModelsResponse: ...
