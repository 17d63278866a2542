"""gRPC adapter for the executor: proto in, domain call, proto out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc.aio

from services.executor.turn import TurnRunner
from threadline.v1 import executor_pb2, executor_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]


class ExecutorServicer(executor_pb2_grpc.ExecutorServicer):
    def __init__(self, turns: TurnRunner) -> None:
        self.turns = turns

    async def RunTurn(
        self, request: executor_pb2.RunTurnRequest, context: Context
    ) -> AsyncIterator[executor_pb2.TurnEvent]:
        async for event in self.turns.run(request):
            yield event
