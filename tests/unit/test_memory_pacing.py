"""Background jobs rest after each model call in proportion to how long it took."""

from __future__ import annotations

import asyncio

import pytest

from services.memory.pacing import PacedLlm
from threadline import errors
from threadline.v1 import llm_pb2


class SlowLlm:
    def __init__(self, seconds: float, fail: bool = False) -> None:
        self.seconds = seconds
        self.fail = fail
        self.calls = 0

    async def chat(
        self, request: llm_pb2.ChatRequest, *, timeout: float | None = None
    ) -> llm_pb2.ChatResponse:
        self.calls += 1
        await asyncio.sleep(self.seconds)
        if self.fail:
            raise errors.Unavailable("upstream down")
        return llm_pb2.ChatResponse()


def paced(llm: SlowLlm, duty_cycle: float) -> tuple[PacedLlm, list[float]]:
    rests: list[float] = []

    async def record(seconds: float) -> None:
        rests.append(seconds)

    return PacedLlm(llm, duty_cycle, sleep=record), rests


async def test_half_duty_rests_as_long_as_the_call_took() -> None:
    llm, rests = paced(SlowLlm(0.05), 0.5)

    await llm.chat(llm_pb2.ChatRequest())

    assert rests == [pytest.approx(0.05, abs=0.03)]
    assert rests[0] >= 0.05


async def test_quarter_duty_rests_three_times_as_long() -> None:
    llm, rests = paced(SlowLlm(0.05), 0.25)

    await llm.chat(llm_pb2.ChatRequest())

    assert rests[0] == pytest.approx(3 * 0.05, rel=0.5)
    assert rests[0] >= 0.15


async def test_full_duty_never_rests() -> None:
    llm, rests = paced(SlowLlm(0.01), 1.0)

    await llm.chat(llm_pb2.ChatRequest())

    assert rests == []


async def test_a_failed_call_is_followed_by_a_rest_and_still_raises() -> None:
    llm, rests = paced(SlowLlm(0.02, fail=True), 0.5)

    with pytest.raises(errors.Unavailable):
        await llm.chat(llm_pb2.ChatRequest())

    assert len(rests) == 1 and rests[0] >= 0.02


async def test_a_cancelled_call_ends_at_once_without_resting() -> None:
    llm, rests = paced(SlowLlm(10), 0.5)
    task = asyncio.create_task(llm.chat(llm_pb2.ChatRequest()))
    await asyncio.sleep(0.01)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert rests == []
