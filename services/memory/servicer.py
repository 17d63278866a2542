"""gRPC adapter for memory: proto in, domain call, proto out."""

from __future__ import annotations

from typing import Any

import grpc.aio

from services.memory.consolidation import Consolidator
from threadline import errors
from threadline.v1 import memory_pb2, memory_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]


def _check(tenant: str, session_id: str) -> None:
    if not tenant:
        raise errors.InvalidArgument("tenant is required")
    if not session_id:
        raise errors.InvalidArgument("session_id is required")


class MemoryServicer(memory_pb2_grpc.MemoryServicer):
    def __init__(self, consolidator: Consolidator) -> None:
        self.consolidator = consolidator

    async def Consolidate(
        self, request: memory_pb2.ConsolidateRequest, context: Context
    ) -> memory_pb2.ConsolidateResponse:
        _check(request.tenant, request.session_id)
        return await self.consolidator.consolidate(
            request.tenant, request.session_id, request.model
        )

    async def Recall(
        self, request: memory_pb2.RecallRequest, context: Context
    ) -> memory_pb2.RecallResponse:
        _check(request.tenant, request.session_id)
        memory = await self.consolidator.recall(request.tenant, request.session_id)
        return memory_pb2.RecallResponse(summary=memory.summary, offset=memory.offset)
