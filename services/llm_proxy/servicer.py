"""gRPC adapter for the proxy: proto in, domain call, proto out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc.aio

from services.llm_proxy.attempt_spans import traced_attempts
from services.llm_proxy.overhead import TRAILER
from services.llm_proxy.proxy import ChatProxy
from threadline import errors
from threadline.v1 import common_pb2, llm_pb2, llm_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]


class LlmProxyServicer(llm_pb2_grpc.LlmProxyServicer):
    def __init__(self, proxy: ChatProxy) -> None:
        self.proxy = proxy

    async def StreamChat(
        self, request: llm_pb2.ChatRequest, context: Context
    ) -> AsyncIterator[llm_pb2.ChatChunk]:
        async for chunk in traced_attempts(self.proxy.stream(request)):
            if chunk.HasField("done"):
                _overhead_trailer(context, chunk.done)
            yield chunk

    async def Chat(self, request: llm_pb2.ChatRequest, context: Context) -> llm_pb2.ChatResponse:
        async for chunk in traced_attempts(self.proxy.stream(request)):
            if chunk.HasField("done"):
                done = chunk.done
                _overhead_trailer(context, done)
                message = common_pb2.Message(
                    role=common_pb2.ROLE_ASSISTANT,
                    content=done.content,
                    tool_calls=done.tool_calls,
                    interrupted=done.finish_reason == common_pb2.FINISH_REASON_INTERRUPTED,
                )
                return llm_pb2.ChatResponse(message=message, done=done)
        raise errors.Internal("the proxy ended without a result")

    async def ListModels(
        self, request: llm_pb2.ListModelsRequest, context: Context
    ) -> llm_pb2.ListModelsResponse:
        return llm_pb2.ListModelsResponse(models=self.proxy.models())


def _overhead_trailer(context: Context, done: llm_pb2.ChatDone) -> None:
    """The proxy's own time for this request, for callers that read trailers."""
    context.set_trailing_metadata(((TRAILER, f"{done.proxy_overhead_ms:.3f}"),))
