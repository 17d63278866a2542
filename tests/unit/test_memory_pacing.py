"""Background jobs rest after each step, in proportion, while turns run."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.memory.pacing import Pacer, TurnActivity, work_timeout


def recording(
    duty_cycle: float, busy: bool = True, max_rest_s: float = 10.0
) -> tuple[Pacer, list[float]]:
    rests: list[float] = []

    async def record(seconds: float) -> None:
        rests.append(seconds)

    return Pacer(duty_cycle, max_rest_s, busy=lambda: busy, sleep=record), rests


async def test_half_duty_rests_as_long_as_the_step_took() -> None:
    pacer, rests = recording(0.5)
    paced = pacer.begin()
    await asyncio.sleep(0.05)  # the step's work

    await paced.rest()

    assert len(rests) == 1 and 0.05 <= rests[0] < 0.1


async def test_a_tenth_duty_rests_nine_times_as_long() -> None:
    pacer, rests = recording(0.1)
    paced = pacer.begin()
    await asyncio.sleep(0.05)

    await paced.rest()

    assert 0.45 <= rests[0] < 0.9


async def test_each_rest_counts_only_the_work_since_the_last_one() -> None:
    pacer, rests = recording(0.5)
    paced = pacer.begin()
    await asyncio.sleep(0.08)
    await paced.rest()
    await asyncio.sleep(0.02)

    await paced.rest()

    assert rests[0] >= 0.08 and 0.02 <= rests[1] < 0.06


async def test_one_rest_is_never_longer_than_the_cap() -> None:
    pacer, rests = recording(0.1, max_rest_s=0.2)
    paced = pacer.begin()
    await asyncio.sleep(0.05)

    await paced.rest()

    assert rests == [0.2]


async def test_full_duty_never_rests() -> None:
    pacer, rests = recording(1.0)
    paced = pacer.begin()
    await asyncio.sleep(0.01)

    await paced.rest()

    assert rests == []


async def test_without_turns_running_a_job_never_rests() -> None:
    pacer, rests = recording(0.1, busy=False)
    paced = pacer.begin()
    await asyncio.sleep(0.02)

    await paced.rest()

    assert rests == []


def test_turns_count_as_running_for_a_while_after_the_last_one() -> None:
    turns = TurnActivity(quiet_after_s=0.05)
    assert not turns.busy()

    turns.seen()
    assert turns.busy()

    time.sleep(0.06)
    assert not turns.busy()


async def test_rests_do_not_count_towards_the_job_timeout() -> None:
    paced = Pacer(0.25, busy=lambda: True).begin()

    async with work_timeout(0.3):
        await asyncio.sleep(0.1)
        await paced.rest()  # about 0.3 s: past the timeout unless pushed back
        await asyncio.sleep(0.1)


async def test_work_past_the_timeout_still_times_out() -> None:
    paced = Pacer(0.25, busy=lambda: True).begin()

    with pytest.raises(TimeoutError):
        async with work_timeout(0.2):
            await asyncio.sleep(0.05)
            await paced.rest()
            await asyncio.sleep(0.3)
